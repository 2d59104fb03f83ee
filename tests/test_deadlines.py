"""Deadlines that know each model (SPEC section 10): the pure learner (cold start, what
it learns, censored timeouts, prompt size, bursts, bounds, the state file), the config
keys, and `check`'s worst case from learned deadlines.

Histogram bins are four per octave from 0.25 s, and a learned deadline is twice the
upper edge of the bin holding the 99th percentile: 2.0 s sits in the bin 2 .. 2^1.25 s,
so a model answering in 2.0 s learns 2 x 2^1.25 = 4.757 s.
"""

from __future__ import annotations

import math

import msgspec
import pytest

import failoverd as fo

FT = fo.DeadlineBounds(10.0, 180.0)  # the default first-token bounds
STALL = fo.DeadlineBounds(10.0, 120.0)
WIDE = fo.DeadlineBounds(0.5, 1000.0)  # bounds out of the way
FAST_S = 2 * 2 ** 1.25  # learned from answers at 2.0 s
BIG = 150_000  # tokens


def learn(learner: fo.DeadlineLearner, model: str, ttfts: list[float], *, tokens: int = 1000,
          gap: float | None = None, t0: float = 0.0, every: float = 1.0) -> float:
    """Feed answers one `every` seconds apart; returns the time after the last."""
    now = t0
    for ttft in ttfts:
        learner.observe_answer(model, ttft, tokens, gap, now)
        now += every
    return now


def first_token(learner: fo.DeadlineLearner, tokens: int = 1000, bounds: fo.DeadlineBounds = FT,
                configured: float = 30.0, remaining: float = 300.0, model: str = "m") -> float:
    return learner.first_token_deadline(model, tokens, configured, bounds, remaining)


# -- cold start and what is learned --------------------------------------------------------


def test_cold_start_uses_the_configured_deadlines():
    learner = fo.DeadlineLearner()
    assert first_token(learner) == 30.0

    learn(learner, "m", [2.0] * 19, gap=2.0)

    assert first_token(learner) == 30.0
    assert learner.stall_deadline("m", 60.0, STALL, 300.0) == 60.0
    assert learner.snapshot()["m"]["cold"] is True


def test_a_learned_deadline_shorter_than_the_configured_one_takes_over_over_80_answers():
    learner = fo.DeadlineLearner()

    learn(learner, "m", [2.0] * 20)
    assert first_token(learner) == 30.0  # 20 answers: the blend starts at the configured
    learn(learner, "m", [2.0] * 40, t0=20)
    assert first_token(learner) == pytest.approx(math.sqrt(30 * 10))  # halfway, geometric
    learn(learner, "m", [2.0] * 40, t0=60)
    assert first_token(learner) == 10.0


def test_a_fast_model_learns_a_deadline_far_below_30_s():
    learner = fo.DeadlineLearner()

    learn(learner, "m", [2.0] * 100, gap=2.0)

    assert first_token(learner, bounds=WIDE) == pytest.approx(FAST_S)
    assert first_token(learner) == 10.0  # first_token_min_s
    assert learner.stall_deadline("m", 60.0, WIDE, 300.0) == pytest.approx(FAST_S)
    assert learner.stall_deadline("m", 60.0, STALL, 300.0) == 10.0
    snap = learner.snapshot()["m"]
    assert snap["first_token"]["learned_s"] == round(FAST_S, 2)
    assert snap["stall"]["learned_s"] == round(FAST_S, 2)


def test_a_thinking_model_answering_at_90_s_now_and_then_is_not_cut():
    learner = fo.DeadlineLearner()

    learn(learner, "m", ([3.0] * 15 + [90.0]) * 10)  # 1 in 16 thinks for 90 s

    assert first_token(learner, bounds=WIDE) == pytest.approx(2 * 2 ** 6.5)  # 90 s: 2^6.25..
    assert first_token(learner) == 180.0  # first_token_max_s


def test_a_long_answer_gap_is_learned_for_the_stall_deadline_and_no_gap_teaches_nothing():
    learner = fo.DeadlineLearner()

    learn(learner, "m", [2.0] * 100, gap=20.0)
    learn(learner, "m", [2.0] * 100, gap=None, t0=100)
    learn(learner, "m", [2.0] * 100, gap=0.0, t0=200)

    assert learner.stall_deadline("m", 60.0, WIDE, 300.0) == pytest.approx(2 * 2 ** 4.5)
    assert learner.snapshot()["m"]["stall"]["answered"] == 100


