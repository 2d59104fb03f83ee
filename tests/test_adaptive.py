"""Deadlines that know each model (SPEC section 10), through the engine, in virtual time.

Route "r" is a/m1 -> b/m2: a is the model under test, b a healthy fallback. The
learner itself is tested in test_deadlines.py; here the daemon arms what it learned.
"""

from __future__ import annotations

import msgspec
import pytest
from conftest import ok_script
from test_engine import HUNG

import failoverd as fo


async def teach(h, n: int, first: float, **extra) -> None:
    """n answers from a/m1, each with its first token `first` s after sending."""
    h.upstreams.scripts["a/m1"] = ok_script("fine", first=first)
    for _ in range(n):
        assert (await h.chat(**extra)).headers["x-failoverd-served-by"] == "a/m1"


async def hang_once(h, **extra) -> tuple[float, dict]:
    """a/m1 hangs: how long until the client's first byte (from b), and a's row."""
    h.upstreams.scripts["a/m1"] = HUNG
    r = await h.chat(**extra)
    assert r.headers["x-failoverd-served-by"] == "b/m2"
    return r.t_first - r.t_start, h.rows("attempt")[-2]


async def test_a_cold_model_gets_the_configured_deadline(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a", first=2.0), "b/m2": ok_script("b")})
    await teach(h, 19, 2.0)  # one short of the cold start's 20 answers
    waited, row = await hang_once(h)
    assert waited == 30.0
    assert row["first_token_deadline_s"] == 30.0


async def test_a_fast_model_is_abandoned_at_its_learned_deadline(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")})
    await teach(h, 100, 2.0)
    waited, row = await hang_once(h)
    assert waited == 10.0  # first_token_min_s: it learned ~5 s, the bound holds it at 10
    assert (row["outcome"], row["first_token_deadline_s"], row["latency_ms"]) == \
        ("first_token_timeout", 10.0, 10000.0)
    assert "the first-token deadline learned for this model" in row["error"]
    assert h.d.status()["deadlines"]["a/m1"]["answered"] == 100


async def test_hangs_never_teach_a_model_a_shorter_deadline(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")}, first_token_min_s=1.0,
                breakers=fo.BreakerConfig(consecutive_failures=1000, min_calls=1000))
    await teach(h, 100, 2.0)
    learned = h.d.deadlines.first_token_deadline("a/m1", 10, 30.0, fo.DeadlineBounds(1, 180), 1e9)
    for _ in range(30):
        waited, _ = await hang_once(h)
        assert waited == pytest.approx(learned)  # censored: no hang moves it down (or up)
    assert learned < 10.0


async def test_a_slow_thinker_is_not_cut_at_a_fast_models_deadline(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")},
                routes={"r": ["a/m1", "b/m2"]}, first_token_timeout_s=120.0)
    for first in [20.0, 40.0, 60.0, 90.0] * 6:  # answers up to 90 s
        await teach(h, 1, first)
    h.upstreams.scripts["a/m1"] = ok_script("thought it through", first=90.0)
    r = await h.chat()
    assert (r.text, r.t_first - r.t_start) == ("thought it through", 90.0)
    assert h.rows("attempt")[-1]["first_token_deadline_s"] >= 120.0


async def test_a_model_pin_overrides_the_route_and_is_never_learned(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")},
                models={"a/m1": fo.ModelConfig(first_token_timeout_s=45.0,
                                               stall_timeout_s=20.0)})
    await teach(h, 100, 2.0)
    waited, row = await hang_once(h)
    assert waited == 45.0
    assert (row["first_token_deadline_s"], row["stall_deadline_s"]) == (45.0, 20.0)


async def test_a_large_prompt_gets_a_longer_deadline(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")}, first_token_min_s=1.0)
    small = [{"role": "user", "content": "hello"}]
    large = [{"role": "user", "content": "x" * 200_000}]  # ~50k tokens
    for _ in range(30):
        await teach(h, 1, 2.0, messages=small)
        await teach(h, 1, 20.0, messages=large)
    short, _ = await hang_once(h, messages=small)
    long, row = await hang_once(h, messages=large)
    # The small prompt's clock would cut the large prompt's healthy 20 s answers.
    assert short < 20.0 < long
    assert long == pytest.approx(row["first_token_deadline_s"])


async def test_learned_deadlines_survive_a_restart(harness, autojump_clock, tmp_path):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")}, first_token_min_s=1.0)
    await teach(h, 100, 2.0)
    h.d.save_state()
    before = h.d.status()["deadlines"]["a/m1"]
    state = msgspec.json.decode((tmp_path / "state.json").read_bytes())
    assert "a/m1" in state["deadlines"]
    restarted = harness({"a/m1": HUNG, "b/m2": ok_script("b")}, first_token_min_s=1.0)
    assert restarted.d.status()["deadlines"]["a/m1"]["answered"] == before["answered"]
    r = await restarted.chat()
    assert r.t_first - r.t_start == pytest.approx(restarted.rows("attempt")[-2][
        "first_token_deadline_s"])
    assert r.t_first - r.t_start < 10.0


async def test_adaptive_off_keeps_the_configured_deadline(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")}, adaptive_deadlines=False)
    await teach(h, 100, 2.0)
    waited, _ = await hang_once(h)
    assert waited == 30.0


async def test_a_hedge_quantile_uses_the_learned_first_token_quantile(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")},
                hedge_quantile=0.5, hedge_min_s=0.5, hedge_max_share=1.0)
    await teach(h, 40, 2.0)
    q = h.d.deadlines.first_token_quantile("a/m1", 10, 0.5)
    assert q is not None
    h.upstreams.scripts["a/m1"] = ok_script("slow a", first=20.0)
    r = await h.chat()
    started = [t for t, key in h.upstreams.calls if key == "b/m2"][-1]
    assert started - r.t_start == pytest.approx(max(0.5, q))  # the hedge went at the quantile
    assert r.text == "b"


async def test_the_stall_deadline_is_learned_too(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")})
    h.upstreams.scripts["a/m1"] = ok_script("one two three four", first=1.0, gap=1.0)
    for _ in range(100):
        await h.chat()
    h.upstreams.scripts["a/m1"] = [("head", 200, {}), ("sleep", 1.0),
                                   ("sse", fo.sse_chunk("then")), ("hang",)]
    r = await h.chat(stream=True)
    row = h.rows("attempt")[-1]
    assert 10.0 <= row["stall_deadline_s"] < 60.0  # learned from gaps of 1 s, within bounds
    assert (row["outcome"], r.t_end - r.t_start) == ("stall_timeout",
                                                     1.0 + row["stall_deadline_s"])
    assert "the stall deadline learned for this model" in row["error"]


async def test_status_and_audit_show_the_deadlines(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")})
    await teach(h, 100, 2.0)
    await hang_once(h)
    text = fo.format_status(h.d.status(), width=120)
    table = text[text.index("deadlines learned (first token, stall)"):]
    assert table[3].split() == ["a/m1", "100", "4.76", "2.38", "-", "1/0"]  # learned, 1 hang
    assert "cold: the configured deadlines apply" in table[4]  # b: one answer so far
    rows = [row for _, row in fo.read_ledger(h.ledger_path) if row is not None]
    audit = fo.Audit()
    for row in rows:
        audit.add(row)
    [route] = audit.report()["routes"]
    a = next(m for m in route["models"] if m["model"] == "a/m1")
    assert (a["first_token_deadline_s"], a["stall_deadline_s"]) == (10.0, 60.0)
    lines = [line.split() for line in fo.render_audit(audit.report(), 120).splitlines()]
    # The deadline column, on each model's first-token line (a/m1's, then b/m2's): the
    # learned 10 s, then the configured 30 s.
    first_tokens = [line for line in lines if line[:2] == ["first", "token"]]
    assert first_tokens == [["first", "token", "100", "2.00", "2.00", "2.00", "2.00", "10.0"],
                            ["first", "token", "1", "0.00", "0.00", "0.00", "0.00", "30.0"]]
