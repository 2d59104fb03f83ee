"""The engine as a race (SPEC section 9), in virtual time over kernel socket pairs.

Hedging, probes raced against the next slot, a flapping primary, config reloads under
flight, and the defects the race rewrite fixed. Route "r" is a/m1 -> b/m2 unless a
scenario says otherwise.
"""

from __future__ import annotations

import h11
import msgspec
import pytest
import trio
import trio.testing
from conftest import ClientResult, http_request, ok_script, read_response, socket_pair
from test_engine import HUNG, respond

import failoverd as fo

HEDGE = {"hedge_after_s": 2.0, "hedge_max_share": 1.0}


def reload_to(h, tmp_path, providers: dict[str, str], chain: list[str], *,
              daemon: str = "") -> None:
    """Reload `h`'s daemon with a config of these providers (name: its TOML lines; the
    base_url is http://NAME.test/v1 unless they give one) and route r = `chain`; the
    ledger stays the test's unless `daemon` says otherwise."""
    daemon = daemon or f'ledger = "{h.ledger_path}"\n'
    config = tmp_path / "new.toml"
    config.write_text(f"[daemon]\n{daemon}" + "".join(
        f"[providers.{name}]\n" + ("" if "base_url" in lines
                                   else f'base_url = "http://{name}.test/v1"\n') + lines
        for name, lines in providers.items())
        + f"[routes.r]\nchain = {msgspec.json.encode(chain).decode()}\n")
    assert h.d.reload(str(config)) is None  # None: reloaded


def rows_by_slot(h) -> dict[str, dict]:
    return {f"{r['provider']}/{r['model']}": r for r in h.rows("attempt")}


# -- hedging ---------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
async def test_a_hedge_answers_when_the_primary_is_slow_and_the_loser_is_cancelled(
        harness, autojump_clock, stream):
    h = harness({"a/m1": ok_script("slow a", first=5.0), "b/m2": ok_script("quick b", first=0.5)},
                **HEDGE)
    r = await h.chat(stream=stream)
    assert (r.status, r.text, r.t_first) == (200, "quick b", 2.5)
    assert h.upstreams.calls == [(0.0, "a/m1"), (2.0, "b/m2")]
    assert (2.5, "a/m1") in h.upstreams.closed  # the loser is cancelled at the win
    assert r.headers["x-failoverd-attempts"] == "2"
    assert r.headers["x-failoverd-served-by"] == "b/m2"
    rows = rows_by_slot(h)
    assert (rows["a/m1"]["outcome"], rows["a/m1"]["latency_ms"], rows["a/m1"]["hedge"]) == \
        ("hedge_lost", 2500.0, False)
    assert (rows["b/m2"]["outcome"], rows["b/m2"]["attempt"], rows["b/m2"]["hedge"]) == \
        ("ok", 1, True)
    [req] = h.rows("request")
    assert (req["served_by"], req["attempts"], req["ttft_ms"]) == ("b/m2", 2, 2500.0)
    assert not any(b.failures for b in h.d.health.breakers.values())  # losing is no failure