def test_the_first_token_quantile_for_hedging_comes_from_the_answers():
    learner = fo.DeadlineLearner()
    assert learner.first_token_quantile("m", 1000, 0.95) is None  # cold

    for i in range(100):
        learner.observe_answer("m", 2.0 if i % 10 else 8.0, 1000, None, 2.0 * i)
        learner.observe_answer("m", 42.0 if i % 10 else 48.0, BIG, None, 2.0 * i + 1)

    small, large = (learner.first_token_quantile("m", t, 0.5) for t in (1000, BIG))
    assert 2.0 <= small < 2 ** 1.25  # the median of the 2 s answers, inside their bin
    shift = learner.snapshot()["m"]["first_token"]["by_size"][-1]["shift_s"]
    assert shift > 35.0
    assert large == pytest.approx(small + shift, abs=0.01)  # plus the prefill shift
    assert 8.0 <= learner.first_token_quantile("m", 1000, 0.95) < 2 ** 3.25
    assert learner.first_token_quantile("m", 5000, 0.5) == pytest.approx(small)  # smaller's


# -- prompt size -----------------------------------------------------------------------------


def test_a_large_prompt_gets_a_longer_deadline_where_prefill_grows():
    learner = fo.DeadlineLearner()
    for i in range(100):
        learner.observe_answer("m", 2.0, 1000, None, 2.0 * i)
        learner.observe_answer("m", 40.0, BIG, None, 2.0 * i + 1)

    small, large = first_token(learner, 1000, WIDE), first_token(learner, BIG, WIDE)
    shifts = {s["tokens"]: s["shift_s"] for s in learner.snapshot()["m"]["first_token"]["by_size"]}

    assert small == pytest.approx(FAST_S)  # a 1k-token prompt keeps its own clock
    assert large > 40.0  # the 150k-token prompts' own 40 s answers are not cut
    assert large == pytest.approx(small + (41.49 - 2.18), abs=0.02)  # + the median's shift
    assert shifts == {"<2k": 0.0, ">=128k": pytest.approx(39.31, abs=0.01)}


def test_a_large_prompt_keeps_the_small_prompts_deadline_where_prefill_does_not_grow():
    learner = fo.DeadlineLearner()
    for i in range(100):
        learner.observe_answer("m", 2.0, 1000, None, 2.0 * i)
        learner.observe_answer("m", 2.0, BIG, None, 2.0 * i + 1)

    assert first_token(learner, BIG, WIDE) == pytest.approx(FAST_S)


def test_a_prompt_size_without_history_keeps_the_configured_deadline():
    learner = fo.DeadlineLearner()
    learn(learner, "m", [2.0] * 100, tokens=1000)

    assert first_token(learner, 1000) == 10.0
    assert first_token(learner, BIG) == 30.0  # never judged by the 1k-token prompts' clock
    assert first_token(learner, BIG, configured=5.0) == 10.0  # nor below a smaller one's


# -- censored timeouts -----------------------------------------------------------------------


def test_timeouts_never_lower_a_deadline():
    learner = fo.DeadlineLearner()
    now = learn(learner, "m", [20.0] * 200)  # learned 2 x 2^4.5 = 45.3 s
    now = learn(learner, "m", [2.0] * 20, t0=now, every=6 * 3600)  # coming down, capped
    before = first_token(learner, bounds=WIDE)
    assert FAST_S < before < 45.0

    seen = [before]
    for i, waited in enumerate([0.5, 5.0, before, 100.0, 300.0] * 20):
        learner.observe_timeout("m", "first_token", waited, 1000, now + 600 * i)
        learner.observe_timeout("m", "stall", waited, 1000, now + 600 * i)
        seen.append(first_token(learner, bounds=WIDE))

    assert seen == sorted(seen)


def test_a_hanging_fast_model_gains_nothing_from_its_hangs():
    """A third of the attempts hang and time out at the deadline in force; the answers
    all come in 2 s, far below it: none of the hangs counts, the deadline stays at what
    the answers say, and does not creep towards first_token_max_s."""
    learner = fo.DeadlineLearner()
    now = 0.0
    for i in range(3000):
        deadline = first_token(learner)
        if i % 3 == 0:
            learner.observe_timeout("m", "first_token", deadline, 1000, now + deadline)
        else:
            learner.observe_answer("m", 2.0, 1000, None, now + 2.0)
        now += 10.0

    assert first_token(learner) == 10.0
    assert first_token(learner, bounds=WIDE) == pytest.approx(FAST_S)
    assert learner.snapshot()["m"]["timeouts"]["first_token"] == 1000


