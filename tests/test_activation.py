"""Socket activation across restarts, and what the daemon tells systemd.

The restart test holds a bound, listening Unix socket as failoverd.socket does and runs
`failoverd serve` on it three times in a row (LISTEN_FDS/LISTEN_PID, through an exec
wrapper so that LISTEN_PID is the daemon's own pid) while clients keep connecting.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import trio
import trio.testing
from conftest import ClientResult, http_request, read_response

import failoverd as fo

# What systemd does for a socket-activated service: the listening socket on fd 3,
# LISTEN_FDS and LISTEN_PID in the environment of the very process it starts.
ACTIVATE = """\
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="failoverd.socket")
os.execv(sys.executable, [sys.executable, "-m", "failoverd", *sys.argv[2:]])
"""


@pytest.fixture
def sock_dir():
    return tempfile.mkdtemp(dir="/tmp")  # AF_UNIX paths must stay short


def bound_socket(path: str) -> socket.socket:
    """The socket failoverd.socket holds: bound, listening, owned by 'systemd' (the test)."""
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(path)
    listening.listen(socket.SOMAXCONN)
    return listening


def write_config(directory: str, base_url: str, sock: str) -> str:
    path = os.path.join(directory, "failoverd.toml")
    with open(path, "w") as f:
        f.write(f'[daemon]\nsocket = "{sock}"\nledger = "{directory}/ledger.jsonl"\n'
                'shutdown_grace_s = 10\n'
                'shed_lag_s = 0\n'  # no load shedding on a busy test machine
                f'[providers.up]\nbase_url = "{base_url}"\n'
                '[routes.r]\nchain = ["up/m"]\n')
    return path


def activated(listening: socket.socket, config: str) -> subprocess.Popen[bytes]:
    fd = listening.fileno()
    return subprocess.Popen([sys.executable, "-c", ACTIVATE, str(fd), "serve", "--config", config,
                             "--quiet"], pass_fds=[fd], stderr=subprocess.PIPE)


async def one_request(path: str, n: int, pause: float) -> ClientResult:
    """A fresh connection per request, as an agent that does not keep its connection;
    `pause` between connecting and sending (a connection accepted just before a stop)."""
    body = {"model": "r", "stream": n % 2 == 0, "messages": [{"role": "user", "content": "hi"}]}
    stream = await trio.open_unix_socket(path)
    async with stream:
        await trio.sleep(pause)
        await stream.send_all(http_request(body, headers={"connection": "close"}))
        return await read_response(stream, ClientResult())


async def test_restarts_behind_an_inherited_socket_refuse_no_connection(sock_dir):
    upstream = fo.FakeUpstream(lambda model, body, n: fo.token_script(
        ["hello", " there"], gap=0.05))
    path = os.path.join(sock_dir, "failoverd.sock")
    listening = bound_socket(path)
    results: list[ClientResult] = []
    failures: list[BaseException] = []
    stopping = trio.Event()
    progress = [trio.Event()]  # set at each answer

    async def client(pause: float) -> None:
        while not stopping.is_set():
            try:
                results.append(await one_request(path, len(results), pause))
                progress[0].set()
                progress[0] = trio.Event()
            except (OSError, trio.BrokenResourceError) as e:  # refused, reset, socket gone
                failures.append(e)

    async def served_some(since: int) -> None:
        while len(results) < since + 5:
            await progress[0].wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.serve)
        config = write_config(sock_dir, upstream.base_url, path)
        with trio.fail_after(90):
            daemon = activated(listening, config)
            for pause in (0, 0, 0.2, 0.2):
                nursery.start_soon(client, pause)
            for restart in range(2):
                await served_some(len(results))
                daemon.send_signal(signal.SIGTERM)  # systemctl restart: stop ...
                assert await trio.to_thread.run_sync(daemon.wait) == 0, daemon.stderr.read()
                daemon.stderr.close()
                # ... the socket stays: systemd's, not the daemon's to remove
                assert stat.S_ISSOCK(os.lstat(path).st_mode), f"gone after stop {restart + 1}"
                daemon = activated(listening, config)  # ... and start
            await served_some(len(results))
            stopping.set()
        daemon.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(daemon.wait) == 0, daemon.stderr.read()
        daemon.stderr.close()
        nursery.cancel_scope.cancel()
    listening.close()

    assert failures == []
    assert len(results) >= 15
    assert [r.body for r in results if r.status != 200] == []
    assert {r.text for r in results} == {"hello there"}
    requests = [row for _, row in fo.read_ledger(os.path.join(sock_dir, "ledger.jsonl"))
                if isinstance(row, fo.RequestRow)]
    assert len(requests) == len(results)  # every request answered, each by one daemon
    assert {r.status for r in requests} == {200}


# -- what systemd is told ---------------------------------------------------------------


@pytest.fixture
def notify_socket(sock_dir, monkeypatch):
    """A fake NOTIFY_SOCKET: the datagram socket systemd listens on."""
    path = os.path.join(sock_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def parsed(message: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.decode().split("\n"))


async def notifications(sock: socket.socket, n: int) -> list[dict[str, str]]:
    tsock = trio.socket.from_stdlib_socket(sock.dup())
    with tsock, trio.fail_after(30):
        return [parsed(await tsock.recv(65536)) for _ in range(n)]


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


GOOD_RELOAD = ('[providers.a]\nbase_url = "http://a.test/v1"\n'
               '[routes.r]\nchain = ["a/m1"]\n[routes.s]\nchain = ["a/m1"]\n')


async def test_reload_tells_systemd_reloading_then_ready(notify_socket, tmp_path, nursery):
    sock = notify_socket
    config = tmp_path / "failoverd.toml"
    config.write_text(GOOD_RELOAD)
    d = fo.Daemon(fo.parse_config(GOOD_RELOAD.split("[routes.s]")[0]),
                  ledger=fo.Ledger(str(tmp_path / "ledger.jsonl")))
    nursery.start_soon(fo._watch_signals, d, str(config))
    await trio.testing.wait_all_tasks_blocked()
    before = monotonic_usec()
    os.kill(os.getpid(), signal.SIGHUP)  # systemctl reload
    reloading, ready = await notifications(sock, 2)
    assert reloading.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    assert ready == {"READY": "1", "STATUS": "serving 2 route(s), 1 provider(s)"}
    assert sorted(d.routes) == ["r", "s"]


async def test_a_rejected_reload_is_reported_in_status_and_logged(
        notify_socket, tmp_path, nursery, caplog):
    sock = notify_socket
    config = tmp_path / "failoverd.toml"
    config.write_text(GOOD_RELOAD.replace('chain = ["a/m1"]\n[routes.s]', 'chain = ["x/m"]\n'
                                          '[routes.s]\nchain_ = 1'))
    d = fo.Daemon(fo.parse_config(GOOD_RELOAD), ledger=fo.Ledger(str(tmp_path / "ledger.jsonl")))
    nursery.start_soon(fo._watch_signals, d, str(config))
    await trio.testing.wait_all_tasks_blocked()
    os.kill(os.getpid(), signal.SIGHUP)
    reloading, ready = await notifications(sock, 2)
    assert reloading["RELOADING"] == "1"
    assert ready["READY"] == "1"
    status = ready["STATUS"]
    assert status.startswith(f"reload rejected, still serving the previous config: {config}: ")
    assert "routes.r.chain[0] = 'x/m'" in status
    assert "routes.s.chain_" in status  # every error, on one line
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "reload failed, still serving the previous config" in record.getMessage()
    assert "routes.r.chain[0]" in record.getMessage()
    assert sorted(d.routes) == ["r", "s"]  # the previous config still serves


def test_serve_tells_systemd_ready_reloading_and_stopping(notify_socket, sock_dir, tmp_path):
    """The real `failoverd serve`: READY=1 once it listens, RELOADING=1 / READY=1 around a
    SIGHUP, STOPPING=1 on SIGTERM."""
    sock = notify_socket
    sock.settimeout(30)
    config = write_config(sock_dir, "http://127.0.0.1:9/v1", os.path.join(sock_dir, "fo.sock"))
    proc = subprocess.Popen([sys.executable, "-m", "failoverd", "serve", "--config", config,
                             "--quiet"], stderr=subprocess.PIPE)
    try:
        seen = [parsed(sock.recv(65536))]
        proc.send_signal(signal.SIGHUP)
        seen += [parsed(sock.recv(65536)) for _ in range(2)]
        proc.send_signal(signal.SIGTERM)
        seen.append(parsed(sock.recv(65536)))
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        stderr = proc.communicate()[1].decode()
    assert [next(iter(m)) for m in seen] == ["READY", "RELOADING", "READY", "STOPPING"], stderr
    assert seen[0]["STATUS"] == seen[2]["STATUS"] == "serving 1 route(s), 1 provider(s)"