async def test_the_primary_can_still_win_after_the_hedge_starts(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a", first=3.0), "b/m2": ok_script("b", first=5.0)}, **HEDGE)
    r = await h.chat(stream=True)
    assert (r.text, r.t_first) == ("a", 3.0)
    assert (3.0, "b/m2") in h.upstreams.closed
    rows = rows_by_slot(h)
    assert (rows["a/m1"]["outcome"], rows["b/m2"]["outcome"]) == ("ok", "hedge_lost")


async def test_no_hedge_when_the_primary_answers_in_time(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a", first=1.9, gap=5.0), "b/m2": ok_script("b")}, **HEDGE)
    r = await h.chat(stream=True)
    assert r.text == "a"
    assert h.upstreams.keys_called() == ["a/m1"]  # only before commit: never after output


async def test_at_most_one_hedge_per_request(harness, autojump_clock):
    slow = ok_script("late", first=10.0)
    h = harness({"a/m1": slow, "b/m2": slow, "c/m3": ok_script("c")},
                routes={"r": ["a/m1", "b/m2", "c/m3"]}, **HEDGE)
    r = await h.chat()
    assert (r.text, r.t_first) == ("late", 10.0)
    assert h.upstreams.calls == [(0.0, "a/m1"), (2.0, "b/m2")]


async def test_a_primary_that_fails_while_its_hedge_runs_starts_nothing_more(harness,
                                                                            autojump_clock):
    h = harness({"a/m1": [("sleep", 3.0), *respond(503)], "b/m2": ok_script("b", first=2.0),
                 "c/m3": ok_script("c")},
                routes={"r": ["a/m1", "b/m2", "c/m3"]}, retry_same=0, **HEDGE)
    r = await h.chat()
    assert (r.text, r.t_first) == ("b", 4.0)
    assert h.upstreams.calls == [(0.0, "a/m1"), (2.0, "b/m2")]  # the hedge is the next slot


async def test_a_failed_hedge_starts_the_next_slot_at_once(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a", first=20.0), "b/m2": respond(400, {"error": {
        "message": "x", "code": "model_not_found"}}), "c/m3": ok_script("c", first=1.0)},
        routes={"r": ["a/m1", "b/m2", "c/m3"]}, **HEDGE)
    r = await h.chat()
    assert (r.text, r.t_first) == ("c", 3.0)
    assert h.upstreams.calls == [(0.0, "a/m1"), (2.0, "b/m2"), (2.0, "c/m3")]
    assert [o for _, o in h.outcomes()] == ["not_found", "ok", "hedge_lost"]


async def test_a_hedge_winner_that_fails_before_commit_fails_over_invisibly(harness,
                                                                            autojump_clock):
    stalls = [("head", 200, {}), ("sleep", 0.5), ("sse", fo.sse_chunk("partial")), ("hang",)]
    h = harness({"a/m1": ok_script("a", first=10.0), "b/m2": stalls, "c/m3": ok_script("c")},
                routes={"r": ["a/m1", "b/m2", "c/m3"]}, stall_timeout_s=5.0, **HEDGE)
    r = await h.chat(stream=False)
    assert (r.status, r.text) == (200, "c")
    assert h.upstreams.calls == [(0.0, "a/m1"), (2.0, "b/m2"), (7.5, "c/m3")]
    assert [o for _, o in h.outcomes()] == ["hedge_lost", "stall_timeout", "ok"]


async def test_hedges_stay_within_the_routes_share(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a", first=5.0), "b/m2": ok_script("b")},
                hedge_after_s=2.0, hedge_max_share=0.5)
    texts = []
    for _ in range(4):
        texts.append((await h.chat()).text)
    # One hedge per two requests in the minute: the 1st may not (1 > 0.5 x 1), the 2nd
    # may (1 <= 0.5 x 2), the 3rd may not (2 > 1.5), the 4th may (2 <= 2).
    assert texts == ["a", "b", "a", "b"]


def test_hedge_window_counts_the_last_minute():
    w = fo.HedgeWindow()
    for t in (0.0, 1.0):
        w.request(t)
    assert w.may_hedge(1.0, 0.5)
    w.hedge(1.0)
    w.request(2.0)
    assert not w.may_hedge(2.0, 0.5)  # 2 hedges of 3 requests would be 0.67
    for t in (60.5, 61.5):
        w.request(t)
    assert w.may_hedge(61.5, 0.5)  # the minute-old requests and the hedge are gone


# -- probes never cost a client a deadline -----------------------------------------