def test_timeouts_the_answers_vouch_for_lift_a_thinking_models_deadline():
    """Cut at 30 s: 1 attempt in 150 answers just below the cut, and 5 % time out at it.
    Learning from the answers alone would settle at 2 x the 3 s answers' bin (6.7 s) and
    keep cutting the thinkers; the answer near the cut vouches for as many timeouts
    (0.7 % > 0.5 %), which lift the deadline to 1.5 x the bin of 30 s (27 .. 32 s)."""
    learner = fo.DeadlineLearner()
    now, seen = 0.0, []
    for _ in range(6):
        for i in range(150):
            if i == 75:
                learner.observe_answer("m", 25.0, 1000, None, now)
            elif i % 20 == 10:
                learner.observe_timeout("m", "first_token", 30.0, 1000, now)
            else:
                learner.observe_answer("m", 3.0, 1000, None, now)
            seen.append(first_token(learner, bounds=WIDE))
            now += 60

    assert seen[-300:] == pytest.approx([1.5 * 32] * 300)
    # 7.5 timeouts a window, vouched for by the one answer near the cut: 0.69 % > 0.5 %
    assert learner.snapshot()["m"]["first_token"]["timeouts_counted"] == 0.0069


# -- bursts ------------------------------------------------------------------------------------

STEADY = [1.0, 1.5, 2.0, 2.5, 3.0]  # first tokens, one a second


def mature(learner: fo.DeadlineLearner) -> float:
    return learn(learner, "m", STEADY * 600)  # 3000 answers in 50 minutes


def test_one_slow_minute_does_not_double_a_deadline():
    learner = fo.DeadlineLearner()
    now = mature(learner)
    before = first_token(learner, bounds=WIDE)

    now = learn(learner, "m", [4 * x for x in STEADY] * 12, t0=now)  # 60 s, all 4x slower
    after_minute = first_token(learner, bounds=WIDE)
    highest = after_minute
    for _ in range(60):  # the hour after it
        now = learn(learner, "m", STEADY * 12, t0=now)
        highest = max(highest, first_token(learner, bounds=WIDE))

    assert after_minute <= before * 2 ** (60 / 3600) * (1 + 1e-9)  # 2x per hour at most
    assert highest < 1.5 * before


def test_a_degraded_hour_moves_a_deadline_boundedly():
    learner = fo.DeadlineLearner()
    now = mature(learner)
    before = first_token(learner, bounds=WIDE)

    learn(learner, "m", [2.5 * x for x in STEADY] * 720, t0=now)  # an hour, 2.5x slower

    after = first_token(learner, bounds=WIDE)
    assert 1.5 * before < after <= 2 * before * (1 + 1e-9)


# -- bounds, budget, pins ---------------------------------------------------------------------


def test_learned_deadlines_stay_within_the_bounds():
    fast, slow = fo.DeadlineLearner(), fo.DeadlineLearner()
    learn(fast, "m", [0.1] * 100, gap=0.1)
    learn(slow, "m", [500.0] * 100, gap=500.0)

    assert first_token(fast) == 10.0
    assert fast.stall_deadline("m", 60.0, STALL, 300.0) == 10.0
    assert first_token(slow) == 180.0
    assert slow.stall_deadline("m", 60.0, STALL, 300.0) == 120.0


def test_a_deadline_never_runs_past_the_remaining_budget():
    learner = fo.DeadlineLearner()
    learn(learner, "m", [90.0] * 100, gap=90.0)

    assert first_token(learner, remaining=42.5) == 42.5
    assert first_token(learner, remaining=-1.0) == 0.0
    assert learner.stall_deadline("m", 60.0, STALL, 7.0) == 7.0
    assert first_token(fo.DeadlineLearner(), remaining=12.0) == 12.0  # cold too


def test_not_adaptive_means_the_configured_deadline_whatever_was_learned():
    learner = fo.DeadlineLearner()
    learn(learner, "m", [2.0] * 100, gap=2.0)
    off = fo.DeadlineBounds(10.0, 180.0, adaptive=False)

    assert first_token(learner, bounds=off) == 30.0
    assert learner.stall_deadline("m", 60.0, off, 300.0) == 60.0


