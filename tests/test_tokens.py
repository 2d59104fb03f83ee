"""Token awareness: the estimator, context-window skips, TPM/RPM budgets and the
silent-truncation tripwire. Deadlines are the defaults; times are virtual."""

from __future__ import annotations

import math

import msgspec
import pytest
import trio
from conftest import http_request, ok_script
from test_engine import respond

import failoverd as fo

W = fo.ModelConfig  # a model's facts, for brevity


def body_of(size: int, stream: bool = False, **extra) -> dict:
    """A chat request whose JSON body is exactly `size` bytes."""
    body = {"model": "r", "stream": stream, "messages": [{"role": "user", "content": ""}],
            **extra}
    pad = size - len(msgspec.json.encode(body))
    body["messages"][0]["content"] = "x" * pad
    assert len(msgspec.json.encode(body)) == size
    return body


async def send(h, size: int, **kw) -> object:
    return await h.send(http_request(body_of(size, **kw)))


# -- the estimator ---------------------------------------------------------------

def test_estimate_starts_from_the_prior_with_a_safety_margin():
    e = fo.Estimator()
    assert e.divisor("any/model") == 4.0
    assert e.estimate("any/model", 8000) == 2200  # 8000 / 4 * 1.1


def test_divisor_converges_from_the_prior_to_the_models_true_ratio():
    e = fo.Estimator()
    for _ in range(25):
        e.observe("m", 30_000, 10_000)  # truly 3 bytes per token
    assert e.divisor("m") == pytest.approx(3.0, rel=0.01)
    assert e.divisor("other") == 4.0  # per model


def test_divisor_moves_a_fifth_of_the_way_per_observation():
    e = fo.Estimator()
    e.observe("m", 6000, 1000)  # observed 6.0
    assert e.divisor("m") == pytest.approx(4.4)


def test_one_freak_observation_moves_the_divisor_one_clamped_step():
    e = fo.Estimator()
    e.observe("m", 100_000, 1)  # e.g. a prompt served from cache reported as 1 token
    assert e.divisor("m") == pytest.approx(4 + 0.2 * (12 - 4))


@pytest.mark.parametrize(("size", "tokens", "bound"), [(1000, 2000, 1.5), (100_000, 1000, 12.0)])
def test_divisor_is_clamped(size, tokens, bound):
    """However extreme the reports, the divisor stays within its bounds."""
    e = fo.Estimator()
    for _ in range(100):
        e.observe("m", size, tokens)
    assert e.divisor("m") == pytest.approx(bound)


def test_overflow_with_a_stated_token_count_resets_the_divisor():
    e = fo.Estimator()
    e.overflowed("m", 27_000, 8192, reported=9000)
    assert e.divisor("m") == pytest.approx(3.0)
    e2 = fo.Estimator()
    e2.overflowed("m", 40_000, 8192, reported=None)  # estimate 11000 was "fine"; it was not
    assert e2.estimate("m", 40_000) > 8192


@pytest.mark.parametrize(("message", "tokens"), [
    ("This model's maximum context length is 8192 tokens. However, your messages resulted "
     "in 9,000 tokens. Please reduce the length of the messages.", 9000),
    ("you requested 5000 tokens (4500 in the messages, 500 in the completion)", 4500),
    ("prompt is too long: 210000 tokens > 200000 maximum", 210000),
    ("context length exceeded", None),
])
def test_reported_prompt_tokens(message, tokens):
    assert fo.reported_prompt_tokens(message) == tokens


async def test_divisors_are_learned_persisted_and_shown(harness, autojump_clock):
    h = harness({"a/m1": ok_script("x", prompt_tokens=1000)})
    await send(h, 3000)
    assert h.d.divisors() == {"a/m1": pytest.approx(4 + 0.2 * (3 - 4))}
    assert h.d.status()["token_divisors"] == h.d.divisors()
    h.d.save_state()
    restarted = harness({"a/m1": ok_script()})
    assert restarted.d.divisors() == h.d.divisors()


# -- context windows ----------------------------------------------------------

