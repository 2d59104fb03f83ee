"""Continuing an answer that broke after commit (SPEC section 11), the engine-free parts.

The config keys; the request each prefill shape sends (exact bodies); the Seam that
joins the continuation to what the client already has, character for character; the
detector for a 4xx that refuses a prefill; the predicate that decides whether a request
may be continued on a slot; and `ContinuingModel`, the scripted upstream that really
continues the prefill it receives. The pipeline tests run the adapters, Relayed,
continue_payload, the fake and the Seam together exactly as the engine will chain them,
without the engine.
"""

from __future__ import annotations

from typing import Any

import httpx2
import msgspec
import openai
import pytest
import trio
from conftest import MockUpstreams, make_config

import failoverd as fo

BODY: dict[str, Any] = {"model": "r", "stream": True,
                        "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hello"}]}


def chunk(content: str | None = None, **delta: Any) -> bytes:
    """One relayed frame: an OpenAI chunk with `content` and any other delta fields."""
    c = fo.sse_chunk(content)
    c["choices"][0]["delta"].update(delta)
    return fo._json_encode(c)


def relayed_of(*frames: bytes, body: dict[str, Any] | None = None) -> fo.Relayed:
    r = fo.Relayed(body or BODY)
    for f in frames:
        r.add(f)
    return r


def openai_payload(body: dict[str, Any] = BODY) -> bytes:
    return fo.OpenAIAdapter.request("http://b.test/v1", "m2", body, None, fo.ModelConfig())[2]


def anthropic_payload(body: dict[str, Any] = BODY) -> bytes:
    return fo.AnthropicAdapter.request("http://x.test/v1", "claude", body, None,
                                       fo.ModelConfig())[2]


# -- config ---------------------------------------------------------------------

CONFIG = """\
[providers.a]
base_url = "http://a.test/v1"
[providers.b]
base_url = "http://b.test/v1"
[providers.x]
kind = "anthropic"
base_url = "http://x.test/v1"
[models."b/m2"]
prefill = "prefix"
[models."x/claude"]
prefill = "trailing"
[defaults]
continuation = true
[routes.r]
chain = ["a/m1", "b/m2"]
[routes.off]
chain = ["a/m1", "x/claude"]
continuation = false
"""


def test_prefill_and_continuation_parse_with_route_overriding_defaults():
    cfg = fo.parse_config(CONFIG)
    assert cfg.models["b/m2"].prefill == "prefix"
    assert cfg.models["x/claude"].prefill == "trailing"
    assert fo.ModelConfig().prefill == "none"
    assert fo.Timing().continuation is False
    assert fo.resolve_route(cfg, "r", cfg.routes["r"]).timing.continuation is True
    assert fo.resolve_route(cfg, "off", cfg.routes["off"]).timing.continuation is False


def test_continuation_is_off_by_default():
    cfg = fo.parse_config(CONFIG.replace("[defaults]\ncontinuation = true\n", ""))
    assert fo.resolve_route(cfg, "r", cfg.routes["r"]).timing.continuation is False


def test_unknown_prefill_names_the_key_and_the_allowed_values():
    with pytest.raises(fo.ConfigError) as e:
        fo.parse_config(CONFIG.replace('prefill = "prefix"', 'prefill = "assistant"'))
    assert "models.b/m2.prefill" in str(e.value)
    assert "'assistant'" in str(e.value)
    assert "expected 'none', 'trailing', 'prefix' or 'vllm'" in str(e.value)


@pytest.mark.parametrize("mode", ["prefix", "vllm"])
def test_anthropic_model_accepts_only_its_own_prefill(mode):
    with pytest.raises(fo.ConfigError) as e:
        fo.parse_config(CONFIG.replace('prefill = "trailing"', f'prefill = "{mode}"'))
    assert f"models.'x/claude'.prefill = '{mode}'" in str(e.value)
    assert "expected 'trailing' or 'none'" in str(e.value)


def test_check_warns_when_no_fallback_can_continue():
    cfg = fo.parse_config(CONFIG.replace('prefill = "prefix"', 'prefill = "none"'))
    _, warnings = fo.check_report(cfg)
    assert any(w.startswith("routes.r: continuation = true, but no slot after the first "
                            "declares prefill") for w in warnings)
    _, warnings = fo.check_report(fo.parse_config(CONFIG))
    assert not any("continuation" in w for w in warnings)