def test_a_model_pin_overrides_the_route_and_is_not_learned():
    timing = fo.Timing(first_token_timeout_s=30, stall_timeout_s=60)

    plain = fo.slot_deadlines(timing, fo.ModelConfig())
    pinned = fo.slot_deadlines(timing, fo.ModelConfig(first_token_timeout_s=120))
    off = fo.slot_deadlines(fo.Timing(adaptive_deadlines=False), fo.ModelConfig())

    assert (plain.first_token_s, plain.first_token) == (30, fo.DeadlineBounds(10, 180, True))
    assert (pinned.first_token_s, pinned.first_token.adaptive) == (120, False)
    assert (pinned.stall_s, pinned.stall.adaptive) == (60, True)  # only what is pinned
    assert not off.first_token.adaptive
    assert not off.stall.adaptive


# -- bad input ---------------------------------------------------------------------------------


def test_nonsense_observations_are_ignored_and_a_bad_kind_is_an_error():
    learner = fo.DeadlineLearner()
    for bad in (math.nan, math.inf, -1.0):
        learner.observe_answer("m", bad, 1000, None, 0.0)
        learner.observe_timeout("m", "first_token", bad, 1000, 0.0)

    assert learner.snapshot() == {}
    with pytest.raises(ValueError, match="expected 'first_token' or 'stall'"):
        learner.observe_timeout("m", "connect", 5.0, 1000, 0.0)  # type: ignore[arg-type]


def test_no_more_models_are_learned_than_the_cap(monkeypatch):
    monkeypatch.setattr(fo, "DEADLINE_MAX_MODELS", 3)
    learner = fo.DeadlineLearner()
    for i in range(10):
        learner.observe_answer(f"p/m{i}", 2.0, 1000, None, 0.0)

    assert sorted(learner.models) == ["p/m0", "p/m1", "p/m2"]


# -- the state file ----------------------------------------------------------------------------


def trained() -> tuple[fo.DeadlineLearner, float]:
    learner = fo.DeadlineLearner()
    now = 0.0
    for i in range(400):
        tokens = (1000, 5000, 20_000, 60_000, BIG)[i % 5]
        learner.observe_answer("a/fast", 1.0 + (i % 7) / 3, tokens, 0.5 + i % 3, now)
        learner.observe_answer("b/slow", 10.0 + tokens / 4000 + (i % 11), tokens, 4.0, now)
        if i % 9 == 0:
            learner.observe_timeout("b/slow", "first_token", 60.0, tokens, now)
            learner.observe_timeout("b/slow", "stall", 20.0, tokens, now)
        now += 30.0
    return learner, now


def all_deadlines(learner: fo.DeadlineLearner) -> list[float]:
    return [value for model in ("a/fast", "b/slow")
            for value in [learner.first_token_deadline(model, t, 30.0, WIDE, 300.0)
                          for t in (1000, 5000, 20_000, 60_000, BIG)]
            + [learner.stall_deadline(model, 60.0, WIDE, 300.0)]]


def test_learned_deadlines_survive_a_restart_through_the_state_file():
    learner, now = trained()
    raw = msgspec.json.encode(fo.SavedState(deadlines=learner.to_saved(now)))

    later = 1e6  # another process, another clock
    saved = msgspec.json.decode(raw, type=fo.SavedState)
    restored = fo.DeadlineLearner.from_saved(saved.deadlines, later)

    assert all_deadlines(restored) == pytest.approx(all_deadlines(learner), rel=1e-6)
    assert restored.snapshot() == learner.snapshot()
    for i in range(200):  # and they go on learning alike
        for x, t in ((learner, now), (restored, later)):
            x.observe_answer("b/slow", 80.0 + i % 5, 20_000, 9.0, t + 60 * i)
    assert all_deadlines(restored) == pytest.approx(all_deadlines(learner), rel=1e-6)


def test_a_state_file_without_deadlines_still_loads():
    state = msgspec.json.decode(b'{"version":1,"breakers":[],"divisors":{"a/m":3.5}}',
                                type=fo.SavedState)

    assert state.deadlines == {}
    assert fo.DeadlineLearner.from_saved(state.deadlines, 0.0).models == {}