async def test_a_flapping_primary_is_probed_once_per_cooldown_and_back_soon(harness,
                                                                         autojump_clock):
    h = harness({"a/m1": lambda now: respond(503) if now < 60.0 else ok_script("primary"),
                 "b/m2": ok_script("fallback")})
    served = []
    for i in range(26):  # a request every 4 s for 100 s
        await trio.sleep_until(4.0 * i)
        r = await h.chat()
        served.append((4.0 * i, r.status, r.headers["x-failoverd-served-by"], r.t_first))
    assert all(status == 200 for _, status, _, _ in served)  # served throughout
    assert all(t_first - t < 1.0 for t, _, _, t_first in served)  # never a deadline paid
    back = next(t for t, _, key, _ in served if key == "a/m1" and t >= 60.0)
    assert back - 60.0 <= 10.0
    assert all(key == "a/m1" for t, _, key, _ in served if t >= back)
    # a/m1 is tried at 0 s and retried at 0.3 s, opening; then only probes, each at the
    # first request after its cooldown (1, 2, 4, then 5 s, jitter at its middle): 4, 8,
    # 12, then every other request, 16 ... 56; it answers the probe at 64 s.
    assert [t for t, key in h.upstreams.calls if key == "a/m1" and t < 64.0] == \
        [0.0, 0.3, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 40.0, 48.0, 56.0]
    assert back == 64.0
    # At most one probe per cooldown: every probe starts after the previous one
    # reopened the breaker, and none while it was open.
    opens = [b for b in h.rows("breaker") if b["scope"] == "model" and b["to"] == "open"]
    probes = [r for r in h.rows("attempt") if r["probe"]]
    # The first open came from failures; each later one from a failed probe, and the
    # last probe closed it: one probe per cooldown.
    assert len(probes) == len(opens)
    assert [(b["from"], b["to"]) for b in h.rows("breaker") if b["scope"] == "model"][-2:] == \
        [("open", "half_open"), ("half_open", "closed")]


async def test_a_primary_back_from_ten_minutes_down_serves_within_ten_seconds(harness,
                                                                            autojump_clock):
    h = harness({"a/m1": lambda now: respond(503) if now < 600.0 else ok_script("primary"),
                 "b/m2": ok_script("fallback")})
    served = []
    for i in range(161):  # a request every 4 s for 640 s
        await trio.sleep_until(4.0 * i)
        r = await h.chat()
        served.append((4.0 * i, r.headers["x-failoverd-served-by"], r.t_first - 4.0 * i))
    assert max(wait for _, _, wait in served) < 1.0  # no client paid for the outage
    # The cooldown stays at its 5 s bound however long the outage: a probe every other
    # request (16, 24 ... 592), never a growing gap; the one at 600 s finds it back.
    tried = [t for t, key in h.upstreams.calls if key == "a/m1" and t >= 16.0]
    assert tried == [16.0 + 8.0 * i for i in range(74)] + [604.0 + 4.0 * i for i in range(10)]
    assert [t for t, key, _ in served if key == "a/m1"] == [600.0 + 4.0 * i for i in range(11)]


def test_cooldowns_are_bounded_so_recovery_is_seen_within_ten_seconds():
    cfg = fo.BreakerConfig()
    assert cfg.cooldown_max_s * (1 + cfg.jitter) <= 6.0  # plus a request gap of 4 s: 10 s


async def test_a_probe_slower_than_the_fallback_still_closes_its_breaker(harness,
                                                                         autojump_clock):
    h = harness({"a/m1": [respond(503), ok_script("a", first=3.0)], "b/m2": ok_script("b")},
                breakers=fo.BreakerConfig(consecutive_failures=1), retry_same=0)
    await h.chat()  # a fails: open until 1 s
    await trio.sleep_until(2.0)
    r = await h.chat()  # a probes at 2 s; b starts at 3 s and wins; a runs on
    assert (r.text, r.t_first) == ("b", 3.0)
    await trio.sleep_until(6.0)
    assert h.d.health.breakers[("model", "a/m1")].state == "closed"  # a's first token at 5 s
    probe = [r for r in h.rows("attempt") if r["probe"]][0]
    assert (probe["outcome"], probe["ttft_ms"]) == ("hedge_lost", 3000.0)
    assert (await h.chat()).text == "a"


async def test_provider_and_model_breakers_of_a_slot_half_open_together(harness,
                                                                        autojump_clock):
    h = harness({"a/m1": respond(503), "b/m2": ok_script("b")}, retry_same=0,
                breakers=fo.BreakerConfig(consecutive_failures=1, jitter=0.5))
    h.d.rng.value = 0.9  # one draw for the slot: both open for the same jittered cooldown
    await h.chat()
    b = h.d.health.breakers
    assert b[("provider", "a")].open_until == b[("model", "a/m1")].open_until == 1.4


# -- the engine's rules are pure -------------------------------------------------