# -- request shapes -------------------------------------------------------------

CUT = relayed_of(chunk(role="assistant", content=""), chunk("The answer"), chunk(" is"),
                 chunk(" "))
EXPECTED_OPENAI = {
    "model": "m2", "stream": True,
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                 {"role": "assistant", "content": "The answer is"}],
    "stream_options": {"include_usage": True},
}


@pytest.mark.parametrize(("mode", "message_extra", "top_extra"), [
    ("trailing", {}, {}),
    ("prefix", {"prefix": True}, {}),
    ("vllm", {}, {"continue_final_message": True, "add_generation_prompt": False}),
])
def test_openai_continuation_request_bodies(mode, message_extra, top_extra):
    payload, prefill = fo.continue_payload("openai", mode, openai_payload(), CUT)
    expected = {**EXPECTED_OPENAI, **top_extra}
    expected["messages"] = [*expected["messages"][:2],
                            {**expected["messages"][2], **message_extra}]
    assert msgspec.json.decode(payload) == expected
    assert prefill == fo.Prefill(content="The answer is", cut=" ", index=2)


def test_anthropic_continuation_is_its_own_prefill_without_trailing_whitespace():
    payload, prefill = fo.continue_payload("anthropic", "trailing", anthropic_payload(), CUT)
    assert msgspec.json.decode(payload) == {
        "model": "claude", "max_tokens": 4096, "stream": True, "system": "be brief",
        "messages": [{"role": "user", "content": "hello"},
                     {"role": "assistant", "content": "The answer is"}],
    }
    assert prefill.index == 1  # Anthropic's messages hold no system message
    assert prefill.cut == " "


@pytest.mark.parametrize("ws", [" ", "\n\n", " \n\t ", "\u00a0"])
def test_every_trailing_whitespace_is_cut_and_remembered(ws):
    relayed = relayed_of(chunk("code:"), chunk(ws))
    body, prefill = fo.continue_body("anthropic", "trailing",
                                     msgspec.json.decode(anthropic_payload()), relayed)
    assert body["messages"][-1]["content"] == "code:"
    assert prefill.cut == ws


def test_output_already_spent_comes_off_the_client_limit():
    body = {**BODY, "max_tokens": 100, "max_completion_tokens": 50}
    out, _ = fo.continue_body("openai", "trailing", msgspec.json.decode(openai_payload(body)),
                              CUT, used_tokens=30)
    assert (out["max_tokens"], out["max_completion_tokens"]) == (70, 20)
    out, _ = fo.continue_body("openai", "trailing", dict(body), CUT, used_tokens=500)
    assert (out["max_tokens"], out["max_completion_tokens"]) == (1, 1)
    out, _ = fo.continue_body("anthropic", "trailing", msgspec.json.decode(anthropic_payload()),
                              CUT, used_tokens=96)
    assert out["max_tokens"] == 4000
    out, _ = fo.continue_body("openai", "trailing", dict(BODY), CUT, used_tokens=30)
    assert "max_tokens" not in out  # no limit asked, none invented


def test_prefix_carries_reasoning_and_continues_it_when_the_answer_broke_inside_it():
    during = relayed_of(chunk(reasoning_content="Let me think"), chunk(reasoning_content=". "))
    out, prefill = fo.continue_body("openai", "prefix", dict(BODY), during)
    assert out["messages"][-1] == {"role": "assistant", "content": "", "prefix": True,
                                   "reasoning_content": "Let me think."}
    assert (prefill.thinking, prefill.reasoning_cut) == (True, " ")
    after = relayed_of(chunk(reasoning_content="Hmm. "), chunk("Yes, "))
    out, prefill = fo.continue_body("openai", "prefix", dict(BODY), after)
    assert out["messages"][-1] == {"role": "assistant", "content": "Yes,", "prefix": True,
                                   "reasoning_content": "Hmm. "}
    assert (prefill.thinking, prefill.reasoning_cut, prefill.cut) == (False, "", " ")


@pytest.mark.parametrize("mode", ["trailing", "vllm"])
def test_wires_without_a_reasoning_field_send_only_the_content(mode):
    relayed = relayed_of(chunk(reasoning_content="Let me think."), chunk("Yes"))
    out, prefill = fo.continue_body("openai", mode, dict(BODY), relayed)
    assert out["messages"][-1] == {"role": "assistant", "content": "Yes"}
    assert not prefill.thinking