def test_a_damaged_model_entry_starts_over_and_the_others_are_kept():
    learner, now = trained()
    saved = learner.to_saved(now)
    good = saved["a/fast"]
    wrong_sizes = msgspec.structs.replace(good, sizes=good.sizes[:3])
    bad_bin = msgspec.structs.replace(good, first_token=msgspec.structs.replace(
        good.first_token, answers={99: 1.0}))
    negative = msgspec.structs.replace(good, stall=msgspec.structs.replace(
        good.stall, timeouts={3: -1.0}))
    nan_learned = msgspec.structs.replace(good, stall=msgspec.structs.replace(
        good.stall, learned=math.nan))

    restored = fo.DeadlineLearner.from_saved(
        {"a/fast": good, "x/1": wrong_sizes, "x/2": bad_bin, "x/3": negative,
         "x/4": nan_learned}, now)

    assert sorted(restored.models) == ["a/fast"]


def test_the_state_is_fixed_size_however_long_the_history():
    learner = fo.DeadlineLearner()
    learn(learner, "m", [1.0 + (i % 97) / 10 for i in range(20_000)], gap=1.0)
    state = learner.models["m"]

    histograms = [*state.sizes, state.first_token, state.stall]
    assert all(len(h.answers) == fo.DEADLINE_BINS for h in histograms)
    assert len(state.first_token.timeouts) == fo.DEADLINE_BINS
    assert len(msgspec.json.encode(learner.to_saved(0.0))) < 8 * 1024


# -- config ------------------------------------------------------------------------------------

CONFIG = """\
[defaults]
{defaults}

[providers.a]
base_url = "http://a.test/v1"

[models."a/m1"]
{model}

[routes.r]
chain = ["a/m1", "a/m2"]
{route}
"""


def config(defaults: str = "", model: str = "", route: str = "") -> str:
    return CONFIG.format(defaults=defaults, model=model, route=route)


def config_error(text: str) -> str:
    with pytest.raises(fo.ConfigError) as e:
        fo.parse_config(text)
    return str(e.value)


def test_deadline_keys_parse_in_defaults_routes_and_models():
    cfg = fo.parse_config(config(
        defaults="adaptive_deadlines = false\nfirst_token_min_s = 5\nstall_max_s = 90",
        model="first_token_timeout_s = 120\nstall_timeout_s = 45",
        route="adaptive_deadlines = true\nfirst_token_max_s = 150"))
    timing = fo.resolve_route(cfg, "r", cfg.routes["r"]).timing

    assert cfg.defaults.adaptive_deadlines is False
    assert (timing.adaptive_deadlines, timing.first_token_min_s, timing.first_token_max_s,
            timing.stall_min_s, timing.stall_max_s) == (True, 5, 150, 10, 90)
    assert (cfg.models["a/m1"].first_token_timeout_s, cfg.models["a/m1"].stall_timeout_s) \
        == (120, 45)


def test_the_defaults_are_adaptive_within_the_spec_bounds():
    t = fo.Timing()

    assert (t.adaptive_deadlines, t.first_token_min_s, t.first_token_max_s, t.stall_min_s,
            t.stall_max_s) == (True, 10, 180, 10, 120)


def test_a_min_above_its_max_in_the_defaults_names_both_keys():
    error = config_error(config(defaults="first_token_min_s = 200"))

    assert "defaults.first_token_min_s = 200 is above defaults.first_token_max_s = 180" in error
    assert "routes.r" not in error  # the route only inherits it: reported once


def test_a_route_bound_crossing_a_default_names_where_each_comes_from():
    error = config_error(config(route="stall_max_s = 5"))

    assert "defaults.stall_min_s = 10 is above routes.r.stall_max_s = 5" in error
    assert "expected stall_min_s <= stall_max_s" in error


@pytest.mark.parametrize(("where", "line"), [
    ("model", "first_token_timeout_s = 0"),
    ("route", "first_token_min_s = -1"),
    ("defaults", "stall_max_s = 0"),
    ("model", "first_token_timeout = 60"),
    ("route", "adaptive_deadlines = 1"),
])
def test_bad_deadline_keys_are_errors_with_their_key(where, line):
    error = config_error(config(**{where: line}))

    assert line.split(" =")[0] in error
    assert {"model": "models", "route": "routes.r", "defaults": "defaults"}[where] in error


# -- check's worst case -----------------------------------------------------------------------

