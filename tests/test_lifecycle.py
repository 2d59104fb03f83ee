"""Listeners and lifecycle on real sockets: the Unix socket's rules, the loopback TCP
listener, systemd socket activation, and a drain that lets in-flight streams finish."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time

import httpx2
import pytest
import trio
import trio.testing

import failoverd as fo


@pytest.fixture
def sock_path():
    directory = tempfile.mkdtemp(dir="/tmp")  # AF_UNIX paths must stay short
    return os.path.join(directory, "fo.sock")


async def test_stale_socket_file_is_replaced(sock_path):
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock_path)
    dead.close()  # a socket file nobody listens on: left by a daemon that died
    listener = await fo.open_unix_listener(sock_path, "0660")
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
    await listener.aclose()


async def test_a_file_that_is_not_a_socket_is_never_replaced(sock_path):
    with open(sock_path, "w") as f:  # noqa: ASYNC230 -- test setup
        f.write("precious")
    with pytest.raises(fo.StartupError, match="exists and is not a socket"):
        await fo.open_unix_listener(sock_path, "0660")
    with open(sock_path) as f:  # noqa: ASYNC230 -- test check
        assert f.read() == "precious"


async def test_a_live_daemons_socket_is_never_taken_over(sock_path):
    first = await fo.open_unix_listener(sock_path, "0600")
    with pytest.raises(fo.StartupError, match="already listening"):
        await fo.open_unix_listener(sock_path, "0600")
    await first.aclose()


async def test_loopback_tcp_listener_serves_the_same_api(sock_path, tmp_path):
    cfg = fo.Config(daemon=fo.DaemonConfig(socket=sock_path, tcp="127.0.0.1:0",
                                           ledger=str(tmp_path / "ledger.jsonl")),
                    providers={"a": fo.ProviderConfig(base_url="http://127.0.0.1:9/v1")},
                    routes={"r": fo.RouteConfig(chain=["a/m"])})
    listeners = await fo.open_listeners(cfg)
    assert len(listeners) == 2
    port = listeners[1].socket.getsockname()[1]
    d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger))
    async with trio.open_nursery() as nursery:
        await nursery.start(fo.serve, d, listeners)
        with trio.fail_after(10):
            async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["r"]
        d.shutdown.set()


def test_tcp_listener_must_be_loopback():
    with pytest.raises(fo.ConfigError, match="expected a loopback HOST:PORT"):
        fo.parse_config('[daemon]\ntcp = "0.0.0.0:8411"\n')


def test_socket_activation_takes_the_sockets_systemd_passes(sock_path):
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(sock_path)
    listening.listen()
    child = (
        "import os, sys, failoverd\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "[listener] = failoverd.activated_listeners()\n"
        "print(listener.socket.getsockname(), 'LISTEN_FDS' in os.environ)\n"
    )
    out = subprocess.run([sys.executable, "-c", child, str(listening.fileno())],
                         pass_fds=[listening.fileno()], capture_output=True, text=True,
                         timeout=30, check=True)
    assert out.stdout.split() == [sock_path, "False"]  # and the variables are consumed
    listening.close()


async def test_shutdown_lets_in_flight_streams_finish_then_stops_accepting(sock_path, tmp_path):
    upstream = fo.FakeUpstream(lambda model, body, n: fo.token_script(
        ["slow", " but", " whole"], gap=0.3))
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.serve)
        cfg = fo.Config(daemon=fo.DaemonConfig(socket=sock_path, shutdown_grace_s=10,
                                               ledger=str(tmp_path / "ledger.jsonl")),
                        providers={"a": fo.ProviderConfig(base_url=upstream.base_url)},
                        routes={"r": fo.RouteConfig(chain=["a/m"])})
        d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger))
        listener = await fo.open_unix_listener(sock_path, "0600")
        drained = trio.Event()

        async def serve_until_drained(task_status=trio.TASK_STATUS_IGNORED) -> None:
            await fo.serve(d, [listener], task_status=task_status)
            drained.set()

        await nursery.start(serve_until_drained)
        transport = httpx2.AsyncHTTPTransport(uds=sock_path)
        body = {"model": "r", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with trio.fail_after(10):
            async with httpx2.AsyncClient(transport=transport, base_url="http://fo") as client, \
                    client.stream("POST", "/v1/chat/completions", json=body) as resp:
                pieces = resp.aiter_bytes()
                chunks = [await pieces.__anext__()]
                d.shutdown.set()  # SIGTERM while the answer is streaming
                chunks += [chunk async for chunk in pieces]
            await drained.wait()
        answer = b"".join(chunks)
        assert b'"slow"' in answer
        assert answer.endswith(b"data: [DONE]\n\n")
        [request] = [r for _, r in fo.read_ledger(cfg.daemon.ledger)
                     if isinstance(r, fo.RequestRow)]
        assert (request.status, request.outcome) == (200, "ok")
        probe = socket.socket(socket.AF_UNIX)
        with pytest.raises(ConnectionRefusedError):
            probe.connect(sock_path)
        probe.close()
        nursery.cancel_scope.cancel()


def _pending_clients(path: str, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)  # completes into the listen backlog; nothing accepted yet
        clients.append(c)
    return clients


async def _serve_after_one_accept_error(sock_path: str, monkeypatch: pytest.MonkeyPatch,
                                       err: int) -> list[float]:
    """Two pending clients, accept(2) failing once with `err`: when each was served."""
    listener = await fo.open_unix_listener(sock_path, "0600")
    clients = _pending_clients(sock_path, 2)
    real_accept = socket.socket.accept
    failures = [OSError(err, os.strerror(err))]

    def accept(self):
        if failures:
            raise failures.pop()
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    served: list[float] = []

    async def handler(stream: trio.abc.Stream) -> None:
        served.append(trio.current_time())
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fo.accept_loop, listener, handler, nursery)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    for c in clients:
        c.close()
    await listener.aclose()
    return served


async def test_accept_loop_waits_out_a_full_descriptor_table(
        sock_path, monkeypatch, caplog, autojump_clock):
    served = await _serve_after_one_accept_error(sock_path, monkeypatch, errno.EMFILE)
    assert served == [pytest.approx(0.1), pytest.approx(0.1)]  # after one 0.1 s pause
    assert "cannot accept connections: Too many open files" in caplog.text
    assert "LimitNOFILE" in caplog.text


@pytest.mark.parametrize("err", ["EPERM", "ECONNABORTED", "EPROTO", "ECONNRESET"])
async def test_accept_loop_skips_an_error_about_one_connection(
        sock_path, monkeypatch, caplog, autojump_clock, err):
    """trio's own listener skips these (a firewall's EPERM, a client that reset first):
    the connection is lost, never the daemon."""
    served = await _serve_after_one_accept_error(sock_path, monkeypatch, getattr(errno, err))
    assert served == [0.0, 0.0]  # no pause (the simulated error took no connection)
    assert "cannot accept" not in caplog.text


async def test_accept_loop_takes_the_whole_backlog_in_one_wake_up(sock_path, monkeypatch):
    listener = await fo.open_unix_listener(sock_path, "0600")
    clients = _pending_clients(sock_path, 40)
    waits = []
    real_wait = trio.lowlevel.wait_readable

    async def counting_wait(fd):
        waits.append(fd)
        await real_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    served: list[trio.abc.Stream] = []

    async def handler(stream: trio.abc.Stream) -> None:
        served.append(stream)
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fo.accept_loop, listener, handler, nursery)
            await trio.testing.wait_all_tasks_blocked()
            assert len(served) == 40
            assert len(waits) == 2  # one wake-up took all 40; the second waits for more
            nursery.cancel_scope.cancel()
    for c in clients:
        c.close()
    await listener.aclose()


def test_serve_freezes_start_up_objects_out_of_the_collector(sock_path, tmp_path):
    """`failoverd serve` tunes the cycle collector once it has started: what start-up
    built is frozen (never walked again) and the first generation is larger."""
    config = tmp_path / "failoverd.toml"
    config.write_text(
        f'[daemon]\nsocket = "{sock_path}"\nledger = "{tmp_path / "ledger.jsonl"}"\n'
        '[providers.local]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[routes.r]\nchain = ["local/m"]\n')
    proc = subprocess.Popen([sys.executable, "-c", "import failoverd; failoverd.cli()", "serve",
                             "--config", str(config), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx2.Client(transport=httpx2.HTTPTransport(uds=sock_path),
                          base_url="http://failoverd", timeout=5) as client:
            status = None
            for _ in range(200):  # start-up takes ~0.2 s; allow 20 s on a loaded machine
                if proc.poll() is not None:
                    break
                try:  # the socket file exists from bind(), before listen(): ask, not look
                    status = client.get("/status").json()
                    break
                except httpx2.TransportError:
                    time.sleep(0.1)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert status is not None, output
    assert status["gc"]["threshold"] == list(fo.GC_THRESHOLD), output
    assert status["gc"]["frozen_objects"] > 10_000  # modules, config, pools: ~45,000
