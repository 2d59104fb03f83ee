"""`[daemon] allow_uids` / `allow_gids`: who may call, by SO_PEERCRED. A peer outside
them gets 403 and a log line, nothing of its request reaches an upstream, and the ledger
records the refusal without the request's content."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import httpx2
import msgspec
import pytest
import trio
from conftest import Harness, MockUpstreams, http_request, make_config, ok_script

import failoverd as fo

OUTSIDER = fo.Peer(pid=777, uid=2000, gid=2000)
SECRET_PROMPT = "the quarterly numbers, unreleased"


def guarded(tmp_path, nursery, **allow: list[int]) -> Harness:
    cfg = make_config({"r": ["a/m1"]}, ledger=str(tmp_path / "ledger.jsonl"))
    cfg = msgspec.structs.replace(cfg, daemon=msgspec.structs.replace(cfg.daemon, **allow))
    return Harness(cfg, MockUpstreams({"a/m1": ok_script("served")}),
                   str(tmp_path / "ledger.jsonl"), nursery)


def chat_request() -> bytes:
    return http_request({"model": "r", "messages": [{"role": "user", "content": SECRET_PROMPT}]})


async def test_a_peer_outside_the_allowed_uids_gets_403_and_reaches_no_upstream(
        tmp_path, nursery, caplog):
    h = guarded(tmp_path, nursery, allow_uids=[1000])

    result = await h.send(chat_request(), OUTSIDER)

    assert result.status == 403
    assert result.headers["connection"] == "close"
    error = result.json["error"]
    assert (error["type"], error["code"]) == ("permission_error", "peer_not_allowed")
    assert "uid 2000, gid 2000 may not call this failoverd" in error["message"]
    assert h.upstreams.calls == []
    [row] = h.rows()
    assert (row["kind"], row["status"], row["attempts"], row["client_uid"],
            row["client_pid"]) == ("request", 403, 0, 2000, 777)
    assert row["route"] == ""  # the body was never read: not even the route is known
    with open(h.ledger_path) as f:  # noqa: ASYNC230 -- a test reading its ledger
        assert SECRET_PROMPT not in f.read()
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert line.startswith("refused a request from pid 777 uid 2000 gid 2000: not in "
                           "daemon.allow_uids / allow_gids")
    assert SECRET_PROMPT not in caplog.text


async def test_every_endpoint_is_closed_to_an_outside_peer(tmp_path, nursery):
    h = guarded(tmp_path, nursery, allow_gids=[50])

    for path in ("/status", "/v1/models", "/healthz"):
        result = await h.send(http_request(b"", path=path, method="GET"), OUTSIDER)
        assert result.status == 403, path


@pytest.mark.parametrize(("allow", "peer"), [
    pytest.param({"allow_uids": [2000]}, OUTSIDER, id="uid listed"),
    pytest.param({"allow_gids": [2000]}, OUTSIDER, id="primary group listed"),
    pytest.param({"allow_gids": [60]}, fo.Peer(777, 2000, 2000, (10, 60)),
                 id="supplementary group listed"),
    pytest.param({"allow_uids": [1], "allow_gids": [60]}, fo.Peer(777, 2000, 60),
                 id="either list admits"),
    pytest.param({}, OUTSIDER, id="no lists: the socket's mode decides"),
])
async def test_a_listed_peer_is_served(tmp_path, nursery, allow, peer):
    h = guarded(tmp_path, nursery, **allow)

    result = await h.send(chat_request(), peer)

    assert (result.status, result.text) == (200, "served")


@pytest.mark.parametrize("peer", [
    pytest.param(fo.Peer(777, 2000, 2000, (10, 61)), id="other groups"),
    pytest.param(fo.Peer(), id="no credentials"),
])
async def test_an_unlisted_peer_is_refused(tmp_path, nursery, peer):
    h = guarded(tmp_path, nursery, allow_uids=[1000], allow_gids=[60])

    assert (await h.send(chat_request(), peer)).status == 403


async def test_refusals_are_logged_once_a_minute_per_uid_and_each_is_a_row(
        tmp_path, nursery, caplog, autojump_clock, monkeypatch):
    h = guarded(tmp_path, nursery, allow_uids=[1000])
    now = [1000.0]
    monkeypatch.setattr(fo.time, "monotonic", lambda: now[0])

    for _ in range(3):
        await h.send(chat_request(), OUTSIDER)
    now[0] += fo.REFUSAL_LOG_EVERY_S
    await h.send(chat_request(), OUTSIDER)

    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2
    assert "(2 more from this uid since the last such line)" in lines[1]
    assert len(h.rows("request")) == 4


def test_allow_lists_and_a_tcp_listener_do_not_mix():
    with pytest.raises(fo.ConfigError, match="daemon.tcp = '127.0.0.1:8411': cannot be combined"):
        fo.parse_config('[daemon]\ntcp = "127.0.0.1:8411"\nallow_gids = [100]\n')


# -- over a real Unix socket -----------------------------------------------------------------


@pytest.fixture
def sock_dir():
    directory = tempfile.mkdtemp(dir="/tmp")  # AF_UNIX paths must stay short
    os.chmod(directory, 0o755)  # another user may reach the socket
    yield directory
    shutil.rmtree(directory)


async def serve_guarded(sock_dir: str, nursery: trio.Nursery, **allow: list[int]) -> fo.Daemon:
    upstream = fo.FakeUpstream(lambda model, body, n: ok_script("served over the socket"))
    await nursery.start(upstream.serve)
    sock = os.path.join(sock_dir, "fo.sock")
    cfg = fo.Config(daemon=fo.DaemonConfig(socket=sock, ledger=f"{sock_dir}/ledger.jsonl",
                                           socket_mode="0666", **allow),
                    providers={"up": fo.ProviderConfig(base_url=upstream.base_url)},
                    routes={"r": fo.RouteConfig(chain=["up/m"])})
    d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger))
    await nursery.start(fo.serve, d, [await fo.open_unix_listener(sock, "0666")])
    return d


async def post(sock: str) -> httpx2.Response:
    transport = httpx2.AsyncHTTPTransport(uds=sock)
    async with httpx2.AsyncClient(transport=transport, base_url="http://fo") as client:
        return await client.post("/v1/chat/completions", json={
            "model": "r", "messages": [{"role": "user", "content": SECRET_PROMPT}]})


async def test_the_unix_socket_checks_the_callers_real_credentials(sock_dir, nursery):
    d = await serve_guarded(sock_dir, nursery, allow_uids=[os.getuid() + 1])
    config = os.path.join(sock_dir, "failoverd.toml")
    with open(config, "w") as f:  # noqa: ASYNC230 -- test setup
        f.write(f'[daemon]\nsocket = "{d.cfg.daemon.socket}"\nledger = "{d.cfg.daemon.ledger}"\n'
                f'allow_gids = [{os.getgid()}]\n[providers.up]\n'
                f'base_url = "{d.cfg.providers["up"].base_url}"\n[routes.r]\nchain = ["up/m"]\n')
    with trio.fail_after(10):
        refused = await post(d.cfg.daemon.socket)
        assert d.reload(config) is None  # SIGHUP: the new lists apply to the next request
        served = await post(d.cfg.daemon.socket)
    assert refused.status_code == 403
    assert f"uid {os.getuid()}, gid {os.getgid()} may not" in refused.json()["error"]["message"]
    assert (served.status_code, served.json()["choices"][0]["message"]["content"]) == (
        200, "served over the socket")
    rows = [r for _, r in fo.read_ledger(d.cfg.daemon.ledger) if isinstance(r, fo.RequestRow)]
    assert [(r.status, r.client_uid) for r in rows] == [(403, os.getuid()), (200, os.getuid())]
    d.shutdown.set()


CLIENT = """\
import sys, httpx2
t = httpx2.HTTPTransport(uds=sys.argv[1])
r = httpx2.Client(transport=t).get("http://fo/v1/models")
print(r.status_code)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="acting as another user with other groups needs root and setpriv")
@pytest.mark.parametrize(("groups", "status"), [("4321,77", "200"), ("77", "403")])
async def test_a_supplementary_group_of_another_user_admits_it(sock_dir, nursery, groups,
                                                               status):
    d = await serve_guarded(sock_dir, nursery, allow_gids=[4321])
    with trio.fail_after(20):
        done = await trio.run_process(
            ["setpriv", "--reuid=65534", "--regid=65534", f"--groups={groups}",
             sys.executable, "-c", CLIENT, d.cfg.daemon.socket],
            capture_stdout=True, capture_stderr=True, check=False)
    assert done.stdout.decode().strip() == status, done.stderr.decode()
    d.shutdown.set()
