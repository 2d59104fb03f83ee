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

import pytest
import trio
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