@pytest.mark.parametrize("mode", ["trailing", "prefix", "vllm"])
def test_nothing_to_prefill_sends_the_request_unchanged(mode):
    only_ws = relayed_of(chunk(role="assistant", content=""), chunk("\n\n"))
    out, prefill = fo.continue_body("openai", mode, dict(BODY), only_ws)
    assert out == BODY
    assert (prefill.index, prefill.cut) == (None, "\n\n")


def test_a_clients_own_final_assistant_message_is_extended():
    body = {**BODY, "messages": [*BODY["messages"],
                                 {"role": "assistant", "content": [{"type": "text",
                                                                    "text": "Sure:"}]}]}
    out, prefill = fo.continue_body("openai", "prefix", body, relayed_of(chunk(" yes"),
                                                                         chunk(" ")))
    assert out["messages"] == [*BODY["messages"],
                               {"role": "assistant", "content": "Sure: yes", "prefix": True}]
    assert (prefill.index, prefill.cut) == (2, " ")


def test_an_earlier_tool_turn_is_left_as_it_was():
    turn = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "wx", "arguments": "{}"}}]}
    body = {**BODY, "messages": [*BODY["messages"], turn,
                                 {"role": "tool", "tool_call_id": "t1", "content": "sunny"}]}
    out, prefill = fo.continue_body("openai", "trailing", body, relayed_of(chunk("It is")))
    assert out["messages"] == [*body["messages"], {"role": "assistant", "content": "It is"}]
    assert prefill.index == 4
    assert body["messages"][-1]["role"] == "tool"  # the caller's body is not touched


@pytest.mark.parametrize(("kind", "mode"), [("openai", "none"), ("anthropic", "none"),
                                            ("anthropic", "prefix"), ("anthropic", "vllm")])
def test_a_model_that_cannot_continue_is_never_shaped(kind, mode):
    with pytest.raises(ValueError, match="cannot continue"):
        fo.continue_body(kind, mode, dict(BODY), CUT)


# -- the seam -------------------------------------------------------------------

def seam_text(relayed: list[str], continuation: list[str | None]) -> str:
    """What the client assembles: the relayed content, then the continuation's content
    deltas (None = a role-only delta) after the Seam."""
    r = relayed_of(*(chunk(t) for t in relayed))
    _, prefill = fo.continue_body("openai", "trailing", dict(BODY), r)
    seam = fo.Seam(prefill, r)
    text = r.content
    for delta in continuation:
        frame = seam.frame(chunk(role="assistant", content="") if delta is None else chunk(delta))
        if frame is not None:
            text += msgspec.json.decode(frame)["choices"][0]["delta"].get("content") or ""
    return text


@pytest.mark.parametrize(("relayed", "continuation", "client_sees"), [
    (["Hello,", " "], [None, " world", "."], "Hello, world."),  # same whitespace again
    (["Hello,", " "], ["", "", " world"], "Hello, world"),  # empty first deltas
    (["Hello,", " "], ["world"], "Hello, world"),  # none: nothing to drop
    (["Para", "\n\n"], ["\n", "\nNext"], "Para\n\nNext"),  # split across deltas
    (["Para", "\n"], ["\n", "", "\n", "Next"], "Para\n\nNext"),  # more than was cut: kept
    (["Para", "\n\n"], ["\nNext"], "Para\n\nNext"),  # less than was cut: nothing added
    (["Hello,", " "], ["\nworld"], "Hello, \nworld"),  # different: the client keeps its own
    (["def f():\n", "    "], ["\n", "  ", "\treturn 1"], "def f():\n    \treturn 1"),
    (["Hello,", " "], [" ", " x"], "Hello,  x"),  # matched, then the model's own space
    (["Hel"], ["lo", " there"], "Hello there"),  # cut mid-word: no whitespace at the cut
    (["a ", "b", " \n "], [" \n ", "c"], "a b \n c"),  # only the end is the cut
])
def test_seam_loses_and_repeats_nothing(relayed, continuation, client_sees):
    assert seam_text(relayed, continuation) == client_sees