def test_skip_reason_checks_in_order():
    open_gate = fo.Gate(skip="breaker_open", until=5.0)
    facts = dict(provider_timed_out=False, needed_tokens=100, context_window=1000,
                 min_window=0, throttled=None, gate=fo.Gate())
    assert fo.skip_reason(fo.SlotFacts(**facts)) is None
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "gate": open_gate})) == "breaker_open"
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "throttled": "rpm", "gate": open_gate})) \
        == "rate_limited"
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "needed_tokens": 2000, "throttled": "x"})) \
        == "context_window"
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "min_window": 1000})) == "context_window"
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "provider_timed_out": True,
                                          "needed_tokens": 2000})) == "provider_timed_out"


@pytest.mark.parametrize(("outcome", "effect"), [
    ("ok", "success"), ("first_token_timeout", "failure"), ("truncated", "failure"),
    ("rate_limited", "hold"), ("auth_error", "isolate_credential"),
    ("not_found", "isolate_model"), ("bad_request", "none"), ("context_overflow", "none"),
    ("client_disconnected", "none"), ("hedge_lost", "none"), ("total_timeout", "none"),
])
def test_each_outcome_has_one_breaker_effect(outcome, effect):
    assert fo.breaker_effect(outcome) == effect


def test_soonest_blocked_slot_is_probed_first():
    a, b = fo.Slot("a", "m1"), fo.Slot("b", "m2")
    assert fo.soonest([(20.0, 0, a), (5.0, 1, b)]) == b
    assert fo.soonest([(5.0, 0, a), (5.0, 1, b)]) == a  # a tie goes to the chain's order
    assert fo.soonest([]) is None


async def test_status_is_a_read_without_side_effects(harness, autojump_clock):
    h = harness({"a/m1": respond(503), "b/m2": ok_script("b")},
                breakers=fo.BreakerConfig(consecutive_failures=1), retry_same=0)
    await h.chat()
    await trio.sleep(10.0)  # the cooldown is over: a reader sees half_open ...
    rows = len(h.rows())
    [model] = [b for b in h.d.status()["breakers"] if b["key"] == "a/m1"]
    assert model["state"] == "half_open"
    assert len(h.rows()) == rows  # ... but no transition was written by reading
    assert h.d.health.breakers[("model", "a/m1")].state == "open"


# -- defects the race rewrite fixed ------------------------------------------------

async def test_a_probe_is_not_leaked_when_the_fallback_gate_gives_up(harness, autojump_clock):
    h = harness({"a/m1": respond(503), "b/m2": ok_script("b")}, retry_same=0,
                total_timeout_s=5.0)
    h.d.health._trip(("model", "b/m2"), 1.0, "earlier failures")
    await trio.sleep(2.0)  # b's cooldown is over: the next request probes it
    h.d.late = 0.05  # the loop runs late and no lag probe runs: fallbacks wait their turn
    r = await h.chat()
    assert r.status == 502  # a failed; b's turn never came within the total deadline
    assert not h.d.health.breakers[("model", "b/m2")].probing  # no probe held by anyone
    h.d.late = 0.0
    assert (await h.chat()).text == "b"  # the next request probes b


