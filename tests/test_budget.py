"""Live spend budgets (SPEC section 13): `[models."P/M"] budget_usd_per_day`.

A model whose billed cost today (UTC; failed attempts included) has reached its budget
is skipped (`skip_reason = "budget"`); a route whose every slot is out on budget answers
429 `budget_exhausted` with the reset time. Spend survives a restart and resets at UTC
midnight. Wall time comes from `Daemon.wall_clock`, set here to a fixed noon.
"""

from __future__ import annotations

import datetime as dt

import pytest
import trio
from conftest import ok_script
from test_engine import respond, tokens_then

import failoverd as fo

# ok_script("from a"): 12 prompt tokens and 2 completion tokens: $0.012 + $0.004.
PRICED = {"price_in_per_mtok": 1000.0, "price_out_per_mtok": 2000.0}
CALL_USD = 0.016
NOON = dt.datetime(2025, 6, 15, 12, tzinfo=dt.UTC).timestamp()
MIDNIGHT = dt.datetime(2025, 6, 16, tzinfo=dt.UTC).timestamp()


def budgeted(a: float | None = 0.01, b: float | None = 0.01) -> dict[str, fo.ModelConfig]:
    return {"a/m1": fo.ModelConfig(budget_usd_per_day=a, **PRICED),
            "b/m2": fo.ModelConfig(budget_usd_per_day=b, **PRICED)}


# -- the pure parts ------------------------------------------------------------------

def test_spend_counts_per_utc_day_and_a_read_changes_nothing():
    sp = fo.Spend()
    sp.add("a/m1", NOON, 1.5)
    sp.add("a/m1", NOON + 60, 1.0)
    assert sp.today("a/m1", NOON) == 2.5
    assert sp.over("a/m1", NOON, 2.5)
    assert not sp.over("a/m1", NOON, 2.6)
    assert not sp.over("a/m1", NOON, None)
    assert fo.next_utc_midnight(NOON) == MIDNIGHT
    assert fo.utc_timestamp(fo.next_utc_midnight(MIDNIGHT - 0.001)) == "2025-06-16T00:00:00.000Z"
    assert sp.today("a/m1", MIDNIGHT - 0.001) == 2.5
    assert sp.today("a/m1", MIDNIGHT) == 0.0
    assert (sp.day, sp.spent) == ("2025-06-15", {"a/m1": 2.5})  # the read did not reset
    sp.add("a/m1", MIDNIGHT, 0.5)
    assert (sp.day, sp.spent) == ("2025-06-16", {"a/m1": 0.5})


def test_a_reservation_is_replaced_by_the_real_cost_and_goes_with_its_day():
    sp = fo.Spend()
    day = sp.add("r", NOON, 0.5)
    assert sp.fits("r", NOON, 1.0, 0.5)
    assert not sp.fits("r", NOON, 1.0, 0.51)
    sp.settle("r", NOON + 1, day, 0.5, 0.2)
    assert sp.today("r", NOON) == pytest.approx(0.2)
    day = sp.add("r", MIDNIGHT - 1, 0.5)  # reserved before midnight, settled after
    sp.settle("r", MIDNIGHT + 1, day, 0.5, 0.3)
    assert sp.today("r", MIDNIGHT + 1) == 0.3


def test_budget_is_reported_after_the_window_and_before_the_quota_and_breakers():
    open_gate = fo.Gate(skip="breaker_open", until=5.0)
    facts = dict(provider_timed_out=False, needed_tokens=100, context_window=1000,
                 min_window=0, throttled=None, gate=fo.Gate(), over_budget=True)
    assert fo.skip_reason(fo.SlotFacts(**facts)) == "budget"
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "throttled": "rpm", "gate": open_gate})) \
        == "budget"
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "needed_tokens": 2000})) == "context_window"
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "provider_timed_out": True})) \
        == "provider_timed_out"
    assert fo.skip_reason(fo.SlotFacts(**{**facts, "over_budget": False})) is None


# -- the engine ----------------------------------------------------------------------