def test_seam_drops_empty_frames_and_keeps_one_stream_id():
    r = relayed_of(chunk("Hi"), chunk(" "))
    seam = fo.Seam(fo.continue_body("openai", "trailing", dict(BODY), r)[1], r)
    other = {"id": "chatcmpl-other", "created": 1800000000}
    role = fo.sse_chunk(role="assistant", content="") | other
    assert seam.frame(fo._json_encode(role)) is None
    whitespace = fo.sse_chunk(" ") | other
    assert seam.frame(fo._json_encode(whitespace)) is None  # all of it was the cut
    word = msgspec.json.decode(seam.frame(fo._json_encode(fo.sse_chunk("there") | other)))
    assert (word["id"], word["created"]) == ("chatcmpl-sim", 1700000000)
    assert word["choices"][0]["delta"] == {"content": "there"}
    finish = msgspec.json.decode(seam.frame(fo._json_encode(fo.sse_chunk(finish="stop"))))
    assert finish["choices"][0]["finish_reason"] == "stop"
    usage = fo._json_encode(fo.sse_chunk(choices=False, usage=(3, 4)) | other)
    assert msgspec.json.decode(seam.frame(usage))["usage"]["completion_tokens"] == 4


def test_seam_drops_reasoning_once_the_answer_had_begun():
    r = relayed_of(chunk(reasoning_content="thought"), chunk("Yes"))
    seam = fo.Seam(fo.continue_body("openai", "prefix", dict(BODY), r)[1], r)
    assert seam.frame(chunk(reasoning_content="more thought")) is None
    assert seam.frame(chunk(reasoning="more thought")) is None
    out = msgspec.json.decode(seam.frame(chunk(" it is", reasoning_content="x")))
    assert out["choices"][0]["delta"] == {"content": " it is"}


def test_seam_continues_reasoning_cut_inside_it():
    r = relayed_of(chunk(reasoning_content="Let me"), chunk(reasoning_content=" "))
    seam = fo.Seam(fo.continue_body("openai", "prefix", dict(BODY), r)[1], r)
    out = msgspec.json.decode(seam.frame(chunk(reasoning_content=" think")))
    assert out["choices"][0]["delta"] == {"reasoning_content": "think"}
    out = msgspec.json.decode(seam.frame(chunk("Yes")))
    assert out["choices"][0]["delta"] == {"content": "Yes"}


# -- what may be continued ------------------------------------------------------

ALLOWED = {"enabled": True, "outcome": "truncated", "committed": True, "continued": False}


@pytest.mark.parametrize("outcome", sorted(fo.CONTINUABLE_OUTCOMES))
def test_a_broken_stream_may_be_continued(outcome):
    assert set(fo.CONTINUABLE_OUTCOMES) == {"truncated", "stall_timeout",
                                            "upstream_error_event", "protocol_error"}
    assert fo.continue_blocker(**{**ALLOWED, "outcome": outcome}, relayed=CUT) is None


@pytest.mark.parametrize(("change", "reason"), [
    ({"enabled": False}, "continuation is off for this route"),
    ({"committed": False}, "nothing was relayed yet (an ordinary failover)"),
    ({"outcome": "total_timeout"}, "total_timeout is not a stream that broke"),
    ({"outcome": "first_token_timeout"}, "first_token_timeout is not a stream that broke"),
    ({"outcome": "client_disconnected"}, "client_disconnected is not a stream that broke"),
    ({"outcome": "bad_request"}, "bad_request is not a stream that broke"),
    ({"outcome": "http_error"}, "http_error is not a stream that broke"),
    ({"continued": True}, "the request was continued once already"),
])
def test_each_condition_blocks_a_continuation(change, reason):
    assert fo.continue_blocker(**{**ALLOWED, **change}, relayed=CUT) == reason


def test_continuation_off_is_a_request_without_relayed_text():
    assert fo.continue_blocker(**ALLOWED, relayed=None) == "continuation is off for this route"


@pytest.mark.parametrize(("prefill", "unable", "reason"), [
    ("trailing", False, None), ("prefix", False, None), ("vllm", False, None),
    ("none", False, "the model declares no prefill"),
    ("trailing", True, "the model rejected a prefill before"),
])
def test_which_slots_can_continue(prefill, unable, reason):
    assert fo.slot_blocker(prefill=prefill, unable=unable) == reason


TOOL_DELTA = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                              "function": {"name": "wx", "arguments": '{"ci'}}]}