class BrokenSend(trio.abc.Stream):
    """A client connection whose sends fail: it is gone, but its request arrived."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data) -> None:
        raise trio.BrokenResourceError("client gone")

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes=None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_reply_the_client_never_received_is_not_logged_as_served(harness,
                                                                         autojump_clock,
                                                                         nursery):
    h = harness({"a/m1": ok_script("a")})
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(fo.handle_connection, h.d, BrokenSend(server), fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "messages": [
        {"role": "user", "content": "x"}]}))
    await trio.sleep(1.0)
    [req] = h.rows("request")
    assert (req["status"], req["outcome"]) == (499, "error")


async def test_a_failed_send_is_client_gone_and_ends_the_connection():
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(http_request({"model": "r"}))
    conn.next_event()
    reply = fo.H11Reply(conn, BrokenSend(server), write_timeout=5.0)
    with pytest.raises(fo.ClientGone):
        await reply.start(200, [("content-type", "text/event-stream")], b"data: 1\n\n")
    assert conn.our_state is h11.ERROR


async def test_reload_that_drops_a_provider_leaves_requests_in_flight_alone(
        harness, autojump_clock, tmp_path, nursery):
    h = harness({"a/m1": HUNG, "b/m2": ok_script("b, old config"),
                 "c/m3": ok_script("c, new config")})
    results: list[ClientResult] = []

    async def chat() -> None:
        results.append(await h.chat(stream=True))

    nursery.start_soon(chat)
    await trio.sleep(5.0)  # a hangs; at 30 s the request fails over to b
    reload_to(h, tmp_path, {"a": "", "c": ""}, ["c/m3"])
    assert h.d.status()["config_generations"] == 2  # the old one is still in use
    assert (await h.chat()).text == "c, new config"  # new requests see the new config
    await trio.sleep(30.0)
    [old] = results
    assert (old.status, old.text, old.t_first) == (200, "b, old config", 30.0)
    assert h.d.status()["config_generations"] == 1  # retired after its last request


async def test_reload_closes_only_the_pools_nobody_uses(harness, autojump_clock, tmp_path,
                                                        nursery, monkeypatch):
    closed = []

    async def aclose(self) -> None:
        closed.append(self)

    monkeypatch.setattr(fo.PoolShards, "aclose", aclose)
    h = harness({"a/m1": ok_script("a", first=10.0), "b/m2": ok_script("b")})
    pools = dict(h.d.snap.pools)
    nursery.start_soon(h.chat)
    await trio.sleep(1.0)
    reload_to(h, tmp_path, {"a": 'base_url = "http://a2.test/v1"\n', "b": ""},
              ["a/m1", "b/m2"])  # a changes, b stays
    assert h.d.snap.pools["b"] is pools["b"]  # unchanged: its connections are kept
    assert h.d.snap.pools["a"] is not pools["a"]
    await trio.sleep(1.0)
    assert closed == []  # the request in flight on a still holds the old generation
    await trio.sleep(10.0)
    assert closed == [pools["a"], pools["c"]]  # the old a, and c that the new config dropped


async def test_reload_applies_a_new_ledger_path_and_names_keys_needing_a_restart(
        harness, autojump_clock, tmp_path, caplog):
    h = harness({"a/m1": ok_script("a")})
    new_ledger = tmp_path / "moved.jsonl"
    reload_to(h, tmp_path, {"a": ""}, ["a/m1"],
              daemon=f'ledger = "{new_ledger}"\nsocket = "/tmp/elsewhere.sock"\n')
    await h.chat()
    assert [r["kind"] for r in map(msgspec.json.decode, new_ledger.read_bytes().splitlines())] \
        == ["attempt", "request"]
    assert "daemon.socket changed; the listeners stay as they are until failoverd restarts" \
        in caplog.text


async def test_watching_the_client_survives_pipelined_bytes(harness, autojump_clock, nursery):
    h = harness({"a/m1": [("head", 200, {}), ("hang",)], "b/m2": ok_script()})
    client, server = socket_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True, "messages": [
        {"role": "user", "content": "x"}]}) + b"x" * 300_000)  # 300 KB pipelined behind it
    await trio.sleep(5.0)
    await client.aclose()
    await trio.sleep(1.0)
    assert h.upstreams.closed == [(5.0, "a/m1")]  # the hang-up was still seen, at once
    assert h.rows("request")[0]["status"] == 499


async def test_a_half_closed_client_still_gets_its_reply(harness, autojump_clock, nursery):
    h = harness({"a/m1": ok_script("the answer", first=2.0)})
    client, server = socket_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True, "messages": [
        {"role": "user", "content": "x"}]}))
    await client.send_eof()  # done sending, still reading
    r = await read_response(client, ClientResult())
    assert (r.status, r.text) == (200, "the answer")
    assert h.rows("request")[0]["status"] == 200


# -- the production relay path (kernel socket pair) ---------------------------------

async def test_the_stall_deadline_moves_with_each_token_on_the_fast_path(harness,
                                                                         autojump_clock):
    h = harness({"a/m1": ok_script("a b c d e f", gap=40.0)}, routes={"r": ["a/m1"]})
    r = await h.chat(stream=True)  # gaps of 40 s under a 60 s stall deadline, 200 s in all
    assert (r.status, r.text, r.t_end) == (200, "a b c d e f", 200.0)
    assert h.outcomes() == [("a/m1", "ok")]


async def test_a_fast_5xx_at_the_limit_is_still_retried(harness, autojump_clock):
    h = harness({"a/m1": [[("sleep", fo.FAST_FAILURE_S), *respond(502)], ok_script("a")],
                 "b/m2": ok_script("b")})
    r = await h.chat()
    assert r.text == "a"
    assert h.upstreams.calls == [(0.0, "a/m1"), (2.3, "a/m1")]


async def test_an_upstream_that_lingers_after_done_is_left_after_the_drain_grace(
        harness, autojump_clock):
    script = [*ok_script("done"), ("hang",)]
    h = harness({"a/m1": script})
    r = await h.chat(stream=True)
    assert r.events[-1] == "[DONE]"
    assert r.t_end == fo.DRAIN_S
    assert h.upstreams.closed == [(fo.DRAIN_S, "a/m1")]


@pytest.mark.parametrize("stream", [True, False])
async def test_a_reply_the_client_has_whole_always_has_its_request_row(harness, autojump_clock,
                                                                       nursery, stream):
    """No checkpoint between the reply's last byte and the request row: the client
    side runs only once the daemon yields, and by then the row must be there (a
    kill -9 at that yield loses nothing). Repeated: trio's scheduling order varies."""
    h = harness({"a/m1": ok_script("a")})
    for i in range(20):
        client, server = socket_pair()
        nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
        await client.send_all(http_request({"model": "r", "stream": stream, "messages": [
            {"role": "user", "content": "x"}]}))
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await client.receive_some(65536))
        assert len(h.rows("request")) == i + 1  # the moment the reply is whole
        await client.aclose()


