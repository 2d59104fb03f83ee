"""`GET /status` and `failoverd status`: breakers, in-flight requests, divisors."""

from __future__ import annotations

import re
import tempfile

import trio
from click.testing import CliRunner
from conftest import ok_script
from test_engine import HUNG, respond

import failoverd as fo


async def test_status_shows_breakers_and_in_flight_requests(harness, autojump_clock, nursery):
    h = harness({"a/m1": respond(401), "b/m2": HUNG})
    nursery.start_soon(h.chat)
    await trio.sleep(1.0)  # a failed with 401; the request now waits on hung b
    status = h.d.status()
    [inflight] = status["in_flight"]
    # a's row and b, still running, make 2 attempts
    assert (inflight["route"], inflight["slot"], inflight["attempts"], inflight["age_s"],
            inflight["left_s"]) == ("r", "b/m2", 2, 1.0, 299.0)
    [credential] = [b for b in status["breakers"] if b["scope"] == "credential"]
    assert credential["state"] == "open"
    assert credential["open_until"].endswith("Z")
    text = "\n".join(fo.format_status(status, width=100, now=fo.time.time())) + "\n"
    assert "in flight: 1" in text
    assert re.search(r"\w{16} +r +b/m2 +2 +1 s +4 min 59 s\n", text)
    assert re.search(r"credential a:\w+ +open, 14 min 59 s left +0/0 +credential isolated: "
                     r"HTTP 401", text)
    # The route view: a is out for its credential, b answers (and hangs, for now).
    assert re.search(r"r +0 a/m1 +open, 14 min 59 s left \(credential a:\w+: credential "
                     r"isolated", text)
    assert re.search(r" +1 b/m2 +answers now\n", text)


def test_relative_times():
    assert [fo.relative(s) for s in (0, 0.4, 46, 59.6, 60, 185, 3600, 7440, 86400 + 4 * 3600,
                                     -5)] == [
        "0 s", "0 s", "46 s", "1 min", "1 min", "3 min 5 s", "1 h", "2 h 4 min", "1 d 4 h",
        "0 s"]


async def test_route_view_names_the_slot_that_would_answer_without_moving_a_breaker(
        harness, autojump_clock):
    h = harness({"a/m1": HUNG, "b/m2": ok_script(), "c/m3": HUNG},
                routes={"r": ["a/m1", "b/m2"], "lone": ["c/m3"]})
    for _ in range(3):  # a and c hang three times: their breakers open for 5 s
        async with trio.open_nursery() as both:
            both.start_soon(h.chat)
            both.start_soon(h.chat, "lone")
    now = trio.current_time()
    [lone, r] = fo.route_view(h.d, now)
    assert (r["answers"], r["how"]) == ("b/m2", "ok")
    assert r["slots"][0]["state"] == "open"
    assert (lone["answers"], lone["how"]) == ("c/m3", "forced probe")
    await trio.sleep(10)  # both cooldowns are over: the next requests probe
    rows_before = len(h.rows())
    [lone, r] = fo.route_view(h.d, trio.current_time())
    assert (r["answers"], r["how"], r["slots"][0]["state"]) == ("a/m1", "probe", "probe")
    assert (lone["answers"], lone["how"]) == ("c/m3", "probe")
    # Nothing moved: no probe claimed, no transition written.
    assert [b.state for b in h.d.health.breakers.values() if b.state != "closed"] == \
        ["open"] * 4
    assert not any(b.probing for b in h.d.health.breakers.values())
    assert len(h.rows()) == rows_before
    text = "\n".join(fo.format_status(h.d.status(), width=100)) + "\n"
    assert re.search(r" a/m1 +answers now: its probe \(half-open\)", text)


async def test_a_closed_breaker_shows_no_old_reason(harness, autojump_clock):
    h = harness({"a/m1": [HUNG, HUNG, HUNG, ok_script()], "b/m2": ok_script()})
    for _ in range(3):
        await h.chat()
    await trio.sleep(10)
    await h.chat()  # the probe succeeds: closed again
    status = h.d.status()
    [provider] = [b for b in status["breakers"] if b["key"] == "a"]
    assert provider["state"] == "closed"
    text = "\n".join(fo.format_status(status, width=100)) + "\n"
    assert "consecutive failures" not in text
    assert re.search(r"provider +a +closed +0/\d+\n", text)  # and no reason after it