@pytest.mark.parametrize(("frames", "body", "reason"), [
    ([chunk("Let me check."), chunk(**TOOL_DELTA)], BODY, "a tool-call delta was relayed"),
    ([chunk(refusal="I can't")], BODY, "a refusal was relayed"),
    ([fo._json_encode({"id": "x", "choices": [{"index": 1, "delta": {"content": "b"}}]})], BODY,
     "the answer has several choices"),
    ([chunk("a")], {**BODY, "n": 2}, "the client asked for n = 2 choices"),
    ([chunk("{")], {**BODY, "response_format": {"type": "json_schema", "json_schema": {}}},
     "structured output (response_format json_schema) cannot be resumed"),
    ([chunk("{")], {**BODY, "response_format": {"type": "json_object"}},
     "structured output (response_format json_object) cannot be resumed"),
    ([b"not json"], BODY, "a relayed frame could not be read back"),
])
def test_what_was_relayed_can_rule_continuing_out(frames, body, reason):
    relayed = relayed_of(*frames, body=body)
    assert relayed.blocker == reason
    assert fo.continue_blocker(**ALLOWED, relayed=relayed) == reason


def test_the_first_blocker_is_kept_and_text_requests_may_be_continued():
    relayed = relayed_of(chunk(**TOOL_DELTA), chunk(refusal="no"))
    assert relayed.blocker == "a tool-call delta was relayed"
    plain = relayed_of(chunk("a"), body={**BODY, "n": 1, "response_format": {"type": "text"}})
    assert plain.blocker is None


# -- a 4xx that refuses the prefill ---------------------------------------------

def error(message: str, **extra: Any) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": "invalid_request_error",
                                          **extra}})


@pytest.mark.parametrize(("status", "body", "index"), [
    pytest.param(400, b'{"type":"error","error":{"type":"invalid_request_error","message":'
                 b'"messages: final assistant content cannot end with trailing whitespace"}}',
                 1, id="anthropic trailing whitespace (real)"),
    pytest.param(400, error("messages.1.content.0.type: Expected `thinking` or "
                            "`redacted_thinking`, but found `text`. When `thinking` is enabled, "
                            "a final `assistant` message must start with a thinking block"),
                 None, id="anthropic thinking (real)"),
    pytest.param(400, error("This model does not support assistant message prefill. The "
                            "conversation must end with a user message."),
                 None, id="anthropic no prefill (guess)"),
    pytest.param(400, error("Expected last role User or Tool (or Assistant with prefix True) "
                            "for serving but got assistant", code="3230"),
                 None, id="mistral (real)"),
    pytest.param(400, error("The last message of deepseek-reasoner must be a user message, or "
                            "an assistant message with prefix mode on"),
                 None, id="deepseek (real)"),
    pytest.param(400, error("Cannot set both `continue_final_message` and "
                            "`add_generation_prompt` to True."), None, id="vllm (real)"),
    pytest.param(400, error("continue_final_message is set but the final message does not "
                            "appear in the chat after applying the chat template!"),
                 None, id="transformers template (real)"),
    pytest.param(400, error("Cannot have 2 or more assistant messages at the end of the list."),
                 None, id="llama.cpp (real)"),
    pytest.param(400, error("Assistant response prefill is incompatible with enable_thinking."),
                 None, id="llama.cpp thinking (real)"),
    pytest.param(400, error("Unrecognized request argument supplied: continue_final_message"),
                 None, id="openai unknown argument (real form)"),
    pytest.param(422, b'{"detail":[{"type":"extra_forbidden","loc":["body","messages",2,'
                 b'"prefix"],"msg":"Extra inputs are not permitted","input":true}]}',
                 2, id="pydantic 422 (plausible)"),
    pytest.param(400, error("Invalid 'messages[2]': unsupported for this model."), 2,
                 id="names the prefill's index (plausible)"),
    pytest.param(400, error("messages.2: assistant turn must not be last"), 2,
                 id="names the prefill's index, dotted (plausible)"),
])
def test_prefill_rejections_are_recognised(status, body, index):
    assert fo.classify_status(status, body)[0] == "bad_request"
    assert fo.prefill_rejected(status, body, index)


