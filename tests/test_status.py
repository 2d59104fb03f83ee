"""`GET /status` and `failoverd status`: breakers, in-flight requests, divisors."""

from __future__ import annotations

import tempfile

import trio
from click.testing import CliRunner
from test_engine import HUNG, respond

import failoverd as fo


async def test_status_shows_breakers_and_in_flight_requests(harness, autojump_clock, nursery):
    h = harness({"a/m1": respond(401), "b/m2": HUNG})
    nursery.start_soon(h.chat)
    await trio.sleep(1.0)  # a failed with 401; the request now waits on hung b
    status = h.d.status()
    [inflight] = status["in_flight"]
    # a's row and b, still running, make 2 attempts
    assert (inflight["route"], inflight["slot"], inflight["attempts"], inflight["age_s"]) == \
        ("r", "b/m2", 2, 1.0)
    [credential] = [b for b in status["breakers"] if b["scope"] == "credential"]
    assert credential["state"] == "open"
    assert credential["open_until"].endswith("Z")
    text = "\n".join(fo.format_status(status))
    assert "in flight: 1" in text
    assert "on b/m2" in text
    assert "credential" in text
    assert "open until" in text
    assert "HTTP 401" in text


async def test_status_command_reads_a_running_daemon(tmp_path):
    upstream = fo.FakeUpstream(lambda model, body, n: fo.token_script(["ok"]) if model == "m2"
                               else [("respond", 401, {}, b'{"error":{"message":"bad key"}}')])
    sock = tempfile.mkdtemp(dir="/tmp") + "/fo.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.serve)
        cfg = fo.Config(
            daemon=fo.DaemonConfig(socket=sock, ledger=str(tmp_path / "ledger.jsonl")),
            providers={"a": fo.ProviderConfig(base_url=upstream.base_url),
                       "b": fo.ProviderConfig(base_url=upstream.base_url)},
            routes={"r": fo.RouteConfig(chain=["a/m1", "b/m2"])})
        d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger))
        await nursery.start(fo.serve, d, [await fo.open_unix_listener(sock, "0600")])
        with trio.fail_after(20):
            async with fo.httpx.AsyncClient(transport=fo.httpx.AsyncHTTPTransport(uds=sock),
                                            base_url="http://failoverd") as client:
                r = await client.post("/v1/chat/completions", json={
                    "model": "r", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
            result = await trio.to_thread.run_sync(
                lambda: CliRunner().invoke(fo.cli, ["status", "--socket", sock]))
        assert result.exit_code == 0, result.output
        assert "in flight: 0" in result.output
        assert "credential" in result.output
        assert "open" in result.output
        as_json = await trio.to_thread.run_sync(
            lambda: CliRunner().invoke(fo.cli, ["status", "--socket", sock, "--json"]))
        assert fo.msgspec.json.decode(as_json.output)["breakers"]
        d.shutdown.set()
        nursery.cancel_scope.cancel()


def test_status_command_explains_an_unreachable_daemon():
    result = CliRunner().invoke(fo.cli, ["status", "--socket", "/nonexistent/fo.sock"])
    assert result.exit_code == 1
    assert "cannot reach the daemon at /nonexistent/fo.sock" in result.output
