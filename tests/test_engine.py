"""The attempt engine in virtual time: who answered, when, and what the ledger says.

Every scenario runs under trio's autojump clock against scripted mock upstreams.
Route "r" is a/m1 -> b/m2 unless a scenario says otherwise; deadlines are the
defaults (first token 30 s, stall 60 s, total 300 s, one same-slot retry after a
0.3 s backoff, Retry-After waited out up to 3 s).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
from conftest import ok_script

import failoverd as fo

HUNG = [("hang",)]
HEADERS_THEN_SILENCE = [("head", 200, {}), ("hang",)]
# Heartbeats every 5 s for 100 s: SSE comments never count as progress.
HEARTBEATS = [("head", 200, {}), *[("comment", "keep-alive"), ("sleep", 5.0)] * 20]
# Role-only and empty-content deltas, and Azure's choice-less filter frame, every 5 s.
EMPTY_FRAMES = [("head", 200, {}), *[
    ("sse", fo.sse_chunk(role="assistant", content="")), ("sleep", 5.0),
    ("sse", {"choices": [], "prompt_filter_results": []}), ("sleep", 5.0),
] * 10]


def respond(status: int, body: Any = None, headers: dict[str, str] | None = None) -> list:
    payload = body if isinstance(body, bytes) else msgspec.json.encode(
        body or {"error": {"message": f"status {status}", "type": "server_error"}})
    return [("respond", status, headers or {}, payload)]


def tokens_then(after: list, n: int = 2, gap: float = 1.0) -> list:
    """n content tokens `gap` s apart (the first at t=gap), then `after` steps."""
    steps: list = [("head", 200, {}), ("sse", fo.sse_chunk(role="assistant", content=""))]
    for i in range(n):
        steps += [("sleep", gap), ("sse", fo.sse_chunk(f"t{i}"))]
    return steps + after


OVERFLOW = {"error": {"message": "This model's maximum context length is 8192 tokens",
                      "type": "invalid_request_error", "code": "context_length_exceeded"}}
BAD_PARAM = {"error": {"message": "temperature must be <= 2", "type": "invalid_request_error",
                       "param": "temperature", "code": None}}

# (id, a/m1 script, stream, t client's first byte, attempt outcomes, final status)
FAILOVER_SCENARIOS = [
    ("hung before headers", HUNG, True, 30.0, ["first_token_timeout", "ok"], 200),
    ("headers then silence", HEADERS_THEN_SILENCE, True, 30.0, ["first_token_timeout", "ok"], 200),
    ("heartbeat-only stream", HEARTBEATS, True, 30.0, ["first_token_timeout", "ok"], 200),
    ("role-only and empty frames", EMPTY_FRAMES, True, 30.0, ["first_token_timeout", "ok"], 200),
    ("hung, non-streaming client", HUNG, False, 30.0, ["first_token_timeout", "ok"], 200),
    ("stall after tokens before commit (non-streaming client)", tokens_then([("hang",)]), False,
     62.0, ["stall_timeout", "ok"], 200),
    ("cut mid-answer before commit (non-streaming client)", tokens_then([("close",)]), False,
     2.0, ["truncated", "ok"], 200),
    ("500 retried once then failover", respond(500), True, 0.3, ["http_error"] * 2 + ["ok"], 200),
    ("502", respond(502), True, 0.3, ["http_error", "http_error", "ok"], 200),
    ("503", respond(503), True, 0.3, ["http_error", "http_error", "ok"], 200),
    ("504", respond(504), True, 0.3, ["http_error", "http_error", "ok"], 200),
    ("529 overloaded", respond(529), True, 0.3, ["http_error", "http_error", "ok"], 200),
    ("connection refused, retried once", [("refuse",)], True, 0.3,
     ["connect_error", "connect_error", "ok"], 200),
    ("429 without Retry-After", respond(429), True, 0.0, ["rate_limited", "ok"], 200),
    ("429 with a long Retry-After", respond(429, headers={"retry-after": "20"}), True, 0.0,
     ["rate_limited", "ok"], 200),
    ("401", respond(401), True, 0.0, ["auth_error", "ok"], 200),
    ("403", respond(403), True, 0.0, ["auth_error", "ok"], 200),
    ("404", respond(404), True, 0.0, ["not_found", "ok"], 200),
    ("context_length_exceeded", respond(400, OVERFLOW), True, 0.0, ["context_overflow", "ok"], 200),
    ("413", respond(413), True, 0.0, ["context_overflow", "ok"], 200),
    ("200 without choices", respond(200, {"id": "x", "object": "chat.completion"}), True, 0.0,
     ["protocol_error", "ok"], 200),
    ("200 with an unparseable body", [("respond", 200, {}, b"<html>oops")], True, 0.0,
     ["protocol_error", "ok"], 200),
    ("error event before any token", [("head", 200, {}), ("sse", {"error": {
        "message": "overloaded", "type": "server_error"}})], True, 0.0,
     ["upstream_error_event", "ok"], 200),
    ("finish_reason error before any token", [("head", 200, {}), ("sse", fo.sse_chunk(
        finish="error"))], True, 0.0, ["upstream_error_event", "ok"], 200),
    ("stream ends without [DONE] before any token", [("head", 200, {}), ("sse", fo.sse_chunk(
        role="assistant", content=""))], True, 0.0, ["truncated", "ok"], 200),
    ("unparseable SSE data line", [("head", 200, {}), ("raw", b"data: {not json\n\n")], True, 0.0,
     ["protocol_error", "ok"], 200),
    ("garbage bytes then close", [("head", 200, {}), ("raw", b"\x00\xffgarbage\r\nmore junk\n")],
     True, 0.0, ["protocol_error", "ok"], 200),
    ("garbage bytes then silence", [("head", 200, {}), ("raw", b"\x00\xff junk\n\n"), ("hang",)],
     True, 30.0, ["first_token_timeout", "ok"], 200),
    ("wrong content type", [("respond", 200, {"content-type": "text/html"}, b"<html>")], True,
     0.0, ["protocol_error", "ok"], 200),
]


@pytest.mark.parametrize(
    ("script", "stream", "t_first", "outcomes", "status"),
    [pytest.param(*s[1:], id=s[0]) for s in FAILOVER_SCENARIOS],
)
async def test_failover_scenarios(harness, autojump_clock, script, stream, t_first, outcomes,
                                  status):
    h = harness({"a/m1": script, "b/m2": ok_script("all good")})
    r = await h.chat(stream=stream)
    assert r.status == status
    assert r.t_first == pytest.approx(t_first)
    assert r.text == "all good"
    assert r.headers["x-failoverd-served-by"] == "b/m2"
    assert r.headers["x-failoverd-attempts"] == str(len(outcomes))
    assert [o for _, o in h.outcomes()] == outcomes
    [req] = h.rows("request")
    assert req["outcome"] == "ok"
    assert req["served_by"] == "b/m2"
    assert req["attempts"] == len(outcomes)
    assert req["ttft_ms"] == pytest.approx(t_first * 1000)


async def test_bad_request_is_passed_through_without_failover(harness, autojump_clock):
    h = harness({"a/m1": respond(400, BAD_PARAM), "b/m2": ok_script()})
    r = await h.chat()
    assert r.status == 400
    assert r.json == BAD_PARAM
    assert h.upstreams.keys_called() == ["a/m1"]
    assert [o for _, o in h.outcomes()] == ["bad_request"]
    assert h.rows("request")[0]["status"] == 400


async def test_heartbeats_do_not_reset_first_token_deadline(harness, autojump_clock):
    h = harness({"a/m1": HEARTBEATS, "b/m2": ok_script()})
    await h.chat(stream=True)
    assert h.upstreams.calls == [(0.0, "a/m1"), (30.0, "b/m2")]
    assert h.upstreams.closed[0] == (30.0, "a/m1")  # the heartbeat stream is closed at once


async def test_heartbeats_do_not_reset_stall_deadline(harness, autojump_clock):
    script = tokens_then([("comment", "ping"), ("sleep", 5.0)] * 30, n=1, gap=2.0)
    h = harness({"a/m1": script, "b/m2": ok_script()})
    r = await h.chat(stream=False)
    # First token at 2 s; heartbeats every 5 s do not move the 60 s stall deadline.
    assert h.upstreams.calls == [(0.0, "a/m1"), (62.0, "b/m2")]
    assert r.text == "hi there"
    assert h.rows("attempt")[0]["max_gap_ms"] == 0.0


async def test_stall_after_commit_ends_stream_with_in_band_error(harness, autojump_clock):
    h = harness({"a/m1": tokens_then([("hang",)]), "b/m2": ok_script()})
    r = await h.chat(stream=True)
    assert r.status == 200
    assert r.t_first == 1.0
    assert r.t_end == 62.0
    *tokens, error = r.events
    assert [c["choices"][0]["delta"].get("content") for c in tokens] == ["", "t0", "t1"]
    assert error["error"]["code"] == "stall_timeout"
    assert error["failoverd"]["attempts"][0]["outcome"] == "stall_timeout"
    assert "[DONE]" not in r.events
    assert h.upstreams.keys_called() == ["a/m1"]  # no failover after commit
    [row] = h.rows("attempt")
    assert (row["outcome"], row["committed"], row["ttft_ms"], row["max_gap_ms"]) == \
        ("stall_timeout", True, 1000.0, 1000.0)
    assert h.rows("request")[0]["status"] == 504


@pytest.mark.parametrize(("after", "code"), [
    ([("sse", {"error": {"message": "Internal error", "type": "INTERNAL_ERROR"}})],
     "upstream_error_event"),
    ([("sse", fo.sse_chunk(finish="error"))], "upstream_error_event"),
    ([("close",)], "truncated"),
    ([("raw", b"data: {\"choices\": [tru\n\n")], "protocol_error"),
])
async def test_failure_after_commit_is_reported_in_band(harness, autojump_clock, after, code):
    h = harness({"a/m1": tokens_then(after), "b/m2": ok_script()})
    r = await h.chat(stream=True)
    assert r.events[-1]["error"]["code"] == code
    assert r.t_end == 2.0
    assert h.upstreams.keys_called() == ["a/m1"]
    assert h.outcomes() == [("a/m1", code)]


async def test_one_timeout_per_provider_skips_its_other_slots(harness, autojump_clock):
    h = harness({"a/m1": HUNG, "a/m2": ok_script(), "b/m3": ok_script("from b")},
                routes={"r": ["a/m1", "a/m2", "b/m3"]})
    r = await h.chat(stream=True)
    assert r.t_first == 30.0  # one timeout paid, not two
    assert r.text == "from b"
    assert h.outcomes() == [("a/m1", "first_token_timeout"), ("a/m2", "skipped:provider_timed_out"),
                            ("b/m3", "ok")]


async def test_connect_timeout_is_not_retried_and_skips_the_providers_other_slots(
        harness, autojump_clock):
    h = harness({"a/m1": [("connect_timeout",)], "a/m2": ok_script("a2"), "b/m3": ok_script("b")},
                routes={"r": ["a/m1", "a/m2", "b/m3"]})
    r = await h.chat()
    assert (r.status, r.text) == (200, "b")
    assert h.outcomes() == [("a/m1", "connect_error"), ("a/m2", "skipped:provider_timed_out"),
                            ("b/m3", "ok")]


def test_connect_error_mentioning_a_timeout_is_not_a_timeout():
    """Only a deadline makes a timeout, not the words in an error message."""
    failure = fo.Failure("connect_error", "ConnectError: upstream said: timed out earlier")
    assert not fo.is_timeout(failure)
    assert fo.failure_status(failure) == 502


async def test_fast_errors_do_not_skip_the_providers_other_slots(harness, autojump_clock):
    h = harness({"a/m1": respond(404), "a/m2": ok_script("a2")}, routes={"r": ["a/m1", "a/m2"]})
    r = await h.chat()
    assert r.text == "a2"
    assert r.t_first == 0.0


async def test_total_deadline_clips_the_last_attempt(harness, autojump_clock):
    h = harness({"a/m1": HUNG, "b/m2": HUNG}, total_timeout_s=50.0)
    r = await h.chat(stream=True)
    assert r.status == 504
    assert r.t_first == 50.0
    body = r.json
    assert body["error"]["code"] == "upstream_timeout"
    assert [a["outcome"] for a in body["failoverd"]["attempts"]] == \
        ["first_token_timeout", "total_timeout"]
    assert [row["latency_ms"] for row in h.rows("attempt")] == [30000.0, 20000.0]
    assert h.rows("request")[0]["status"] == 504


async def test_total_deadline_ends_a_long_stream_after_commit(harness, autojump_clock):
    h = harness({"a/m1": tokens_then([("hang",)], n=30, gap=10.0)}, routes={"r": ["a/m1"]},
                total_timeout_s=100.0)
    r = await h.chat(stream=True)
    assert r.t_first == 10.0
    assert r.t_end == 100.0
    assert r.events[-1]["error"]["code"] == "total_timeout"


async def test_every_slot_failing_fast_gives_502_with_each_attempt(harness, autojump_clock):
    h = harness({"a/m1": respond(401), "b/m2": respond(500)})
    r = await h.chat()
    assert r.status == 502
    assert r.t_first == 0.3
    err = r.json
    assert err["error"]["type"] == "failoverd_error"
    assert [(a["provider"], a["outcome"], a["status"]) for a in err["failoverd"]["attempts"]] == \
        [("a", "auth_error", 401), ("b", "http_error", 500), ("b", "http_error", 500)]
    assert err["failoverd"]["request_id"] == r.headers["x-failoverd-request-id"]


async def test_short_retry_after_is_waited_out_on_the_same_slot(harness, autojump_clock):
    h = harness({"a/m1": [respond(429, headers={"retry-after": "2"}), ok_script("a again")],
                 "b/m2": ok_script()})
    r = await h.chat(stream=True)
    assert r.text == "a again"
    assert r.t_first == 2.0
    assert h.upstreams.calls == [(0.0, "a/m1"), (2.0, "a/m1")]


async def test_retry_after_ms_header_is_honoured(harness, autojump_clock):
    h = harness({"a/m1": [respond(429, headers={"retry-after-ms": "1500"}), ok_script("a")],
                 "b/m2": ok_script()})
    r = await h.chat()
    assert r.t_first == 1.5


async def test_retry_same_zero_fails_over_at_once(harness, autojump_clock):
    h = harness({"a/m1": respond(503), "b/m2": ok_script()}, retry_same=0)
    r = await h.chat()
    assert r.t_first == 0.0
    assert h.upstreams.keys_called() == ["a/m1", "b/m2"]


async def test_slow_5xx_is_not_retried(harness, autojump_clock):
    h = harness({"a/m1": [("sleep", 10.0), *respond(502)], "b/m2": ok_script()})
    r = await h.chat()
    assert r.t_first == 10.0
    assert h.upstreams.calls == [(0.0, "a/m1"), (10.0, "b/m2")]


async def test_a_timeout_is_never_retried_on_the_same_slot(harness, autojump_clock):
    h = harness({"a/m1": HUNG}, routes={"r": ["a/m1"]})
    r = await h.chat()
    assert r.status == 504
    assert r.t_first == 30.0
    assert h.upstreams.keys_called() == ["a/m1"]


async def test_rate_limited_model_is_held_out_for_later_requests(harness, autojump_clock):
    h = harness({"a/m1": [respond(429, headers={"retry-after": "20"}), ok_script("a back")],
                 "b/m2": ok_script("b")})
    await h.chat()
    await trio.sleep(10.0)
    r = await h.chat()
    assert r.text == "b"
    await trio.sleep(10.0)
    r = await h.chat()
    assert r.text == "a back"
    assert h.outcomes() == [("a/m1", "rate_limited"), ("b/m2", "ok"),
                            ("a/m1", "skipped:rate_limited"), ("b/m2", "ok"), ("a/m1", "ok")]
    assert [(b["scope"], b["key"], b["from"], b["to"]) for b in h.rows("breaker")] == [
        ("model", "a/m1", "closed", "open"), ("model", "a/m1", "open", "closed")]


async def test_bad_key_isolates_the_credential(harness, autojump_clock):
    h = harness({"a/m1": respond(401), "a/m2": ok_script("a2"), "b/m3": ok_script("b")},
                routes={"r": ["a/m1", "b/m3"], "r2": ["a/m2", "b/m3"]})
    await h.chat("r")
    r = await h.chat("r2")
    assert r.text == "b"  # a's other model shares the bad key
    assert h.outcomes()[-2:] == [("a/m2", "skipped:breaker_open"), ("b/m3", "ok")]
    [row] = h.rows("breaker")
    assert row["scope"] == "credential"
    assert row["key"].startswith("a:")


async def test_client_disconnect_cancels_the_upstream_at_once(harness, autojump_clock, nursery):
    h = harness({"a/m1": HEADERS_THEN_SILENCE, "b/m2": ok_script()})
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(7, 1000))
    from conftest import http_request
    await client.send_all(http_request({"model": "r", "stream": True,
                                        "messages": [{"role": "user", "content": "x"}]}))
    await trio.sleep(5.0)
    await client.aclose()
    await trio.sleep(1.0)
    assert h.upstreams.closed == [(5.0, "a/m1")]
    assert h.upstreams.keys_called() == ["a/m1"]
    [attempt] = h.rows("attempt")
    assert (attempt["outcome"], attempt["latency_ms"], attempt["client_pid"]) == \
        ("client_disconnected", 5000.0, 7)
    [req] = h.rows("request")
    assert (req["status"], req["outcome"]) == (499, "error")
    assert not h.d.inflight


async def test_include_usage_is_relayed_only_when_the_client_asked(harness, autojump_clock):
    h = harness({"a/m1": ok_script("x y")})
    plain = await h.chat(stream=True)
    asked = await h.chat(stream=True, stream_options={"include_usage": True})
    assert all(e == "[DONE]" or e["choices"] for e in plain.events)
    assert asked.events[-2]["usage"] == {"prompt_tokens": 12, "completion_tokens": 2,
                                          "total_tokens": 14}


async def test_upstream_is_always_asked_to_stream_with_usage(harness, autojump_clock):
    h = harness({"a/m1": ok_script()})
    await h.chat(stream=False, temperature=0.2)
    sent = msgspec.json.decode(h.upstreams.requests[0].content)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "m1"
    assert sent["temperature"] == 0.2
    assert h.upstreams.requests[0].headers["authorization"] == "Bearer sk-test-secret-key-aaaa"


async def test_non_streaming_reply_carries_answering_model_and_usage(harness, autojump_clock):
    h = harness({"a/m1": HUNG, "b/m2": ok_script("one two three", model="fallback-7b",
                                                   prompt_tokens=40)})
    r = await h.chat()
    body = r.json
    assert body["object"] == "chat.completion"
    assert body["model"] == "fallback-7b"
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "one two three",
                                             "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    ok = h.rows("attempt")[1]
    assert (ok["tokens_in"], ok["tokens_out"], ok["tokens_estimated"]) == (40, 3, False)


async def test_tool_call_deltas_are_assembled(harness, autojump_clock):
    def call(args: str, **first: Any) -> dict:
        tc = {"index": 0, "function": {"arguments": args}}
        if first:
            tc.update(id="call_1", type="function")
            tc["function"]["name"] = "get_weather"
        return {"choices": [{"index": 0, "delta": {"tool_calls": [tc]}, "finish_reason": None}]}

    script = [("head", 200, {}), ("sse", call('{"city":', first=True)), ("sse", call(' "Oslo"}')),
              ("sse", fo.sse_chunk(finish="tool_calls")), ("sse", "[DONE]")]
    h = harness({"a/m1": script})
    r = await h.chat()
    msg = r.json["choices"][0]["message"]
    assert msg["content"] is None
    assert msg["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    assert r.json["choices"][0]["finish_reason"] == "tool_calls"


async def test_costs_come_from_model_prices(harness, autojump_clock):
    h = harness({"a/m1": ok_script(prompt_tokens=1_000_000)},
                models={"a/m1": fo.ModelConfig(price_in_per_mtok=3.0, price_out_per_mtok=15.0)})
    await h.chat()
    assert h.rows("attempt")[0]["cost_usd"] == pytest.approx(3.0 + 2 * 15.0 / 1e6)


async def test_failed_attempt_with_output_records_estimated_tokens(harness, autojump_clock):
    h = harness({"a/m1": tokens_then([("close",)]), "b/m2": ok_script()})
    await h.chat()
    row = h.rows("attempt")[0]
    assert row["outcome"] == "truncated"
    assert row["tokens_estimated"] is True
    assert row["tokens_in"] > 0


# -- Anthropic ------------------------------------------------------------------

def anthropic_events(*events: tuple[str, dict]) -> list:
    steps: list = [("head", 200, {})]
    for name, data in events:
        steps.append(("raw", f"event: {name}\ndata: {msgspec.json.encode(data).decode()}\n\n"
                      .encode()))
    return steps


ANTHROPIC_OK = anthropic_events(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "model": "claude-haiku-4-5", "usage": {"input_tokens": 25}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": " there"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                       "usage": {"output_tokens": 2}}),
    ("message_stop", {"type": "message_stop"}),
)


@pytest.mark.parametrize("stream", [True, False])
async def test_anthropic_stream_is_translated(harness, autojump_clock, stream):
    h = harness({"x/claude-haiku-4-5": ANTHROPIC_OK}, routes={"r": ["x/claude-haiku-4-5"]},
                anthropic=("x",))
    r = await h.chat(stream=stream, stream_options={"include_usage": True})
    assert r.text == "Hello there"
    usage = r.json["usage"] if not stream else r.events[-2]["usage"]
    assert usage == {"prompt_tokens": 25, "completion_tokens": 2, "total_tokens": 27}
    sent = msgspec.json.decode(h.upstreams.requests[0].content)
    assert sent["stream"] is True
    assert sent["max_tokens"] == 4096
    assert h.upstreams.requests[0].url.path == "/v1/messages"


async def test_anthropic_pings_are_not_progress(harness, autojump_clock):
    pings = anthropic_events(("ping", {"type": "ping"})) + [("sleep", 10.0)] + \
        anthropic_events(("ping", {"type": "ping"}))[1:] + [("hang",)]
    h = harness({"x/c": pings, "b/m2": ok_script()}, routes={"r": ["x/c", "b/m2"]},
                anthropic=("x",))
    r = await h.chat(stream=True)
    assert r.t_first == 30.0
    assert h.outcomes() == [("x/c", "first_token_timeout"), ("b/m2", "ok")]


async def test_anthropic_overloaded_event_on_200_fails_over(harness, autojump_clock):
    overloaded = anthropic_events(("error", {"type": "error", "error": {
        "type": "overloaded_error", "message": "Overloaded"}}))
    h = harness({"x/c": overloaded, "b/m2": ok_script()}, routes={"r": ["x/c", "b/m2"]},
                anthropic=("x",))
    r = await h.chat()
    assert r.text == "hi there"
    row = h.rows("attempt")[0]
    assert row["outcome"] == "upstream_error_event"
    assert "overloaded_error" in row["error"]


def test_anthropic_request_translation():
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "t1", "type": "function",
                "function": {"name": "wx", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        ],
        "max_tokens": 100, "temperature": 0.5, "stop": "END",
        "tools": [{"type": "function", "function": {"name": "wx", "parameters": {
            "type": "object"}}}],
        "tool_choice": "required",
    }
    out = fo.anthropic_body("claude", body, fo.ModelConfig())
    assert out["system"] == "be brief"
    assert out["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "wx",
                                           "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "sunny"}]},
    ]
    assert (out["max_tokens"], out["temperature"], out["stop_sequences"]) == (100, 0.5, ["END"])
    assert out["tools"] == [{"name": "wx", "description": "", "input_schema": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "any"}


def test_anthropic_request_translation_of_parts_tool_results_and_roles():
    """The output of the translation before it became typed (issue 10), kept exactly."""
    body = {"messages": [
        {"role": "system", "content": "a"},
        {"role": "developer", "content": [
            {"type": "text", "text": "b"},
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            {"type": "text", "text": "c"}]},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "https://e/i.jpg", "detail": "high"}},
            {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]},
        {"role": "assistant", "content": "let me check", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "wx", "arguments": '{"c":1}'}},
            {"id": "t2", "type": "function", "function": {"name": "wy", "arguments": "no"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": [{"type": "text", "text": "rain"}]},
        {"role": "ipython", "content": "x"}],
        "max_completion_tokens": 50, "max_tokens": 100, "top_p": 0.9, "stop": ["a", "b"],
        "tools": [{"type": "function", "function": {"name": "a", "description": None}},
                  {"type": "custom", "custom": {"name": "c"}}],
        "tool_choice": {"type": "function", "function": {"name": "a"}}}

    out = fo.anthropic_body("m", body, fo.ModelConfig())

    assert out == {
        "model": "m", "stream": True, "max_tokens": 50, "system": "a\n\nb  c", "top_p": 0.9,
        "stop_sequences": ["a", "b"],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://e/i.jpg"}}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "let me check"},
                {"type": "tool_use", "id": "t1", "name": "wx", "input": {"c": 1}},
                {"type": "tool_use", "id": "t2", "name": "wy", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "t2",
                 "content": [{"type": "text", "text": "rain"}]}]},
            {"role": "ipython", "content": "x"}],
        "tools": [{"name": "a", "description": None, "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "a"},
    }


@pytest.mark.parametrize(("event", "data", "outcome"), [
    (b"message", b'{"type": "future_kind", "x": 1}', None),  # added later: ignored
    (b"message", b'{"type": "content_block_delta", "index": 0, "delta": {'
                 b'"type": "signature_delta", "signature": "abc"}}', None),
    (b"error", b'{"type": "future_kind", "error": "boom"}', "upstream_error_event"),
    (b"error", b'{"error": {"type": "overloaded_error", "message": "m"}}',
     "upstream_error_event"),
    (b"message", b'{"type": "content_block_delta", "index": "x"}', "protocol_error"),
    (b"message", b'{"type": 5}', "protocol_error"),
    (b"message", b"[1, 2]", "protocol_error"),
    (b"message", b"not json", "protocol_error"),
])
def test_anthropic_events_failoverd_does_not_know_or_cannot_read(event, data, outcome):
    st = fo.StreamState(assemble=False, want_usage=False)
    if outcome is None:
        assert fo.AnthropicAdapter.on_event(event, data, st) is None
        assert not st.progress
        return
    with pytest.raises(fo.Failure) as e:
        fo.AnthropicAdapter.on_event(event, data, st)
    assert e.value.outcome == outcome


# -- policy (pure) --------------------------------------------------------------

@pytest.mark.parametrize(("status", "body", "outcome"), [
    (429, b"", "rate_limited"), (401, b"", "auth_error"), (403, b"", "auth_error"),
    (404, b"", "not_found"), (400, b'{"error":{"code":"model_not_found","message":"x"}}',
                              "not_found"),
    (400, msgspec.json.encode(OVERFLOW), "context_overflow"), (413, b"", "context_overflow"),
    (400, b'{"error":{"type":"invalid_request_error","message":"prompt is too long: 210000 '
          b'tokens > 200000 maximum"}}', "context_overflow"),
    (400, msgspec.json.encode(BAD_PARAM), "bad_request"), (422, b"{}", "bad_request"),
    (500, b"", "http_error"), (529, b"", "http_error"), (418, b"", "http_error"),
])
def test_classify_status(status, body, outcome):
    assert fo.classify_status(status, body)[0] == outcome


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after": "7"}, 7.0), ({"retry-after": "1.5"}, 1.5),
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
    ({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "1.5s"}, 360.0),
    ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
    ({"retry-after": "soon"}, None), ({}, None),
])
def test_parse_retry_after(headers, seconds):
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    expected = None if seconds is None else pytest.approx(seconds)
    assert fo.parse_retry_after(headers, now) == expected


def test_rate_limit_hold_defaults_and_caps():
    cfg = fo.BreakerConfig()
    assert fo.rate_limit_hold(None, cfg) == 30.0
    assert fo.rate_limit_hold(7.0, cfg) == 7.0
    assert fo.rate_limit_hold(3600.0, cfg) == 600.0


def test_sse_parser_splits_events_across_reads():
    p = fo.SSEParser()
    assert p.feed(b"data: {\"a\"") == []
    assert p.feed(b": 1}\r\n\r\n: keep-alive\n\nevent: x\ndata: 1\ndata: 2\n\nid: 5\nfoo\n") == [
        (None, b'{"a": 1}'), (b"x", b"1\n2")]
    assert (p.heartbeats, p.junk) == (1, 1)
    assert p.feed(b"data: tail") == []
    assert p.close() == [(None, b"tail")]