async def test_a_spent_model_is_skipped_and_a_spent_route_gets_429(harness, autojump_clock):
    h = harness({"a/m1": ok_script("from a"), "b/m2": ok_script("from b")}, models=budgeted())
    h.d.wall_clock = lambda: NOON + 0.5
    assert (await h.chat()).text == "from a"  # $0.016: over a's $0.01
    assert h.d.spend.today("a/m1", NOON) == CALL_USD
    r = await h.chat()
    assert (r.text, r.headers["x-failoverd-served-by"]) == ("from b", "b/m2")
    assert h.outcomes()[1:] == [("a/m1", "skipped:budget"), ("b/m2", "ok")]
    r = await h.chat()
    assert h.upstreams.keys_called() == ["a/m1", "b/m2"]  # no upstream was called
    assert (r.status, r.headers["retry-after"]) == (429, "43200")  # 11:59:59.5 to midnight
    resets = "2025-06-16T00:00:00.000Z"
    assert r.json == {
        "error": {
            "message": "route 'r': every slot has spent its daily budget (a/m1 $0.0160 of "
                       "$0.01, b/m2 $0.0160 of $0.01); the budgets reset at "
                       "2025-06-16T00:00:00.000Z (UTC midnight)",
            "type": "failoverd_error", "code": "budget_exhausted", "param": None},
        "failoverd": {
            "request_id": r.headers["x-failoverd-request-id"], "attempts": [],
            "budgets": [
                {"model": "a/m1", "budget_usd_per_day": 0.01, "spent_usd": CALL_USD,
                 "resets_at": resets},
                {"model": "b/m2", "budget_usd_per_day": 0.01, "spent_usd": CALL_USD,
                 "resets_at": resets}]}}
    assert h.outcomes()[3:] == [("a/m1", "skipped:budget"), ("b/m2", "skipped:budget")]
    last = h.rows("request")[-1]
    assert (last["status"], last["outcome"], last["attempts"]) == (429, "error", 2)


async def test_a_model_without_budget_still_serves_when_the_others_are_spent(
        harness, autojump_clock):
    h = harness({"a/m1": ok_script("from a"), "b/m2": ok_script("from b")}, models=budgeted(b=None))
    h.d.wall_clock = lambda: NOON
    for text in ("from a", "from b", "from b", "from b"):
        assert (await h.chat()).text == text
    assert h.d.spend.today("b/m2", NOON) == pytest.approx(3 * CALL_USD)


async def test_billed_failed_attempts_count_as_their_rows_say(harness, autojump_clock):
    h = harness({"a/m1": tokens_then([("close",)]), "b/m2": ok_script("from b")},
                models=budgeted(a=1.0, b=1.0))
    h.d.wall_clock = lambda: NOON
    await h.chat()
    truncated, answered = h.rows("attempt")
    assert truncated["outcome"] == "truncated"
    assert truncated["cost_usd"] > 0  # estimated tokens: it produced output, it may be billed
    assert h.d.spend.today("a/m1", NOON) == truncated["cost_usd"]
    assert h.d.spend.today("b/m2", NOON) == answered["cost_usd"] == CALL_USD


async def test_a_failure_without_output_costs_nothing(harness, autojump_clock):
    h = harness({"a/m1": respond(503), "b/m2": ok_script("from b")}, models=budgeted(a=1.0, b=1.0),
                retry_same=0)
    h.d.wall_clock = lambda: NOON
    await h.chat()
    assert h.d.spend.totals(NOON) == {"b/m2": CALL_USD}


async def test_spend_resets_at_utc_midnight(harness, autojump_clock):
    now = [NOON]
    h = harness({"a/m1": ok_script("from a"), "b/m2": ok_script("from b")}, models=budgeted(b=None))
    h.d.wall_clock = lambda: now[0]
    assert (await h.chat()).text == "from a"
    now[0] = MIDNIGHT - 0.001
    assert (await h.chat()).text == "from b"
    assert h.d.status()["budgets"]["models"][0] == {
        "model": "a/m1", "spent_usd": CALL_USD, "budget_usd_per_day": 0.01, "left_usd": 0.0,
        "exhausted": True}
    now[0] = MIDNIGHT
    assert h.d.status()["budgets"]["models"][0]["spent_usd"] == 0.0
    assert (await h.chat()).text == "from a"  # a new day
    assert h.d.spend.totals(MIDNIGHT) == {"a/m1": CALL_USD}


async def test_spend_survives_a_restart(harness, autojump_clock):
    models = budgeted(a=0.03, b=None)
    h = harness({"a/m1": ok_script("from a"), "b/m2": ok_script("from b")}, models=models)
    h.d.wall_clock = lambda: NOON
    await h.chat()  # saved at once: the first spend
    await h.chat()  # $0.032: over budget, saved at once
    restarted = harness({"a/m1": ok_script("from a"), "b/m2": ok_script("from b")}, models=models)
    restarted.d.wall_clock = lambda: NOON + 3600
    assert restarted.d.spend.today("a/m1", NOON) == pytest.approx(2 * CALL_USD)
    r = await restarted.chat()
    assert r.text == "from b"
    assert restarted.outcomes()[-2] == ("a/m1", "skipped:budget")