async def test_a_late_frame_after_the_stall_fired_is_reported_as_the_stall(
        harness, autojump_clock, nursery, busy_loop_scripts):
    """The stall deadline passes while the loop is busy and the next read brings a
    frame that is not progress, to a client whose buffer is full: the attempt ends as
    the stall there and then (an in-band error once the client reads), instead of
    writing the frame and handing the upstream a fresh deadline."""
    big_empty = ('{"choices":[{"index":0,"delta":{"content":""},"finish_reason":null}],"pad":"'
                 + "x" * 65536 + '"}')
    script = [("head", 200, {}), ("sse", fo.sse_chunk("hello")), ("jump", 11.0),
              ("sse", big_empty), ("hang",)]
    h = harness({"a/m1": script}, routes={"r": ["a/m1"]}, stall_timeout_s=10.0)
    client, server = socket_pair(8192)
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True, "messages": [
        {"role": "user", "content": "x"}]}))
    await trio.sleep(15.0)  # the client reads only now
    r = await read_response(client, ClientResult())
    assert h.outcomes() == [("a/m1", "stall_timeout")]
    assert h.rows("attempt")[0]["latency_ms"] == 11000.0  # ended when the late frame came
    assert r.events[-1]["error"]["code"] == "stall_timeout"


# -- found in review ----------------------------------------------------------------

async def test_every_hung_probe_is_raced_so_two_cost_a_client_two_seconds(harness,
                                                                          autojump_clock):
    h = harness({"a/m1": [respond(503), HUNG], "b/m2": [respond(503), HUNG],
                 "c/m3": ok_script("c")},
                routes={"r": ["a/m1", "b/m2", "c/m3"]}, retry_same=0,
                breakers=fo.BreakerConfig(consecutive_failures=1, jitter=0.0))
    assert (await h.chat()).text == "c"  # a and b open for 1 s
    await trio.sleep_until(5.0)
    r = await h.chat()
    assert (r.text, r.t_first) == ("c", 7.0)  # a's probe at 5, b's raced at 6, c raced at 7
    assert [c for c in h.upstreams.calls if c[0] >= 5.0] == [
        (5.0, "a/m1"), (6.0, "b/m2"), (7.0, "c/m3")]