@pytest.mark.parametrize(("status", "body", "index"), [
    pytest.param(400, error("temperature must be <= 2", param="temperature"), 2, id="param"),
    pytest.param(400, error("Unsupported parameter: 'max_tokens' is not supported with this "
                            "model. Use 'max_completion_tokens' instead."), 2, id="max_tokens"),
    pytest.param(400, error("messages: roles must alternate between \"user\" and "
                            "\"assistant\", but found multiple \"user\" roles in a row"), 2,
                 id="anthropic alternation"),
    pytest.param(400, error("Invalid 'messages[0].content': string too long."), 2,
                 id="another message's index"),
    pytest.param(400, error("Invalid 'messages[12]': bad"), 1, id="an index that only starts "
                 "like the prefill's"),
    pytest.param(400, error("prompt is too long: 210000 tokens > 200000 maximum, final "
                            "assistant message"), 2, id="context overflow"),
    pytest.param(500, error("continue_final_message crashed the worker"), None, id="a 5xx"),
    pytest.param(404, error("The model `x` does not exist", code="model_not_found"), None,
                 id="not found"),
])
def test_other_errors_are_not_prefill_rejections(status, body, index):
    assert not fo.prefill_rejected(status, body, index)


# -- the fake upstream that continues -------------------------------------------

# Whitespace-only pieces and a piece ending in a blank line: cuts land on whitespace.
PARTS = ["The", " answer", " is", " ", "forty", "-two", ".\n\n", "Anything", " else", "?"]
REASONING = ["Let", " me", " think", ".\n"]


def play(script: fo.Script, kind: str) -> tuple[list[bytes], str]:
    """The frames an attempt relays from `script` through the adapter of `kind` (as the
    engine digests them), and how the stream ended: "done", "close", "hang", "http N"
    or the Failure's outcome."""
    adapter = fo.ADAPTERS[kind]
    st = fo.StreamState(assemble=False, want_usage=True)
    frames: list[bytes] = []
    for step in script:
        if step[0] == "respond":
            return frames, f"http {step[1]}"
        if step[0] in ("close", "hang"):
            return frames, "done" if st.done else step[0]
        if step[0] in ("head", "sleep"):
            continue
        for event, data in st.sse.feed(fo.script_bytes(step)):
            try:
                frame = adapter.on_event(event, data, st)
            except fo.Failure as f:
                return frames, f.outcome
            if frame is not None:
                frames.append(frame)
    return frames, "done" if st.done else "eof"


def client_view(frames: list[bytes]) -> tuple[str, str]:
    """(content, reasoning) as an OpenAI client assembles them."""
    content, reasoning = [], []
    for f in frames:
        for c in msgspec.json.decode(f).get("choices") or ():
            delta = c.get("delta") or {}
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
    return "".join(content), "".join(reasoning)


def rescue(first: fo.ContinuingModel, second: fo.ContinuingModel, mode: str,
           body: dict[str, Any] = BODY) -> tuple[list[bytes], dict[str, Any], str]:
    """A broken first attempt, then its continuation on `second`, chained as the engine
    will: every relayed frame into Relayed, the second slot's request through
    continue_payload, its frames through the Seam. Returns (frames the client got, the
    body the second upstream received, how the second stream ended)."""
    frames, end = play(first("m1", body, 0), first.kind)
    assert end != "done"
    relayed = relayed_of(*frames, body=body)
    build = anthropic_payload if second.kind == "anthropic" else openai_payload
    payload, prefill = fo.continue_payload(second.kind, mode, build(body), relayed)
    sent = msgspec.json.decode(payload)
    more, end = play(second("m2", sent, 0), second.kind)
    seam = fo.Seam(prefill, relayed)
    return frames + [g for g in map(seam.frame, more) if g is not None], sent, end


SHAPES = [("openai", "trailing"), ("openai", "prefix"), ("openai", "vllm"),
          ("anthropic", "trailing")]


@pytest.mark.parametrize(("kind", "mode"), SHAPES)
@pytest.mark.parametrize("cut", range(1, len(PARTS)))
def test_a_cut_answer_continued_on_another_model_is_the_canonical_answer(kind, mode, cut):
    first = fo.ContinuingModel(PARTS, cut_after=cut)
    frames, sent, end = rescue(first, fo.ContinuingModel(PARTS, prefill=mode, kind=kind), mode)
    assert end == "done"
    assert client_view(frames) == ("".join(PARTS), "")
    relayed = "".join(PARTS[:cut])
    assert sent["messages"][-1]["content"] == relayed.rstrip()
    assert sent["messages"][-1].get("prefix") is (True if mode == "prefix" else None)
    assert sent.get("continue_final_message") is (True if mode == "vllm" else None)