async def test_slot_too_small_for_the_prompt_is_skipped(harness, autojump_clock):
    h = harness({"a/m1": ok_script("small"), "b/m2": ok_script("big")},
                models={"a/m1": W(context_window=3000)})
    r = await send(h, 8000)  # about 2200 tokens + 1024 reserved for output > 3000
    assert r.text == "big"
    assert r.t_first == 0.0
    assert h.upstreams.keys_called() == ["b/m2"]
    assert h.outcomes() == [("a/m1", "skipped:context_window"), ("b/m2", "ok")]


async def test_requested_max_tokens_counts_against_the_window(harness, autojump_clock):
    h = harness({"a/m1": ok_script("small", prompt_tokens=2000), "b/m2": ok_script("big")},
                models={"a/m1": W(context_window=3500)})
    assert (await send(h, 8000)).text == "small"  # 2200 + 1024 fits in 3500
    assert (await send(h, 8000, max_tokens=2000)).text == "big"  # 2200 + 2000 does not


async def test_prompt_too_large_for_every_slot_reaches_no_upstream(harness, autojump_clock):
    h = harness({"a/m1": ok_script(), "b/m2": ok_script()},
                models={"a/m1": W(context_window=3000), "b/m2": W(context_window=5000)})
    r = await send(h, 40_000)
    assert r.status == 400
    assert r.t_first == 0.0
    err = r.json["error"]
    assert (err["code"], err["type"], err["param"]) == \
        ("context_length_exceeded", "invalid_request_error", "messages")
    assert "12024 tokens needed" in err["message"]  # 40000 / 4 * 1.1 + 1024
    assert "largest context window is 5000 (b/m2)" in err["message"]
    assert h.upstreams.calls == []
    assert h.outcomes() == [("a/m1", "skipped:context_window"), ("b/m2", "skipped:context_window")]
    assert h.rows("request")[0]["status"] == 400


async def test_upstream_overflow_fails_over_only_to_larger_windows(harness, autojump_clock):
    overflow = respond(400, {"error": {
        "message": "This model's maximum context length is 8000 tokens. However, your "
                   "messages resulted in 9000 tokens.", "code": "context_length_exceeded"}})
    h = harness({"a/m1": overflow, "b/m2": ok_script("b"), "c/m3": ok_script("c")},
                routes={"r": ["a/m1", "b/m2", "c/m3"]},
                models={"a/m1": W(context_window=8000), "b/m2": W(context_window=6000),
                        "c/m3": W(context_window=16000)})
    r = await send(h, 18_000)  # estimated 4950 tokens: fits a's window, but a says 9000
    assert r.text == "c"
    assert h.outcomes() == [("a/m1", "context_overflow"), ("b/m2", "skipped:context_window"),
                            ("c/m3", "ok")]
    assert h.d.estimator.divisor("a/m1") == pytest.approx(2.0)  # 18000 bytes / 9000 tokens
    r = await send(h, 18_000)  # a is now known to be too small for this prompt
    assert h.outcomes()[3] == ("a/m1", "skipped:context_window")


async def test_overflow_everywhere_is_a_clear_context_error(harness, autojump_clock):
    overflow = respond(400, {"error": {"message": "prompt is too long: 9000 tokens > 8000 "
                                       "maximum", "type": "invalid_request_error"}})
    h = harness({"a/m1": overflow, "b/m2": overflow})
    r = await send(h, 1000)
    assert r.status == 400
    assert r.json["error"]["code"] == "context_length_exceeded"
    assert "prompt is too long" in r.json["error"]["message"]


# -- TPM / RPM budgets ----------------------------------------------------------

async def test_tpm_limit_keeps_a_failover_storm_off_the_fallback(harness, autojump_clock):
    h = harness({"a/m1": respond(503), "b/m2": ok_script("b", prompt_tokens=1000)}, retry_same=0,
                models={"b/m2": W(tpm_limit=5000, output_reserve=1000)})
    statuses = []
    for _ in range(4):  # each sends about 1000 + 1000 tokens to b
        statuses.append((await send(h, 4000)).status)
    assert statuses == [200, 200, 502, 502]
    assert h.upstreams.keys_called().count("b/m2") == 2
    assert ("b/m2", "skipped:rate_limited") in h.outcomes()
    await trio.sleep(60.0)  # the minute has passed
    assert (await send(h, 4000)).status == 200


async def test_rpm_limit(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")},
                models={"a/m1": W(rpm_limit=2)})
    texts = [(await send(h, 500)).text for _ in range(3)]
    assert texts == ["a", "a", "b"]


