"""Shadow calls (SPEC section 13), in virtual time over kernel socket pairs.

Route "r" is a/m1 -> b/m2 with a shadow on c/m3 unless a scenario says otherwise; a
sampled request's copy goes to c/m3 after the client's reply is complete, in the
daemon's nursery, accounted on the route's shadow budget and its own breaker.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import random
from typing import Any

import httpx2
import msgspec
import pytest
import trio
import trio.testing
from click.testing import CliRunner
from conftest import (
    ClientResult,
    Harness,
    MockUpstreams,
    http_request,
    make_config,
    ok_script,
    read_response,
    socket_pair,
)
from test_engine import HUNG, respond

import failoverd as fo

PRICED = {"price_in_per_mtok": 1000.0, "price_out_per_mtok": 2000.0}
MODELS = {k: fo.ModelConfig(**PRICED) for k in ("a/m1", "b/m2", "c/m3", "self/r")}
CALL_USD = 0.016  # ok_script("two words"): 12 prompt and 2 completion tokens
NOON = dt.datetime(2025, 6, 15, 12, tzinfo=dt.UTC).timestamp()
BODY = {"model": "r", "stream": False, "messages": [{"role": "user", "content": "hello"}]}


def shadow_config(cfg: fo.Config, *, model: str = "c/m3", sample: float = 1.0,
                  budget: float = 1.0, enabled: bool = True, max_in_flight: int = 4,
                  route: str = "r") -> fo.Config:
    shadow = fo.RouteShadow(model=model, sample=sample, budget_usd_per_day=budget)
    routes = dict(cfg.routes)
    routes[route] = msgspec.structs.replace(routes[route], shadow=shadow)
    return msgspec.structs.replace(cfg, routes=routes, shadow=fo.ShadowConfig(
        enabled=enabled, max_in_flight=max_in_flight))


@pytest.fixture
def shadowed(tmp_path, nursery):
    """shadowed(scripts, routes=..., model=..., sample=..., budget=..., enabled=...,
    max_in_flight=..., breakers=..., **timing) -> Harness"""

    def make(scripts: dict[str, Any], *, routes: dict[str, list[str]] | None = None,
             breakers: fo.BreakerConfig | None = None, daemon: dict[str, Any] | None = None,
             upstreams: MockUpstreams | None = None,
             providers: dict[str, fo.ProviderConfig] | None = None,
             models: dict[str, fo.ModelConfig] | None = None, **kw: Any) -> Harness:
        shadow = {k: kw.pop(k) for k in ("model", "sample", "budget", "enabled",
                                         "max_in_flight") if k in kw}
        ledger = str(tmp_path / "ledger.jsonl")
        cfg = make_config(routes or {"r": ["a/m1", "b/m2"]}, ledger=ledger,
                          models={**MODELS, **(models or {})}, **kw)
        cfg = shadow_config(cfg, **shadow)
        cfg = msgspec.structs.replace(
            cfg, breakers=breakers or cfg.breakers,
            providers={**cfg.providers, **(providers or {})},
            daemon=msgspec.structs.replace(cfg.daemon, **(daemon or {})))
        h = Harness(cfg, upstreams or MockUpstreams(scripts), ledger, nursery)
        h.d.wall_clock = lambda: NOON
        return h

    return make


def shadow_rows(h: Harness) -> list[dict[str, Any]]:
    return [r for r in h.rows("attempt") if r["shadow"]]


def live_rows(h: Harness) -> list[dict[str, Any]]:
    return [r for r in h.rows("attempt") if not r["shadow"]]


def ledger_bytes(h: Harness) -> bytes:
    return pathlib.Path(h.ledger_path).read_bytes()


# -- the copy --------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
async def test_a_sampled_answer_is_copied_to_the_shadow_after_the_reply(shadowed,
                                                                       autojump_clock, stream):
    h = shadowed({"a/m1": ok_script("same answer", first=1.0),
                  "c/m3": ok_script("same answer", first=3.0)})
    r = await h.chat(stream=stream)
    assert (r.status, r.text) == (200, "same answer")
    await trio.sleep(10.0)
    assert h.upstreams.calls == [(0.0, "a/m1"), (r.t_end, "c/m3")]  # after the reply's end
    live, copy = h.upstreams.requests
    assert fo.SHADOW_HEADER not in live.headers
    assert copy.headers[fo.SHADOW_HEADER] == "1"
    assert msgspec.json.decode(copy.content)["messages"] == BODY["messages"]
    [answer] = live_rows(h)
    [row] = shadow_rows(h)
    assert (row["shadow_of"], row["route"], row["outcome"], row["ttft_ms"], row["cost_usd"]) \
        == (r.headers["x-failoverd-request-id"], "r", "ok", 3000.0, CALL_USD)
    assert row["request_id"] != answer["request_id"]
    assert (answer["answer_chars"], answer["tool_names"]) == (11, [])
    assert (row["answer_digest"], row["answer_chars"], row["tool_names"]) == \
        (answer["answer_digest"], 11, [])
    assert b"same answer" not in ledger_bytes(h)  # no content in the ledger
    assert [q["request_id"] for q in h.rows("request")] == [answer["request_id"]]  # no row of
    assert h.d.shadow_spend.today("r", NOON) == CALL_USD                          # its own
    assert h.d.spend.totals(NOON) == {"a/m1": CALL_USD}  # the live budget is the live spend's


async def test_a_different_answer_has_a_different_digest_and_length(shadowed, autojump_clock):
    h = shadowed({"a/m1": ok_script("the live answer"), "c/m3": ok_script("another one")})
    await h.chat(stream=True)
    await trio.sleep(1.0)
    [answer], [row] = live_rows(h), shadow_rows(h)
    assert answer["answer_digest"] != row["answer_digest"]
    assert (answer["answer_chars"], row["answer_chars"]) == (15, 11)


async def test_the_shadow_waits_until_a_slow_client_has_the_whole_reply(shadowed,
                                                                       autojump_clock, nursery):
    long = " ".join(["word"] * 20_000)  # a 100 KB reply into 8 KB socket buffers
    h = shadowed({"a/m1": ok_script(long), "c/m3": ok_script("x y")}, budget=100.0)
    client, server = socket_pair(8192)
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request(BODY))
    await trio.sleep(5.0)  # the answer is whole at 0 s; the client starts reading at 5 s
    assert h.upstreams.keys_called() == ["a/m1"]
    r = await read_response(client, ClientResult())
    assert r.text == long
    await trio.sleep(1.0)
    assert h.upstreams.calls == [(0.0, "a/m1"), (5.0, "c/m3")]


async def test_an_unsampled_answer_carries_no_fingerprint(shadowed, autojump_clock):
    h = shadowed({"a/m1": ok_script("x y"), "c/m3": ok_script("x y")}, sample=0.4)
    await h.chat()  # FixedJitter draws 0.5: not below 0.4
    await trio.sleep(1.0)
    [answer] = h.rows("attempt")
    assert (answer["answer_digest"], answer["answer_chars"], answer["shadow"]) == \
        (None, None, False)
    assert h.upstreams.keys_called() == ["a/m1"]


async def test_tool_calls_are_compared_by_name(shadowed, autojump_clock):
    def tools(*names: str) -> fo.Script:
        steps: list = [("head", 200, {})]
        for i, name in enumerate(names):
            tc = {"index": i, "id": f"call_{i}", "type": "function",
                  "function": {"name": name, "arguments": "{}"}}
            steps.append(("sse", {"choices": [{"index": 0, "delta": {"tool_calls": [tc]},
                                               "finish_reason": None}]}))
        return [*steps, ("sse", fo.sse_chunk(finish="tool_calls")), ("sse", "[DONE]")]

    # No usage and no text: the estimate takes the model's output_reserve (1024 x $0.002).
    h = shadowed({"a/m1": tools("search", "fetch"), "c/m3": tools("fetch", "search")},
                 budget=5.0)
    await h.chat(stream=True)
    await trio.sleep(1.0)
    [answer], [row] = live_rows(h), shadow_rows(h)
    assert answer["tool_names"] == row["tool_names"] == ["fetch", "search"]
    [report] = fo.shadow_report(row for _, row in fo.read_ledger(h.ledger_path))
    assert (report["tool_turns"], report["same_tools_pct"], report["exact_match_pct"]) == \
        (1, 100.0, 100.0)


async def test_an_anthropic_answer_streamed_live_matches_the_same_text(shadowed,
                                                                       autojump_clock):
    from test_engine import ANTHROPIC_OK

    h = shadowed({"x/claude": ANTHROPIC_OK, "c/m3": ok_script("Hello there")},
                 routes={"r": ["x/claude"]}, anthropic=("x",))
    r = await h.chat(stream=True)
    assert r.text == "Hello there"
    await trio.sleep(1.0)
    [answer], [row] = live_rows(h), shadow_rows(h)
    assert answer["answer_digest"] == row["answer_digest"]


async def test_a_continued_answer_is_shadowed_but_not_compared(shadowed, autojump_clock):
    """The continuing attempt holds only the end of the answer (SPEC section 11): its
    digest could never match, so it carries none and the pair is not compared."""
    from test_continuation import PARTS

    h = shadowed({"a/m1": fo.ContinuingModel(PARTS, cut_after=4),
                  "b/m2": fo.ContinuingModel(PARTS), "c/m3": fo.ContinuingModel(PARTS)},
                 models={"b/m2": fo.ModelConfig(prefill="trailing", **PRICED)},
                 continuation=True)
    r = await h.chat(stream=True)
    assert r.text == "".join(PARTS)
    await trio.sleep(20.0)
    cut, rest = live_rows(h)
    assert (cut["outcome"], rest["continued"], rest["answer_digest"]) == ("truncated", True, None)
    [row] = shadow_rows(h)
    assert (row["outcome"], row["answer_chars"]) == ("ok", len("".join(PARTS)))
    [report] = fo.shadow_report(row for _, row in fo.read_ledger(h.ledger_path))
    assert (report["primary_model"], report["compared"]) == ("?", 0)


# -- it never touches the client's request --------------------------------------------

def client_view(r: ClientResult) -> tuple:
    return (r.status, r.body, r.t_head - r.t_start, r.t_first - r.t_start, r.t_end - r.t_start)


@pytest.mark.parametrize("stream", [True, False])
async def test_the_clients_timing_is_the_same_with_and_without_a_hung_shadow(
        shadowed, autojump_clock, stream):
    scripts = {"a/m1": ok_script("one two three", first=1.0, gap=0.5), "c/m3": HUNG}
    plain = shadowed(scripts, enabled=False)
    baseline = [client_view(await plain.chat(stream=stream)) for _ in range(2)]
    await trio.sleep(100.0)
    h = shadowed(scripts)
    seen = []
    for _ in range(2):
        r = await h.chat(stream=stream)
        seen.append(client_view(r))
    assert seen == baseline
    assert baseline[0][2:] == ((1.0, 1.0, 2.0) if stream else (2.0, 2.0, 2.0))
    assert len(h.d.shadows.running) == 2  # both shadows hang meanwhile
    assert h.d.status()["in_flight"] == []  # shadows are not requests in flight
    await trio.sleep(31.0)
    assert [(row["outcome"], row["latency_ms"]) for row in shadow_rows(h)] == \
        [("first_token_timeout", 30000.0)] * 2  # the route's first-token deadline


async def test_a_failing_shadow_never_fails_over(shadowed, autojump_clock):
    h = shadowed({"a/m1": ok_script("x y"), "b/m2": ok_script("x y"), "c/m3": respond(503)})
    await h.chat()
    await trio.sleep(5.0)
    assert h.upstreams.keys_called() == ["a/m1", "c/m3"]  # no retry, no next slot
    [row] = shadow_rows(h)
    assert (row["outcome"], row["cost_usd"]) == ("http_error", None)
    assert h.d.shadow_spend.today("r", NOON) == 0.0  # the reservation went back


async def test_a_failed_shadow_takes_no_turn_from_the_live_fallbacks(shadowed, autojump_clock):
    h = shadowed({"a/m1": ok_script("x y"), "c/m3": respond(503)})
    h.d.late = 0.05  # a failover storm: live fallbacks wait their turn (FALLBACK_LAG_S)
    await h.chat()  # answered at once: a first attempt never waits its turn
    await trio.sleep(1.0)
    assert [r["outcome"] for r in shadow_rows(h)] == ["http_error"]
    assert (len(h.d.fallbacks), h.d.shadows.running) == (0, set())


async def test_only_a_delivered_answer_is_shadowed(shadowed, autojump_clock):
    h = shadowed({"a/m1": respond(503), "b/m2": respond(503), "c/m3": ok_script("x y")},
                 retry_same=0)
    r = await h.chat()
    assert r.status == 502
    await trio.sleep(1.0)
    assert shadow_rows(h) == []


async def test_an_answer_the_client_never_received_is_not_shadowed(shadowed, autojump_clock,
                                                                   nursery):
    from test_race import BrokenSend

    h = shadowed({"a/m1": ok_script("x y"), "c/m3": ok_script("x y")})
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(fo.handle_connection, h.d, BrokenSend(server), fo.Peer(1, 1))
    await client.send_all(http_request(BODY))
    await trio.sleep(1.0)
    assert h.rows("request")[0]["status"] == 499  # answered, but the reply never went out
    assert h.upstreams.keys_called() == ["a/m1"]


# -- sampling and the switch -------------------------------------------------------------

async def test_the_sampling_rate_is_honoured_over_many_requests(shadowed, autojump_clock):
    h = shadowed({"a/m1": ok_script("x y"), "c/m3": ok_script("x y")}, sample=0.1)
    h.d.rng = random.Random(2024)
    for _ in range(400):
        await h.chat()
    await trio.sleep(1.0)
    shadows = shadow_rows(h)
    sampled = {r["request_id"] for r in live_rows(h) if r["answer_digest"] is not None}
    assert {r["shadow_of"] for r in shadows} == sampled  # each sampled request, once
    assert len(shadows) == len(sampled) == h.d.shadows.started == 36  # 400 x 0.1: 40, sd 6


async def test_a_reload_turns_shadows_off_and_on(shadowed, autojump_clock, tmp_path, nursery):
    h = shadowed({"a/m1": ok_script("x y", first=5.0), "c/m3": ok_script("x y")})

    def reload(enabled: bool) -> None:
        config = tmp_path / "new.toml"
        config.write_text(
            f'[daemon]\nledger = "{h.ledger_path}"\n[shadow]\nenabled = {str(enabled).lower()}\n'
            + "".join(f'[providers.{p}]\nbase_url = "http://{p}.test/v1"\n' for p in "abc")
            + "".join(f'[models."{m}"]\nprice_in_per_mtok = 1000\nprice_out_per_mtok = 2000\n'
                      for m in ("a/m1", "c/m3"))
            + '[routes.r]\nchain = ["a/m1"]\n'
            '[routes.r.shadow]\nmodel = "c/m3"\nsample = 1\nbudget_usd_per_day = 1\n')
        assert h.d.reload(str(config)) is None

    await h.chat()
    nursery.start_soon(h.chat)  # sampled, still running when the switch goes off
    await trio.sleep(1.0)
    reload(False)
    await trio.sleep(10.0)
    await h.chat()
    assert len(shadow_rows(h)) == 1
    assert h.d.shadows.status()["dropped"] == {"disabled": 1}  # not started after the reload
    reload(True)
    await h.chat()
    await trio.sleep(1.0)
    assert len(shadow_rows(h)) == 2


async def test_shadows_are_off_by_default(harness, autojump_clock):
    cfg = fo.parse_config('[providers.a]\nbase_url = "http://a.test/v1"\n'
                          '[models."a/m2"]\nprice_in_per_mtok = 1\n'
                          '[routes.r]\nchain = ["a/m1"]\n'
                          '[routes.r.shadow]\nmodel = "a/m2"\nsample = 1\n'
                          'budget_usd_per_day = 5\n')
    assert cfg.shadow == fo.ShadowConfig(enabled=False, max_in_flight=4)
    assert cfg.routes["r"].shadow == fo.RouteShadow(model="a/m2", sample=1.0,
                                                    budget_usd_per_day=5.0)


# -- budget ----------------------------------------------------------------------------

async def test_the_estimate_must_fit_the_budget_and_the_real_cost_settles_it(shadowed,
                                                                            autojump_clock):
    body_size = len(msgspec.json.encode(BODY))
    estimate = fo.shadow_estimate(MODELS["c/m3"], fo.Estimator().estimate("c/m3", body_size),
                                  2, BODY)
    assert (body_size, estimate) == (75, pytest.approx(0.001 * 21 + 0.002 * 2))  # 75 / 4 x 1.1
    h = shadowed({"a/m1": ok_script("x y"), "c/m3": ok_script("x y", first=5.0)},
                 budget=estimate + 0.01)
    await h.chat()
    await trio.sleep(1.0)
    assert h.d.shadow_spend.today("r", NOON) == pytest.approx(estimate)  # reserved meanwhile
    await trio.sleep(10.0)
    assert h.d.shadow_spend.today("r", NOON) == CALL_USD  # settled: the real cost
    await h.chat()  # $0.016 spent + the estimate would pass the budget
    await trio.sleep(10.0)
    assert [(r["outcome"], r["skip_reason"], r["cost_usd"]) for r in shadow_rows(h)] == \
        [("ok", None, CALL_USD), ("skipped", "budget", None)]
    assert h.upstreams.keys_called() == ["a/m1", "c/m3", "a/m1"]
    assert h.d.status()["budgets"]["shadows"] == [
        {"route": "r", "model": "c/m3", "sample": 1.0, "spent_usd": CALL_USD,
         "budget_usd_per_day": pytest.approx(estimate + 0.01),
         "left_usd": pytest.approx(estimate + 0.01 - CALL_USD), "exhausted": False}]


def test_the_shadow_estimate_uses_the_live_answer_else_max_tokens():
    model = fo.ModelConfig(output_reserve=500, **PRICED)
    assert fo.shadow_estimate(model, 100, 7, {}) == pytest.approx(0.1 + 0.014)
    assert fo.shadow_estimate(model, 100, None, {"max_tokens": 50}) == pytest.approx(0.1 + 0.1)
    assert fo.shadow_estimate(model, 100, None, {}) == pytest.approx(0.1 + 1.0)


# -- breakers --------------------------------------------------------------------------

async def test_a_broken_shadow_opens_its_own_breaker_and_never_the_live_ones(shadowed,
                                                                            autojump_clock):
    h = shadowed({"a/m1": ok_script("x y"),
                  "c/m3": [respond(503), respond(503), respond(503), ok_script("x y")]},
                 routes={"r": ["a/m1", "b/m2"], "direct": ["c/m3"]})
    for _ in range(4):
        await h.chat()
        await trio.sleep(0.1)
    assert [(r["outcome"], r["skip_reason"]) for r in shadow_rows(h)] == \
        [("http_error", None)] * 3 + [("skipped", "breaker_open")]
    assert set(h.d.health.breakers) == {("provider", "a"), ("model", "a/m1"), ("shadow", "c/m3")}
    assert not any(b.failures for k, b in h.d.health.breakers.items() if k[0] != "shadow")
    [opened] = h.rows("breaker")
    assert (opened["scope"], opened["key"], opened["to"]) == ("shadow", "c/m3", "open")
    r = await h.chat("direct")  # live traffic to the same model is untouched
    assert (r.status, h.outcomes()[-1]) == (200, ("c/m3", "ok"))
    await trio.sleep(5.0)  # the shadow's cooldown ends: the next shadow probes and closes it
    await h.chat()
    await trio.sleep(1.0)
    probe = shadow_rows(h)[-1]
    assert (probe["outcome"], probe["probe"]) == ("ok", True)
    assert h.d.health.breakers[("shadow", "c/m3")].state == "closed"


# -- the limits ----------------------------------------------------------------------------

async def test_at_most_max_in_flight_shadows_run_and_the_rest_are_dropped(shadowed,
                                                                         autojump_clock):
    h = shadowed({"a/m1": ok_script("x y"), "c/m3": HUNG}, max_in_flight=2)
    for _ in range(5):
        await h.chat()
    await trio.sleep(1.0)
    assert h.upstreams.keys_called().count("c/m3") == 2
    assert h.d.shadows.status() == {"enabled": True, "max_in_flight": 2, "in_flight": 2,
                                    "started": 2, "dropped": {"max_in_flight": 3}}
    await trio.sleep(30.0)  # the hung shadows time out
    await h.chat()
    await trio.sleep(1.0)
    assert h.upstreams.keys_called().count("c/m3") == 3


@pytest.mark.parametrize(("shed_share", "loop_lag"), [(0.4, 0.0), (0.0, 0.01)])
async def test_shadows_are_dropped_first_under_load(shadowed, autojump_clock, shed_share,
                                                    loop_lag):
    h = shadowed({"a/m1": ok_script("x y"), "c/m3": ok_script("x y")})
    h.d.shed_share, h.d.loop_lag = shed_share, loop_lag  # FixedJitter's 0.5: never shed
    r = await h.chat()
    assert r.status == 200  # the live request is served ...
    await trio.sleep(1.0)
    assert h.upstreams.keys_called() == ["a/m1"]  # ... its shadow is not
    assert h.d.shadows.dropped == {"load": 1}


async def test_shutdown_cancels_shadows_at_once_and_does_not_wait(shadowed, autojump_clock,
                                                                  nursery):
    h = shadowed({"a/m1": [ok_script("x y"), ok_script("x y", first=5.0)], "c/m3": HUNG})
    served = trio.Event()

    async def run_serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await fo.serve(h.d, [], task_status=task_status)
        served.set()

    await nursery.start(run_serve)  # serve's nursery is the daemon's background from here
    await h.chat()
    nursery.start_soon(h.chat)  # a live request in flight: the drain waits for it, 5 s
    await trio.sleep(1.0)
    assert len(h.d.shadows.running) == 1
    h.d.shutdown.set()
    await served.wait()
    assert trio.current_time() == 5.0  # the live request's end, not the shadow's deadline
    [row] = shadow_rows(h)
    assert (row["outcome"], row["latency_ms"]) == ("shutdown", 1000.0)  # cancelled at once
    assert h.d.shadows.dropped == {"shutdown": 1}  # the one that finished while draining
    assert h.upstreams.keys_called().count("c/m3") == 1


# -- no recursion ----------------------------------------------------------------------

async def test_a_shadow_through_failoverd_itself_never_spawns_another(shadowed,
                                                                      autojump_clock, nursery):
    """r's shadow goes to provider "self": this same daemon, whose route r is shadowed.
    The copy arrives marked, is served like any request, marks its own upstream call,
    and is not shadowed again."""
    upstreams = MockUpstreams({"a/m1": ok_script("x y")})
    forwarded: list[httpx2.Request] = []
    h: Harness | None = None

    async def loop_back(request: httpx2.Request) -> httpx2.Response:
        if request.url.host != "self.test":
            return await upstreams._handle(request)
        forwarded.append(request)
        assert h is not None
        client, server = socket_pair()
        nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
        headers = {k: v for k, v in request.headers.items() if k == fo.SHADOW_HEADER}
        await client.send_all(http_request(request.content, headers=headers))
        r = await read_response(client, ClientResult())
        return httpx2.Response(r.status, headers={"content-type": r.headers["content-type"]},
                              content=r.body)

    upstreams.transport = httpx2.MockTransport(loop_back)
    h = shadowed({}, upstreams=upstreams, model="self/r", routes={"r": ["a/m1"]},
                 providers={"self": fo.ProviderConfig(base_url="http://self.test/v1")})
    r = await h.chat()
    assert r.status == 200
    await trio.sleep(5.0)
    assert len(forwarded) == 1
    assert forwarded[0].headers[fo.SHADOW_HEADER] == "1"
    assert len(shadow_rows(h)) == 1
    # The marked request answered from a/m1 and marked that call too.
    assert [req.headers.get(fo.SHADOW_HEADER) for req in upstreams.requests] == [None, "1"]
    assert h.d.shadows.started == 1


# -- status and audit ------------------------------------------------------------------------

async def test_status_shows_the_shadows(shadowed, autojump_clock):
    h = shadowed({"a/m1": ok_script("x y"), "c/m3": HUNG}, max_in_flight=1, sample=1.0)
    await h.chat()
    await h.chat()
    text = fo.format_status(h.d.status(), width=120)
    assert "shadows: on, 1/1 in flight, 1 started, dropped: max_in_flight 1" in text
    assert ["r", "c/m3", "100%", "0.0250", "1", "0.9750"] in [line.split() for line in text]


def attempt(request_id: str, model: str, outcome: str = "ok", **kw: Any) -> fo.AttemptRow:
    provider, _, name = model.partition("/")
    return fo.AttemptRow(ts="2025-06-15T12:00:00.000Z", request_id=request_id, route="r",
                         attempt=0, provider=provider, model=name, outcome=outcome, **kw)


def pair(n: int, live: dict[str, Any], shadow: dict[str, Any]) -> list[fo.AttemptRow]:
    rid = f"req{n}"
    return [attempt(rid, "a/m1", **live),
            attempt(f"sh{n}", "c/m3", shadow=True, shadow_of=rid, **shadow)]


REPORT_ROWS = [
    *pair(1, dict(latency_ms=1000.0, ttft_ms=200.0, tokens_in=10, tokens_out=5, cost_usd=0.01,
                  answer_digest="d1", answer_chars=100, tool_names=[]),
          dict(latency_ms=3000.0, ttft_ms=600.0, tokens_in=10, tokens_out=6, cost_usd=0.002,
               answer_digest="d1", answer_chars=100, tool_names=[])),
    *pair(2, dict(latency_ms=2000.0, ttft_ms=400.0, tokens_in=20, tokens_out=5, cost_usd=0.02,
                  answer_digest="d2", answer_chars=100, tool_names=["search"]),
          dict(latency_ms=1000.0, ttft_ms=100.0, tokens_in=20, tokens_out=9, cost_usd=0.004,
               answer_digest="x2", answer_chars=150, tool_names=["fetch"])),
    *pair(3, dict(latency_ms=1000.0, ttft_ms=300.0, tokens_in=5, tokens_out=5, cost_usd=0.01,
                  answer_digest="d3", answer_chars=40, tool_names=["fetch"]),
          dict(outcome="first_token_timeout", latency_ms=30000.0, tokens_in=7,
               tokens_estimated=True)),  # no output: its estimated tokens are not counted
    *pair(4, dict(answer_digest="d4", answer_chars=10, tool_names=[]),
          dict(outcome="skipped", skip_reason="budget")),
    attempt("sh5", "c/m3", shadow=True, shadow_of="gone", latency_ms=500.0, ttft_ms=50.0),
    attempt("req6", "a/m1", latency_ms=900.0),  # not sampled: no fingerprint, not a primary
]


def test_the_shadow_report_sets_each_shadow_beside_its_primary():
    known, unknown = fo.shadow_report(REPORT_ROWS)
    assert known == {
        "route": "r", "shadow_model": "c/m3", "primary_model": "a/m1",
        "skipped": {"budget": 1},
        "shadow": {"n": 3, "ok": 2,
                   "latency_s": {"n": 2, "p50": 1.0, "p90": 3.0, "p99": 3.0, "max": 3.0},
                   "ttft_s": {"n": 2, "p50": 0.1, "p90": 0.6, "p99": 0.6, "max": 0.6},
                   "tokens_in": 30, "tokens_out": 15, "cost_usd": 0.006},
        "primary": {"n": 3, "ok": 3,
                    "latency_s": {"n": 3, "p50": 1.0, "p90": 2.0, "p99": 2.0, "max": 2.0},
                    "ttft_s": {"n": 3, "p50": 0.3, "p90": 0.4, "p99": 0.4, "max": 0.4},
                    "tokens_in": 35, "tokens_out": 15, "cost_usd": 0.04},
        "compared": 2, "exact_match_pct": 50.0, "length_ratio": 1.25,  # 250 chars for 200
        "tool_turns": 1, "same_tools_pct": 0.0,
    }
    assert (unknown["primary_model"], unknown["shadow"]["n"], unknown["compared"]) == ("?", 1, 0)
    text = fo.format_shadow_report([known], width=120)
    assert "route r: shadow c/m3 beside primary a/m1 (skipped: budget 1)" in text
    rows = [line.split() for line in text]
    assert ["primary", "3", "3", "35/15", "0.0400", "answer", "3", "1.00", "2.00", "2.00",
            "2.00"] in rows
    assert ["first", "token", "2", "0.10", "0.60", "0.60", "0.60"] in rows
    assert "  agreement over 2 answered pairs: exact match 50.0%, length 1.25x the " \
           "primary's, same tools 0.0% of 1 tool-call turns" in text
    audit = fo.Audit()
    for row in REPORT_ROWS:
        audit.add(row)
    report = audit.report()
    [route] = report["routes"]
    assert [m["model"] for m in route["models"]] == ["a/m1"]  # shadows stay out of the table
    assert report["shadows"] == [known, unknown]


def test_audit_prints_the_shadow_section_when_there_are_shadows(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in REPORT_ROWS))
    out = CliRunner().invoke(fo.cli, ["audit", str(ledger), "--width", "120"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("route r:")
    assert "shadows: each beside the primary that answered the same requests" in out.output
    only = CliRunner().invoke(fo.cli, ["audit", str(ledger), "--shadows", "--json"])
    assert [r["primary_model"] for r in msgspec.json.decode(only.output)] == ["a/m1", "?"]
    whole = msgspec.json.decode(CliRunner().invoke(fo.cli, ["audit", str(ledger),
                                                            "--json"]).output)
    assert whole["shadows"] == msgspec.json.decode(only.output)
    text = CliRunner().invoke(fo.cli, ["audit", str(ledger), "--shadows", "--width", "120"])
    assert text.output.splitlines()[0] == "shadows: each beside the primary that answered " \
                                          "the same requests"
    ledger.write_bytes(msgspec.json.encode(REPORT_ROWS[-1]) + b"\n")
    plain = CliRunner().invoke(fo.cli, ["audit", str(ledger)])
    assert "shadows" not in plain.output


# -- config --------------------------------------------------------------------------------

@pytest.mark.parametrize(("shadow", "error"), [
    ('model = "c/m3"\nsample = 0.05\n', "Object missing required field `budget_usd_per_day` - "
                                        "at `routes.r.shadow`"),
    ('model = "z/m"\nsample = 0.05\nbudget_usd_per_day = 5\n',
     "routes.r.shadow.model = 'z/m': expected PROVIDER/MODEL with a provider declared"),
    ('model = "a/free"\nsample = 0.05\nbudget_usd_per_day = 5\n',
     "routes.r.shadow.model = 'a/free': set price_in_per_mtok / price_out_per_mtok under "
     '[models."a/free"]'),
    ('model = "a/m1"\nsample = 1.5\nbudget_usd_per_day = 5\n',
     "Expected `float` <= 1.0 - at `routes.r.shadow.sample`"),
    ('model = "a/m1"\nsample = 0.1\nbudget_usd_per_day = 5\nsampel = 1\n',
     "routes.r.shadow.sampel: unknown key; did you mean 'sample'?"),
])
def test_shadow_config_errors_name_the_key(shadow, error):
    text = ('[providers.a]\nbase_url = "http://a.test/v1"\n'
            '[models."a/m1"]\nprice_in_per_mtok = 1\n'
            '[routes.r]\nchain = ["a/m1"]\n[routes.r.shadow]\n' + shadow)
    with pytest.raises(fo.ConfigError) as e:
        fo.parse_config(text)
    assert error in str(e.value)


async def test_shadow_calls_have_metrics_of_their_own(shadowed, autojump_clock):
    from prometheus_client.parser import text_string_to_metric_families

    h = shadowed({"a/m1": ok_script("two words"), "c/m3": ok_script("two words")},
                 routes={"r": ["a/m1"], "r2": ["c/m3"]},
                 models={"a/m1": fo.ModelConfig(**PRICED, budget_usd_per_day=5.0)})
    await h.chat()
    await trio.sleep(1.0)  # the shadow ran after the reply
    await h.chat("r2")  # c/m3 is also a live slot of another route
    await trio.sleep(1.0)
    r = await h.send(http_request(b"", path="/metrics", method="GET"))
    fam = {f.name: f for f in text_string_to_metric_families(r.body.decode())}

    def values(name: str, sample: str | None = None) -> dict[tuple, float]:
        return {tuple(sorted(s.labels.items())): s.value for s in fam[name].samples
                if s.name == (sample or name)}

    live = values("failoverd_attempts", "failoverd_attempts_total")
    assert live[(("model", "m3"), ("outcome", "ok"), ("provider", "c"))] == 1.0  # r2 only
    shadow = values("failoverd_shadow_attempts", "failoverd_shadow_attempts_total")
    assert shadow == {(("model", "c/m3"), ("outcome", "ok"), ("route", "r")): 1.0}
    assert values("failoverd_shadow_cost_usd", "failoverd_shadow_cost_usd_total") == {
        (("model", "c/m3"), ("route", "r")): pytest.approx(CALL_USD)}
    assert values("failoverd_spend_usd_today")[(("model", "a/m1"),)] == pytest.approx(CALL_USD)
    assert values("failoverd_budget_usd_per_day") == {(("model", "a/m1"),): 5.0}
    assert values("failoverd_shadow_spend_usd_today") == {
        (("model", "c/m3"), ("route", "r")): pytest.approx(CALL_USD)}
    assert values("failoverd_shadow_in_flight") == {(): 0.0}