@pytest.mark.parametrize("breaks", ["close", "hang", "error", "garbage"])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_the_first_attempt_breaks_as_asked(breaks, kind):
    frames, end = play(fo.ContinuingModel(PARTS, kind=kind, cut_after=3, breaks=breaks)(
        "m1", BODY, 0), kind)
    assert client_view(frames)[0] == "The answer is"
    assert end == {"close": "close", "hang": "hang", "error": "upstream_error_event",
                   "garbage": "protocol_error"}[breaks]


@pytest.mark.parametrize("cut", range(1, len(REASONING) + 3))
def test_prefix_continues_reasoning_and_answer(cut):
    first = fo.ContinuingModel(PARTS, reasoning=REASONING, cut_after=cut)
    frames, sent, _ = rescue(first, fo.ContinuingModel(PARTS, reasoning=REASONING,
                                                       prefill="prefix"), "prefix")
    assert client_view(frames) == ("".join(PARTS), "".join(REASONING))
    carried = "".join(REASONING[:cut]).rstrip() if cut <= len(REASONING) else "".join(REASONING)
    assert sent["messages"][-1]["reasoning_content"] == carried


@pytest.mark.parametrize("mode", ["trailing", "vllm"])
def test_a_cut_inside_reasoning_without_a_reasoning_wire_keeps_only_what_was_shown(mode):
    first = fo.ContinuingModel(PARTS, reasoning=REASONING, cut_after=2)
    frames, sent, _ = rescue(first, fo.ContinuingModel(PARTS, reasoning=REASONING,
                                                       prefill=mode), mode)
    assert sent["messages"] == BODY["messages"]  # nothing to prefill: asked afresh
    assert client_view(frames) == ("".join(PARTS), "Let me")  # its new thinking not shown


def test_vllm_without_continue_final_message_answers_a_new_turn():
    sent = {**BODY, "messages": [*BODY["messages"],
                                 {"role": "assistant", "content": "The answer"}]}
    frames, end = play(fo.ContinuingModel(PARTS, prefill="vllm")("m", sent, 0), "openai")
    assert (client_view(frames)[0], end) == ("".join(PARTS), "done")


def test_prefix_model_refuses_a_plain_trailing_message_with_mistrals_400():
    sent = {**BODY, "messages": [*BODY["messages"], {"role": "assistant", "content": "The"}]}
    ((kind, status, _, body),) = fo.ContinuingModel(PARTS, prefill="prefix")("m", sent, 0)
    assert (kind, status) == ("respond", 400)
    assert b"Assistant with prefix True" in body
    assert fo.prefill_rejected(status, body, 2)


def test_anthropic_refuses_a_prefill_that_ends_in_whitespace():
    sent = {"messages": [{"role": "user", "content": "hello"},
                         {"role": "assistant", "content": "The answer "}]}
    ((_, status, _, body),) = fo.ContinuingModel(PARTS, kind="anthropic")("m", sent, 0)
    assert status == 400
    assert b"final assistant content cannot end with trailing whitespace" in body
    assert fo.prefill_rejected(status, body, 1)


@pytest.mark.parametrize(("kind", "mode"), SHAPES)
def test_a_rejecting_model_refuses_every_prefill_and_answers_plain_requests(kind, mode):
    model = fo.ContinuingModel(PARTS, prefill=mode, kind=kind, rejects=True)
    _, sent, end = rescue(fo.ContinuingModel(PARTS, cut_after=2), model, mode)
    assert end == "http 400"
    ((_, status, _, body),) = model("m2", sent, 0)
    assert fo.classify_status(status, body)[0] == "bad_request"
    assert fo.prefill_rejected(status, body, len(sent["messages"]) - 1)
    frames, end = play(model("m2", BODY if kind == "openai" else {"messages": [
        {"role": "user", "content": "hello"}]}, 0), kind)
    assert (client_view(frames)[0], end) == ("".join(PARTS), "done")


def test_a_prefill_that_is_not_the_canonical_answer_gets_a_500():
    sent = {**BODY, "messages": [*BODY["messages"], {"role": "assistant", "content": "Nope"}]}
    ((_, status, _, body),) = fo.ContinuingModel(PARTS)("m", sent, 0)
    assert status == 500
    assert b"'Nope'" in body