async def test_status_fits_the_width_with_long_names(harness, autojump_clock, nursery):
    long = "b/" + "x" * 58
    h = harness({"a/m1": HUNG, long: respond(401)}, routes={"desk": ["a/m1", long]})
    for _ in range(3):
        await h.chat("desk")
    nursery.start_soon(h.chat, "desk")
    await trio.sleep(1)
    status = h.d.status()
    for width in (80, 120):
        lines = fo.format_status(status, width=width)
        assert max(len(line) for line in lines) <= width
        assert "x" * 30 in "".join(lines)


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
            async with fo.httpx2.AsyncClient(transport=fo.httpx2.AsyncHTTPTransport(uds=sock),
                                            base_url="http://failoverd") as client:
                r = await client.post("/v1/chat/completions", json={
                    "model": "r", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
            result = await trio.to_thread.run_sync(
                lambda: CliRunner().invoke(fo.cli, ["status", "--socket", sock, "--width", "120"]))
        assert result.exit_code == 0, result.output
        assert "in flight: 0" in result.output
        assert re.search(r"credential +a +open, 1[45] min( 5\d s)? left", result.output)
        assert re.search(r"r +0 a/m1 +open, 1[45] min( 5\d s)? left", result.output)
        assert re.search(r" +1 b/m2 +answers now", result.output)
        as_json = await trio.to_thread.run_sync(
            lambda: CliRunner().invoke(fo.cli, ["status", "--socket", sock, "--json"]))
        raw = fo.msgspec.json.decode(as_json.output)
        assert raw["breakers"]
        assert {"in_flight", "breakers", "token_divisors", "routes", "time"} <= set(raw)
        d.shutdown.set()
        nursery.cancel_scope.cancel()


def test_status_command_explains_an_unreachable_daemon():
    result = CliRunner().invoke(fo.cli, ["status", "--socket", "/nonexistent/fo.sock"])
    assert result.exit_code == 1
    assert "cannot reach the daemon at /nonexistent/fo.sock" in result.output


async def test_when_every_slot_is_out_the_view_names_the_one_closest_to_recovery(
        harness, autojump_clock):
    h = harness({})
    now = trio.current_time()
    for provider, left in (("a", 50.0), ("b", 20.0)):
        b = fo.Breaker()
        b.state, b.open_until, b.reason = "open", now + left, "3 consecutive failures"
        h.d.health.breakers[("provider", provider)] = b
    [r] = fo.route_view(h.d, now)
    assert (r["answers"], r["how"]) == ("b/m2", "forced probe")
    assert [(s["state"], s["left_s"], s["breaker"]) for s in r["slots"]] == [
        ("open", 50.0, "provider a"), ("open", 20.0, "provider b")]
    text = "\n".join(fo.format_status(h.d.status(), width=120))
    assert "answers now: every slot is out, this one is closest to recovery" in text


async def test_a_hedged_request_shows_both_slots_it_races(harness, autojump_clock, nursery):
    h = harness({"a/m1": HUNG, "b/m2": HUNG}, hedge_after_s=2.0, hedge_max_share=1.0)
    nursery.start_soon(h.chat)
    await trio.sleep(3.0)  # a got no token in 2 s: b was started beside it
    [inflight] = h.d.status()["in_flight"]
    assert inflight["racing"] == ["a/m1", "b/m2"]
    text = "\n".join(fo.format_status(h.d.status(), width=100))
    assert re.search(r"\w{16} +r +a/m1 \+ b/m2 +", text)


def test_a_half_open_breaker_with_its_probe_out_says_so():
    status = {"version": "x", "uptime_s": 1, "in_flight": [], "breakers": [
        {"scope": "provider", "key": "a", "state": "half_open", "failures_in_window": 3,
         "calls_in_window": 3, "open_until": None, "probing": True,
         "last_reason": "3 consecutive failures"}]}
    text = "\n".join(fo.format_status(status, width=100, now=0))
    assert re.search(r"provider +a +half-open, probing +3/3 3 consecutive failures", text)
