"""Continuing an answer that broke after commit (SPEC section 11), through the engine, in
virtual time over kernel socket pairs.

Route "r" is a/m1 -> b/m2 (-> c/m3) with `continuation = true`; a's answer breaks, b or c
continues it from the text the client has. The scripted upstreams are
`failoverd.ContinuingModel`s that really continue from the prefill they are sent.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
from conftest import ClientResult, http_request, read_response, socket_pair
from test_continuation import PARTS

import failoverd as fo

ANSWER = "".join(PARTS)


def models(**prefill: str) -> dict[str, fo.ModelConfig]:
    """{"b/m2": "trailing"} as ModelConfigs with that prefill."""
    return {key.replace("_", "/"): fo.ModelConfig(prefill=mode) for key, mode in prefill.items()}


def rescue_harness(harness, first: Any, second: Any, *, third: Any = None,
                   prefill: dict[str, str] | None = None, anthropic: tuple[str, ...] = (),
                   **timing: Any):
    scripts = {"a/m1": first, "b/m2": second}
    chain = ["a/m1", "b/m2"]
    if third is not None:
        scripts["c/m3"] = third
        chain.append("c/m3")
    prefill = prefill or {"b_m2": "trailing", "c_m3": "trailing"}
    return harness(scripts, routes={"r": chain}, models=models(**prefill), anthropic=anthropic,
                   continuation=True, **timing)


def sent_body(h, key: str) -> dict[str, Any]:
    [request] = [r for r in h.upstreams.requests
                 if f"{r.url.host.split('.')[0]}/{msgspec.json.decode(r.content)['model']}" == key]
    return msgspec.json.decode(request.content)


@pytest.mark.parametrize("cut", range(1, len(PARTS)))
async def test_a_cut_answer_is_finished_by_the_next_slot_seamlessly(harness, autojump_clock, cut):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=cut),
                       fo.ContinuingModel(PARTS))
    r = await h.chat(stream=True)
    assert r.status == 200
    assert r.text == ANSWER  # no character lost or repeated at the seam
    assert r.events.count("[DONE]") == 1
    assert r.events[-1] == "[DONE]"
    assert len({e["id"] for e in r.events if isinstance(e, dict)}) == 1  # one stream
    finishes = [c["finish_reason"] for e in r.events if isinstance(e, dict)
                for c in e.get("choices") or () if c.get("finish_reason")]
    assert finishes == ["stop"]
    assert sent_body(h, "b/m2")["messages"][-1] == {
        "role": "assistant", "content": "".join(PARTS[:cut]).rstrip()}
    assert [(o, row["continued"]) for (_, o), row in zip(h.outcomes(), h.rows("attempt"),
                                                          strict=True)] == \
        [("truncated", False), ("ok", True)]
    [req] = h.rows("request")
    assert (req["status"], req["served_by"], req["continued"]) == (200, "b/m2", True)


@pytest.mark.parametrize(("mode", "message", "top"), [
    ("prefix", {"prefix": True}, {}),
    ("vllm", {}, {"continue_final_message": True, "add_generation_prompt": False}),
])
async def test_prefix_and_vllm_fallbacks_get_their_request_shapes(harness, autojump_clock, mode,
                                                                  message, top):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=4),
                       fo.ContinuingModel(PARTS, prefill=mode), prefill={"b_m2": mode})
    r = await h.chat(stream=True)
    assert r.text == ANSWER
    sent = sent_body(h, "b/m2")
    assert sent["messages"] == [{"role": "user", "content": "hello"},
                                {"role": "assistant", "content": "The answer is", **message}]
    assert {k: sent[k] for k in top} == top
    assert sent["stream"] is True


async def test_an_anthropic_fallback_gets_a_prefill_without_trailing_whitespace(
        harness, autojump_clock):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=4),
                       fo.ContinuingModel(PARTS, kind="anthropic"), anthropic=("b",))
    r = await h.chat(stream=True)
    assert r.text == ANSWER  # "The answer is " was cut after the space; the seam holds
    assert sent_body(h, "b/m2")["messages"][-1] == {"role": "assistant",
                                                     "content": "The answer is"}


@pytest.mark.parametrize(("breaks", "outcome", "t_end"), [
    ("hang", "stall_timeout", 63.0), ("garbage", "protocol_error", 3.0),
    ("error", "upstream_error_event", 3.0),
])
async def test_stalls_and_bad_chunks_after_commit_are_continued(harness, autojump_clock, breaks,
                                                                outcome, t_end):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3, breaks=breaks, gap=1.0),
                       fo.ContinuingModel(PARTS))
    r = await h.chat(stream=True)
    assert (r.text, r.t_end) == (ANSWER, t_end)
    assert [o for _, o in h.outcomes()] == [outcome, "ok"]


async def test_usage_reports_both_attempts(harness, autojump_clock):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3),
                       fo.ContinuingModel(PARTS))
    r = await h.chat(stream=True, stream_options={"include_usage": True})
    usage = r.events[-2]["usage"]
    first, second = h.rows("attempt")
    assert usage["completion_tokens"] == first["tokens_out"] + second["tokens_out"]
    assert usage["prompt_tokens"] == first["tokens_in"] + second["tokens_in"]


async def test_a_fallback_that_rejects_the_prefill_is_marked_and_skipped_next_time(
        harness, autojump_clock, tmp_path):
    cut = fo.ContinuingModel(PARTS, cut_after=3)
    h = rescue_harness(harness, cut, fo.ContinuingModel(PARTS, rejects=True),
                       third=fo.ContinuingModel(PARTS))
    r = await h.chat(stream=True)
    error = r.events[-1]["error"]
    assert error["code"] == "truncated"  # the original failure, never the 400
    assert "a/m1 failed mid-stream: truncated" in error["message"]
    assert "[DONE]" not in r.events
    assert [o for _, o in h.outcomes()] == ["truncated", "prefill_rejected"]
    assert h.upstreams.keys_called() == ["a/m1", "b/m2"]  # at most one continuation
    r = await h.chat(stream=True)  # the next request skips b for continuing: c does it
    assert r.text == ANSWER
    assert h.upstreams.keys_called()[2:] == ["a/m1", "c/m3"]
    state = msgspec.json.decode((tmp_path / "state.json").read_bytes())
    assert list(state["prefill_unable"]) == ["b/m2"]  # it survives a restart
    restarted = rescue_harness(harness, cut, fo.ContinuingModel(PARTS), third=cut)
    assert not restarted.d.can_continue(restarted.d.snap, fo.Slot("b", "m2"))


async def test_a_config_change_lifts_the_mark(harness, autojump_clock):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3),
                       fo.ContinuingModel(PARTS, rejects=True))
    await h.chat(stream=True)
    assert not h.d.can_continue(h.d.snap, fo.Slot("b", "m2"))
    changed = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3),
                             fo.ContinuingModel(PARTS), prefill={"b_m2": "vllm"})
    assert changed.d.can_continue(changed.d.snap, fo.Slot("b", "m2"))


async def test_tool_call_turns_are_never_continued(harness, autojump_clock):
    call = {"choices": [{"index": 0, "delta": {"tool_calls": [{
        "index": 0, "id": "call_1", "type": "function",
        "function": {"name": "wx", "arguments": '{"ci'}}]}, "finish_reason": None}]}
    script = [("head", 200, {}), ("sse", call), ("close",)]
    h = rescue_harness(harness, script, fo.ContinuingModel(PARTS))
    r = await h.chat(stream=True)
    assert r.events[-1]["error"]["code"] == "truncated"
    assert h.upstreams.keys_called() == ["a/m1"]
    assert h.rows("request")[0]["continued"] is False


async def test_no_continuation_unless_the_route_asks_for_it(harness, autojump_clock):
    h = harness({"a/m1": fo.ContinuingModel(PARTS, cut_after=3), "b/m2": fo.ContinuingModel(PARTS)},
                models=models(b_m2="trailing"))
    r = await h.chat(stream=True)
    assert r.events[-1]["error"]["code"] == "truncated"
    assert h.upstreams.keys_called() == ["a/m1"]


async def test_no_continuation_onto_a_model_without_prefill(harness, autojump_clock):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3),
                       fo.ContinuingModel(PARTS), prefill={"b_m2": "none"})
    r = await h.chat(stream=True)
    assert r.events[-1]["error"]["code"] == "truncated"
    assert h.upstreams.keys_called() == ["a/m1"]


async def test_the_total_deadline_clips_the_continuation(harness, autojump_clock):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3, gap=1.0), [("hang",)],
                       total_timeout_s=20.0)
    r = await h.chat(stream=True)
    assert r.t_end == 20.0  # not b's own 30 s first-token deadline
    error = r.events[-1]["error"]
    assert error["code"] == "truncated"
    assert "continuing the answer on b/m2 failed too: total_timeout" in error["message"]
    assert [o for _, o in h.outcomes()] == ["truncated", "total_timeout"]


async def test_the_continuation_has_its_own_first_token_deadline(harness, autojump_clock):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3, gap=1.0), [("hang",)])
    r = await h.chat(stream=True)
    assert r.t_end == 33.0  # broken at 3 s, b given its 30 s from then
    assert [o for _, o in h.outcomes()] == ["truncated", "first_token_timeout"]


async def test_a_client_gone_during_the_continuation_cancels_it(harness, autojump_clock,
                                                              nursery):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3),
                       [("head", 200, {}), ("hang",)])
    client, server = socket_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True, "messages": [
        {"role": "user", "content": "hello"}]}))
    await trio.sleep(5.0)
    await client.aclose()
    await trio.sleep(1.0)
    assert (5.0, "b/m2") in h.upstreams.closed
    assert [o for _, o in h.outcomes()] == ["truncated", "client_disconnected"]
    assert h.rows("request")[0]["status"] == 499


async def test_a_non_streaming_client_fails_over_as_before(harness, autojump_clock):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3), fo.ContinuingModel(PARTS))
    r = await h.chat(stream=False)
    assert r.text == ANSWER
    assert sent_body(h, "b/m2")["messages"] == [{"role": "user", "content": "hello"}]
    assert h.rows("request")[0]["continued"] is False


async def test_the_stream_reads_as_one_answer_to_an_h11_client(harness, autojump_clock, nursery):
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=5),
                       fo.ContinuingModel(PARTS))
    client, server = socket_pair()
    nursery.start_soon(fo.handle_connection, h.d, server, fo.Peer(1, 1))
    await client.send_all(http_request({"model": "r", "stream": True, "messages": [
        {"role": "user", "content": "hello"}]}))
    r = await read_response(client, ClientResult())
    assert r.body.endswith(b"data: [DONE]\n\n")
    assert r.text == ANSWER


async def test_a_continuation_refused_with_a_plain_400_ends_with_the_in_band_error(
        harness, autojump_clock):
    """After commit a failure is one in-band error event: a continuation's 400 that is
    not about the prefill is no pass-through (a second response head is impossible)."""
    plain_400 = [("respond", 400, {}, msgspec.json.encode({"error": {
        "message": "temperature must be at most 1.0", "type": "invalid_request_error"}}))]
    h = rescue_harness(harness, fo.ContinuingModel(PARTS, cut_after=3), plain_400)
    r = await h.chat(stream=True)
    error = r.events[-1]["error"]
    assert error["code"] == "truncated"
    assert "continuing the answer on b/m2 failed too: bad_request" in error["message"]
    assert h.rows("request")[0]["status"] == 502