def test_without_the_strip_anthropic_would_refuse_the_prefill():
    """The reason the prefill is stripped, shown on the fake: the raw relayed text as
    the final assistant message gets Anthropic's 400."""
    frames, _ = play(fo.ContinuingModel(PARTS, cut_after=4)("m1", BODY, 0), "openai")
    raw = relayed_of(*frames).content
    assert raw == "The answer is "
    sent = msgspec.json.decode(anthropic_payload())
    sent["messages"].append({"role": "assistant", "content": raw})
    assert fo.ContinuingModel(PARTS, kind="anthropic")("m2", sent, 0)[0][1] == 400


async def test_mock_upstreams_play_a_continuing_model(autojump_clock):
    """The tests' MockUpstreams hands a ContinuingModel the request body."""
    upstreams = MockUpstreams({"b/m2": fo.ContinuingModel(PARTS, prefill="vllm", gap=1.0)})
    relayed = relayed_of(chunk("The answer is "))
    payload, _ = fo.continue_payload("openai", "vllm", openai_payload(), relayed)
    async with httpx2.AsyncClient(transport=upstreams.transport) as client:
        resp = await client.post("http://b.test/v1/chat/completions", content=payload)
        parser = fo.SSEParser()
        frames = [data for _, data in parser.feed(resp.content) + parser.close()]
    assert resp.status_code == 200
    assert client_view([f for f in frames if f != b"[DONE]"])[0] == " forty-two.\n\nAnything else?"
    assert trio.current_time() == 7.0  # seven pieces, one second apart
    assert upstreams.keys_called() == ["b/m2"]


def test_make_config_and_models_accept_prefill():
    cfg = make_config({"r": ["a/m1", "b/m2"]}, models={"b/m2": fo.ModelConfig(prefill="vllm")},
                      continuation=True)
    route = fo.resolve_route(cfg, "r", cfg.routes["r"])
    assert route.timing.continuation is True
    assert cfg.models["b/m2"].prefill == "vllm"


# -- end to end: the real openai client against the fake on loopback ------------

async def test_openai_sdk_streams_the_rest_from_a_fake_that_continues(nursery):
    upstream = fo.FakeUpstream(fo.ContinuingModel(PARTS, prefill="prefix"))
    await nursery.start(upstream.serve)
    client = openai.OpenAI(base_url=upstream.base_url, api_key="unused", max_retries=0,
                           timeout=10.0, http_client=openai.DefaultHttpxClient(
                               transport=httpx2.HTTPTransport(), trust_env=False))
    relayed = relayed_of(*(chunk(p) for p in PARTS[:7]))  # "... is forty-two.\n\n"
    body, prefill = fo.continue_body("openai", "prefix", dict(BODY), relayed)

    def call() -> str:
        stream = client.chat.completions.create(model="m2", messages=body["messages"],
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    try:
        with trio.fail_after(10):
            text = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
    finally:
        client.close()
    assert upstream.requests[0]["messages"][-1] == {
        "role": "assistant", "content": "The answer is forty-two.", "prefix": True}
    assert text == "\n\nAnything else?"
    assert relayed.content + text[len(prefill.cut):] == "".join(PARTS)


async def test_openai_sdk_gets_the_fakes_prefill_rejection(nursery):
    upstream = fo.FakeUpstream(fo.ContinuingModel(PARTS, prefill="vllm", rejects=True))
    await nursery.start(upstream.serve)
    client = openai.OpenAI(base_url=upstream.base_url, api_key="unused", max_retries=0,
                           timeout=10.0, http_client=openai.DefaultHttpxClient(
                               transport=httpx2.HTTPTransport(), trust_env=False))
    body, prefill = fo.continue_body("openai", "vllm", dict(BODY), relayed_of(chunk("The")))

    def call() -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="m2", messages=body["messages"], stream=True,
                extra_body={"continue_final_message": True, "add_generation_prompt": False})
        return e.value

    try:
        with trio.fail_after(10):
            err = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
    finally:
        client.close()
    assert err.status_code == 400
    assert "continue_final_message" in err.message
    assert fo.prefill_rejected(err.status_code, err.response.content, prefill.index)