# -- the silent-truncation tripwire -------------------------------------------

LOCAL = {"c/local": W(context_window=4096, truncates_silently=True),
         "b/big": W(context_window=100_000)}


def truncating(prompt_tokens: int) -> fo.Script:
    """A local model that streams an answer and reports a prompt that filled its window."""
    return fo.token_script(["suspect", " answer"], gap=1.0, first=1.0, prompt_tokens=prompt_tokens)


@pytest.mark.parametrize("stream", [False, True])
async def test_suspected_truncation_is_redispatched_to_a_larger_slot(harness, autojump_clock,
                                                                       stream, caplog):
    h = harness({"c/local": truncating(4000), "b/big": ok_script("the real answer")},
                routes={"r": ["c/local", "b/big"]}, models=LOCAL)
    r = await send(h, 6000, stream=stream)  # worst case 4000 tokens: could fill the window
    assert r.text == "the real answer"
    assert b"suspect" not in r.body  # the suspect answer never reached the client
    assert r.t_first == 2.0  # local took 2 s; b answered at once
    [local, big] = h.rows("attempt")
    assert (local["outcome"], local["committed"], local["tokens_in"]) == \
        ("context_overflow", False, 4000)
    assert "suspected silent truncation" in local["error"]
    assert big["outcome"] == "ok"
    assert "suspected silent truncation" in caplog.text


async def test_suspected_truncation_with_no_larger_slot_is_a_context_error(harness,
                                                                           autojump_clock):
    h = harness({"c/local": truncating(4000)}, routes={"r": ["c/local"]}, models=LOCAL)
    r = await send(h, 6000, stream=True)
    assert r.status == 400
    assert r.json["error"]["code"] == "context_length_exceeded"
    assert "suspected silent truncation" in r.json["error"]["message"]


async def test_only_one_redispatch_after_a_suspected_truncation(harness, autojump_clock):
    h = harness({"c/local": truncating(4000), "b/big": respond(500), "a/m1": ok_script()},
                routes={"r": ["c/local", "b/big", "a/m1"]}, models=LOCAL, retry_same=0)
    r = await send(h, 6000)
    assert r.status == 502
    assert h.upstreams.keys_called() == ["c/local", "b/big"]


async def test_small_prompts_stream_from_a_truncating_model_without_holding(harness,
                                                                          autojump_clock):
    h = harness({"c/local": truncating(50)}, routes={"r": ["c/local"]}, models=LOCAL)
    r = await send(h, 600, stream=True)  # worst case 400 tokens: nowhere near 4096
    assert r.t_first == 1.0  # committed at the first token, not held to the end
    assert r.text == "suspect answer"


async def test_prompt_below_the_tripwire_is_trusted(harness, autojump_clock):
    h = harness({"c/local": truncating(3000)}, routes={"r": ["c/local"]}, models=LOCAL)
    r = await send(h, 6000, stream=True)
    assert r.text == "suspect answer"
    assert r.t_first == 2.0  # held until usage proved the prompt fit, then released


# -- ledger token fields ----------------------------------------------------------

async def test_tokens_are_estimated_when_the_upstream_reports_no_usage(harness, autojump_clock):
    no_usage = [s for s in ok_script("four chars each") if "usage" not in str(s)]
    h = harness({"a/m1": no_usage},
                models={"a/m1": W(price_in_per_mtok=1.0, price_out_per_mtok=2.0)})
    await send(h, 4000)
    row = h.rows("attempt")[0]
    assert (row["tokens_in"], row["tokens_out"], row["tokens_estimated"]) == \
        (1100, math.ceil(len("four chars each") / 4), True)
    assert row["cost_usd"] == pytest.approx((1100 * 1.0 + 4 * 2.0) / 1e6)


async def test_attempt_without_output_costs_nothing(harness, autojump_clock):
    h = harness({"a/m1": respond(500), "b/m2": ok_script()},
                models={"a/m1": W(price_in_per_mtok=1.0)}, retry_same=0)
    await send(h, 4000)
    row = h.rows("attempt")[0]
    assert (row["tokens_in"], row["tokens_estimated"], row["cost_usd"]) == (1100, True, None)