async def test_a_detached_probe_keeps_its_generations_pools_open(harness, autojump_clock,
                                                                 tmp_path, nursery, monkeypatch):
    closed = []

    async def aclose(self) -> None:
        closed.append((trio.current_time(), self))

    monkeypatch.setattr(fo.PoolShards, "aclose", aclose)
    h = harness({"a/m1": [respond(503), ok_script("a", first=3.0)], "b/m2": ok_script("b")},
                breakers=fo.BreakerConfig(consecutive_failures=1, jitter=0.0), retry_same=0)
    await h.chat()  # a opens until 1 s
    await trio.sleep_until(2.0)
    old_a = h.d.snap.pools["a"]
    nursery.start_soon(h.chat)  # a probes at 2 s; b at 3 s wins; a runs on to 5 s
    await trio.sleep_until(2.5)
    reload_to(h, tmp_path, {"a": "connect_timeout_s = 4\n", "b": ""}, ["a/m1", "b/m2"])
    await trio.sleep_until(4.0)  # the request ended at 3 s; its probe runs on
    assert [t for t, p in closed if p is old_a] == []
    await trio.sleep_until(6.0)
    assert [t for t, p in closed if p is old_a] == [5.0]  # after the probe, its last user


async def test_a_loser_cannot_overturn_a_won_race(harness, autojump_clock, monkeypatch):
    """A hedge whose 400 arrives just before the primary's first token, still closing its
    response when it loses, does not take the request from the winner."""
    import conftest

    async def slow_close(self) -> None:
        self.upstream.closed.append((trio.current_time(), self.key))
        if self.key == "b/m2":
            with trio.CancelScope(shield=True):
                await trio.sleep(0.5)

    monkeypatch.setattr(conftest._ScriptStream, "aclose", slow_close)
    bad = [("head", 400, {"content-type": "application/json"}),
           ("raw", b'{"error": {"message": "bad tool schema", "type": "invalid_request_error"}}')]
    h = harness({"a/m1": ok_script("the answer is here", first=2.2, gap=0.5), "b/m2": bad},
                hedge_after_s=2.0, hedge_max_share=1.0)
    r = await h.chat(stream=False)
    assert (r.status, r.text) == (200, "the answer is here")


async def test_a_primary_failing_as_the_hedge_timer_fires_starts_one_attempt(harness,
                                                                              autojump_clock):
    h = harness({"a/m1": [("sleep", 2.0), *respond(503)], "b/m2": ok_script("b", first=1.0),
                 "c/m3": ok_script("c", first=1.0)},
                routes={"r": ["a/m1", "b/m2", "c/m3"]}, retry_same=0,
                hedge_after_s=2.0, hedge_max_share=1.0)
    r = await h.chat()
    assert (r.text, r.t_first) == ("b", 3.0)
    # One next slot, whichever came first at 2 s: the failure (b is the failover) or the
    # hedge timer (b is the hedge, and a's failure needs no other).
    assert h.upstreams.calls == [(0.0, "a/m1"), (2.0, "b/m2")]


async def test_a_forced_probe_does_not_release_the_probe_in_flight(harness, autojump_clock):
    """Never-blank can force a request onto a slot whose probe another request holds:
    the forced attempt rides along without owning the probe, so its end cannot free it."""
    h = harness({"a/m1": HUNG}, routes={"r": ["a/m1"]})
    health, slot = h.d.health, fo.Slot("a", "m1")
    cred = h.d.snap.credential("a")
    health._trip(("model", "a/m1"), 1.0, "test")
    await trio.sleep(2.0)
    assert health.gate(slot, cred).probe
    assert health.claim(slot, cred)  # one request's probe, in flight
    forced = health.force(slot, cred, "r")  # another request, never blank
    health.release(forced)  # ... whose client went away
    assert health.breakers[("model", "a/m1")].probing


async def test_a_reload_applies_a_new_max_connections_at_once(harness, autojump_clock, tmp_path):
    h = harness({"a/m1": ok_script("a")})
    assert h.d.max_connections == h.d.fd_cap  # unset: derived from the open-file limit
    reload_to(h, tmp_path, {"a": ""}, ["a/m1"],
              daemon=f'ledger = "{h.ledger_path}"\nmax_connections = 7\n')
    assert h.d.max_connections == 7
    assert h.d.status()["connections"]["max"] == 7