async def test_spend_is_saved_at_most_every_few_seconds_and_at_shutdown(
        harness, autojump_clock, tmp_path):
    h = harness({"a/m1": ok_script("from a")}, models=budgeted(a=100.0), routes={"r": ["a/m1"]})
    h.d.wall_clock = lambda: NOON

    def saved() -> float:
        state = fo.msgspec.json.decode((tmp_path / "state.json").read_bytes(),
                                       type=fo.SavedState)
        return state.spend.spent.get("a/m1", 0.0)

    await h.chat()
    assert saved() == CALL_USD
    await h.chat()  # within SPEND_SAVE_EVERY_S of the last save
    assert saved() == CALL_USD
    await trio.sleep(fo.SPEND_SAVE_EVERY_S)
    await h.chat()
    assert saved() == pytest.approx(3 * CALL_USD)
    await h.chat()
    h.d.save_state()  # what serve() does on the way out
    assert saved() == pytest.approx(4 * CALL_USD)


async def test_a_state_file_from_before_budgets_still_loads(harness, autojump_clock, tmp_path):
    (tmp_path / "state.json").write_bytes(b'{"version": 1, "breakers": [], '
                                          b'"divisors": {"a/m1": 3.0}}')
    h = harness({"a/m1": ok_script("from a")}, models=budgeted(a=1.0))
    assert (h.d.divisors(), h.d.spend.spent, h.d.shadow_spend.spent) == ({"a/m1": 3.0}, {}, {})


async def test_the_budget_running_out_alerts_and_logs_once(harness, autojump_clock, caplog):
    h = harness({"a/m1": ok_script("from a"), "b/m2": ok_script("from b")}, models=budgeted(b=None))
    h.d.wall_clock = lambda: NOON
    alerts = []
    h.d.health.alert = alerts.append
    for _ in range(3):
        await h.chat()
    assert len(alerts) == 1
    event = fo.msgspec.json.decode(alerts[0])
    assert (event["type"], event["model"], event["resets_at"]) == \
        ("budget_exhausted", "a/m1", "2025-06-16T00:00:00.000Z")
    assert caplog.text.count("has spent its budget_usd_per_day") == 1


async def test_status_shows_the_spend_against_the_budgets(harness, autojump_clock):
    h = harness({"a/m1": ok_script("from a"), "b/m2": ok_script("from b")},
                models=budgeted(a=0.01, b=1.0))
    h.d.wall_clock = lambda: NOON
    await h.chat()
    await h.chat()
    budgets = h.d.status()["budgets"]
    assert (budgets["day"], budgets["resets_at"]) == ("2025-06-15", "2025-06-16T00:00:00.000Z")
    assert budgets["models"] == [
        {"model": "a/m1", "spent_usd": CALL_USD, "budget_usd_per_day": 0.01, "left_usd": 0.0,
         "exhausted": True},
        {"model": "b/m2", "spent_usd": CALL_USD, "budget_usd_per_day": 1.0, "left_usd": 0.984,
         "exhausted": False}]
    text = fo.format_status(h.d.status(), width=100)
    assert "spend today (2025-06-15 UTC; budgets reset 2025-06-16T00:00:00.000Z)" in text
    assert ["a/m1", "0.0160", "0.01", "0.0000", "spent"] in [line.split() for line in text]
    assert ["b/m2", "0.0160", "1", "0.9840"] in [line.split() for line in text]


async def test_the_route_view_knows_a_spent_model_never_answers(harness, autojump_clock):
    h = harness({"a/m1": ok_script("from a"), "b/m2": ok_script("from b")}, models=budgeted())
    h.d.wall_clock = lambda: NOON
    await h.chat()
    [r] = fo.route_view(h.d, trio.current_time())
    assert (r["answers"], r["how"]) == ("b/m2", "ok")
    assert r["slots"][0] == {"slot": "a/m1", "state": "budget", "left_s": 43200.0,
                             "breaker": None, "reason": "budget_usd_per_day = 0.01 spent"}
    await h.chat()
    [r] = fo.route_view(h.d, trio.current_time())
    assert (r["answers"], r["how"]) == (None, "budget_exhausted")
    text = fo.format_status(h.d.status(), width=120)
    assert any("out of budget, 12 h to UTC midnight (budget_usd_per_day = 0.01 spent)"
               in line for line in text)


def test_a_budget_needs_prices():
    text = ('[providers.a]\nbase_url = "http://a.test/v1"\n'
            '[models."a/m1"]\nbudget_usd_per_day = 5\n')
    with pytest.raises(fo.ConfigError, match=r"models.'a/m1'.budget_usd_per_day: set "
                                             r"price_in_per_mtok / price_out_per_mtok too"):
        fo.parse_config(text)
    cfg = fo.parse_config(text + "price_out_per_mtok = 2.5\n")
    assert cfg.models["a/m1"].budget_usd_per_day == 5.0