CHECK = """\
[defaults]
retry_same = 0
total_timeout_s = 400
{defaults}

[providers.a]
base_url = "http://a.test/v1"

[providers.b]
base_url = "http://b.test/v1"

[routes.r]
chain = ["a/m1", "b/m2"]
"""


def check(text: str, learned: fo.DeadlineLearner | None = None) -> tuple[list[str], list[str]]:
    return fo.check_report(fo.parse_config(text), learned)


def test_check_counts_an_adaptive_slot_at_its_bound_before_anything_is_learned():
    lines, _ = check(CHECK.format(defaults=""))

    assert "worst case before first byte or error 360 s" in lines[0]
    assert "adaptive: first token 10-180 s, stall 10-120 s" in lines[0]
    assert "first token 180 s (bound), stall 120 s (bound); starts by 0 s" in lines[1]
    assert lines[2].endswith("starts by 180 s at the latest")


def test_check_uses_the_learned_deadlines():
    learner = fo.DeadlineLearner()
    for tokens in (1000, 5000, 20_000, 60_000, BIG):
        learn(learner, "a/m1", [2.0] * 100, tokens=tokens, gap=2.0)

    lines, _ = check(CHECK.format(defaults=""), learner)

    assert lines[1].split()[0] == "a/m1"
    assert "first token 10 s (learned), stall 10 s (learned)" in lines[1]
    assert "first token 180 s (bound)" in lines[2]  # b/m2: nothing learned
    assert "worst case before first byte or error 190 s" in lines[0]


def test_check_counts_a_size_without_history_at_the_configured_deadline():
    learner = fo.DeadlineLearner()
    learn(learner, "a/m1", [2.0] * 100, tokens=1000)
    learn(learner, "a/m1", [2.0] * 100, tokens=BIG, t0=100)

    lines, _ = check(CHECK.format(defaults=""), learner)

    assert first_token(learner, BIG, model="a/m1") == 10.0
    assert "first token 30 s (learned)" in lines[1]  # a 20k-token prompt would get 30 s


def test_check_uses_pins_and_configured_deadlines_as_they_are():
    pinned = CHECK.format(defaults="") + '\n[models."a/m1"]\nfirst_token_timeout_s = 7\n'
    lines, _ = check(pinned)
    assert "first token 7 s (pinned), stall 120 s (bound)" in lines[1]

    lines, _ = check(CHECK.format(defaults="adaptive_deadlines = false"))
    assert "first token 30 s (configured), stall 60 s (configured)" in lines[1]
    assert "worst case before first byte or error 60 s" in lines[0]


def test_check_warns_with_the_adaptive_key_to_lower():
    _, warnings = check(CHECK.format(defaults="").replace("total_timeout_s = 400",
                                                          "total_timeout_s = 150"))

    unreachable = [w for w in warnings if "is not reached" in w]
    assert len(unreachable) == 1
    assert "lower first_token_max_s" in unreachable[0]


def test_check_command_reads_learned_deadlines_from_the_state_file(tmp_path):
    from click.testing import CliRunner

    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "failoverd.toml"
    path.write_text(f'[daemon]\nledger = "{ledger}"\n' + CHECK.format(defaults=""))
    run = CliRunner().invoke
    absent = run(fo.cli, ["check", "--config", str(path), "--no-keys"])

    learner = fo.DeadlineLearner()
    for tokens in (1000, 5000, 20_000, 60_000, BIG):
        learn(learner, "a/m1", [2.0] * 100, tokens=tokens, gap=2.0)
    state = fo.SavedState(deadlines=learner.to_saved(0.0))
    (tmp_path / "state.json").write_bytes(msgspec.json.encode(state))
    present = run(fo.cli, ["check", "--config", str(path), "--no-keys"])
    (tmp_path / "state.json").write_bytes(b"{not json")
    broken = run(fo.cli, ["check", "--config", str(path), "--no-keys"])

    assert absent.exit_code == 0, absent.output
    assert f"learned deadlines: none yet (no state file at {tmp_path / 'state.json'})" \
        in absent.output
    assert present.exit_code == 0, present.output
    assert "first token 10 s (learned)" in present.output
    assert f"learned deadlines: 1 model(s) from {tmp_path / 'state.json'}" in present.output
    assert broken.exit_code == 0, broken.output
    assert "is unreadable" in broken.output
    assert "first token 180 s (bound)" in broken.output
