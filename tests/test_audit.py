"""`failoverd audit`: per route, models in chain order, from the ledger alone: exact
percentiles with their counts, hangs over the threshold, failovers, what failed
attempts cost, margins from the rows' own total_timeout_s and cliff (assumed values
marked), trends, rotated and .gz files, --since, a table that fits, and --html."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import random
import re
import sys

import msgspec
import pytest
from click.testing import CliRunner
from conftest import ok_script
from test_engine import HUNG

import failoverd as fo

T0 = dt.datetime(2026, 1, 2, 10, 0, tzinfo=dt.UTC).timestamp()
LONG_A = "openrouter/" + "a" * 49  # 60 characters with its provider
LONG_B = "anthropic/" + "b" * 50


class Ledger:
    """Builds rows for a generated ledger: `attempt()` and `request()` keep the attempt
    index of each request as the daemon does."""

    def __init__(self) -> None:
        self.rows: list[fo.LedgerRow] = []
        self.index: dict[str, int] = {}

    def attempt(self, rid: str, slot: str, outcome: str = "ok", *, route: str = "desk",
                at: float = 0.0, **kw) -> None:
        provider, model = slot.split("/", 1)
        i = self.index.get(rid, 0)
        self.index[rid] = i + 1
        self.rows.append(fo.AttemptRow(ts=fo.utc_timestamp(T0 + at), request_id=rid, route=route,
                                       attempt=i, provider=provider, model=model,
                                       outcome=outcome, **kw))

    def request(self, rid: str, total_s: float, *, route: str = "desk", at: float = 0.0,
                served_by: str | None = None, limits: tuple[float, float] | None = (300, 660),
                outcome: str = "ok") -> None:
        total, cliff = limits if limits else (None, None)
        self.rows.append(fo.RequestRow(
            ts=fo.utc_timestamp(T0 + at), request_id=rid, route=route, outcome=outcome,
            served_by=served_by, attempts=self.index.get(rid, 1), total_ms=total_s * 1000,
            ttft_ms=None, status=200 if outcome == "ok" else 502, total_timeout_s=total,
            client_cliff_s=cliff))

    def write(self, path, rows=None) -> str:
        with open(path, "wb") as f:
            for row in self.rows if rows is None else rows:
                f.write(msgspec.json.encode(row) + b"\n")
        return str(path)


def report(rows, **kw) -> dict:
    audit = fo.Audit(**kw)
    for row in rows:
        audit.add(row)
    return audit.report()


def model(rep: dict, route: str, key: str) -> dict:
    [r] = [r for r in rep["routes"] if r["route"] == route]
    [m] = [m for m in r["models"] if m["model"] == key]
    return m


def route_of(rep: dict, name: str) -> dict:
    [r] = [r for r in rep["routes"] if r["route"] == name]
    return r


def run(*args: str):
    return CliRunner().invoke(fo.cli, list(args),
                              env={"FAILOVERD_CONFIG": "/nonexistent/failoverd.toml"})


@pytest.fixture
def generated() -> Ledger:
    """Route desk: z/primary then a/fallback. 100 answers from z/primary taking 1..100 s
    (first tokens at a tenth of that) in shuffled order; 10 first-token hangs on it
    (30 s each) answered by a/fallback in 2 s."""
    led = Ledger()
    latencies = list(range(1, 101))
    random.Random(7).shuffle(latencies)
    for i, s in enumerate(latencies):
        led.attempt(f"ok{i}", "z/primary", latency_ms=s * 1000.0, ttft_ms=s * 100.0,
                    at=i * 60, cost_usd=0.01)
        led.request(f"ok{i}", s + 0.5, served_by="z/primary", at=i * 60)
    for i in range(10):
        led.attempt(f"hang{i}", "z/primary", "first_token_timeout", latency_ms=30_000.0,
                    at=i * 60 + 30)
        led.attempt(f"hang{i}", "a/fallback", latency_ms=2000.0, ttft_ms=500.0,
                    at=i * 60 + 32, cost_usd=0.5)
        led.request(f"hang{i}", 32.0, served_by="a/fallback", at=i * 60 + 32)
    return led


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [fo.percentile(values, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert fo.percentile([], 50) is None
    assert fo.percentile([7.0], 99) == 7.0


def test_exact_percentiles_with_their_sample_counts(generated):
    rep = report(generated.rows)
    z = model(rep, "desk", "z/primary")
    assert z["latency_s"] == {"n": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert z["ttft_s"] == {"n": 100, "p50": 5.0, "p90": 9.0, "p99": 9.9, "max": 10.0}
    assert (z["n"], z["success_pct"], z["hangs"], z["failovers"]) == (110, 90.9, 10, 10)
    desk = route_of(rep, "desk")
    assert desk["latency_s"]["n"] == 110
    assert desk["latency_s"]["max"] == 100.5


def test_models_are_listed_in_chain_order_not_by_name(generated):
    desk = route_of(report(generated.rows), "desk")
    assert [(m["position"], m["model"]) for m in desk["models"]] == \
        [(0, "z/primary"), (1, "a/fallback")]


def test_failed_attempts_time_held_and_billed_cost(generated):
    generated.attempt("cut", "z/primary", "truncated", latency_ms=4000.0, ttft_ms=100.0,
                      cost_usd=0.25)
    generated.attempt("cut", "a/fallback", latency_ms=1000.0, cost_usd=0.5)
    generated.request("cut", 5.0, served_by="a/fallback")
    z = model(report(generated.rows), "desk", "z/primary")
    assert z["failed_held_s"] == 10 * 30.0 + 4.0
    assert z["cost_usd"] == pytest.approx(100 * 0.01 + 0.25)
    assert z["failed_cost_usd"] == pytest.approx(0.25)


def test_a_retry_of_the_same_slot_is_not_a_failover():
    led = Ledger()
    led.attempt("r", "a/m1", "http_error", latency_ms=10.0)
    led.attempt("r", "a/m1", "http_error", latency_ms=10.0)
    led.attempt("r", "b/m2", latency_ms=10.0)
    led.request("r", 0.5, served_by="b/m2")
    led.attempt("last", "b/m2", "http_error", latency_ms=10.0)  # nothing after it
    led.request("last", 0.1, outcome="error")
    a = model(report(led.rows), "desk", "a/m1")
    b = model(report(led.rows), "desk", "b/m2")
    assert (a["retries"], a["failovers"]) == (1, 1)
    assert (b["retries"], b["failovers"]) == (0, 0)


def test_hangs_and_hangs_over_the_threshold():
    led = Ledger()
    cases = [  # (outcome, fields, over 120 s without output?)
        ("ok", {"ttft_ms": 119_900.0, "latency_ms": 200_000.0}, False),
        ("ok", {"ttft_ms": 120_000.0, "latency_ms": 200_000.0}, True),
        ("ok", {"ttft_ms": 1000.0, "max_gap_ms": 150_000.0, "latency_ms": 200_000.0}, True),
        ("first_token_timeout", {"latency_ms": 30_000.0}, False),
        ("first_token_timeout", {"latency_ms": 180_000.0}, True),
        ("stall_timeout", {"ttft_ms": 1000.0, "max_gap_ms": 5000.0, "latency_ms": 140_000.0,
                           "stall_deadline_s": 130.0}, True),
        ("http_error", {"latency_ms": 125_000.0}, True),  # a 502 after 125 s of nothing
    ]
    for i, (outcome, fields, _) in enumerate(cases):
        led.attempt(f"r{i}", "c/m3", outcome, **fields)
    m = model(report(led.rows), "desk", "c/m3")
    assert (m["hangs"], m["hangs_over_threshold"]) == (3, sum(c[2] for c in cases))
    assert model(report(led.rows, hang_threshold_s=20.0), "desk", "c/m3")[
        "hangs_over_threshold"] == 7


def test_margins_come_from_each_rows_own_limits():
    led = Ledger()
    led.attempt("a", "a/m1")
    led.request("a", 50.0, served_by="a/m1", limits=(100, 200))
    led.attempt("b", "a/m1")
    led.request("b", 80.0, served_by="a/m1", limits=(100, 200))
    led.attempt("c", "a/m1", route="other")
    led.request("c", 80.0, served_by="a/m1", route="other", limits=(250, 400))
    rep = report(led.rows)
    desk, other = route_of(rep, "desk"), route_of(rep, "other")
    assert (desk["slowest_s"], desk["margin_to_total_s"], desk["margin_to_cliff_s"],
            desk["assumed"]) == (80.0, 20.0, 120.0, 0)
    assert (other["margin_to_total_s"], other["margin_to_cliff_s"]) == (170.0, 320.0)
    assert model(rep, "desk", "a/m1")["served"]["margin_to_cliff_s"] == 120.0
    assert (desk["total_timeout_s"], desk["client_cliff_s"]) == (100, 200)
    assert rep["assumed"]["requests"] == 0


def test_rows_without_limits_are_marked_assumed_never_silently_defaulted():
    led = Ledger()
    led.attempt("new", "a/m1")
    led.request("new", 50.0, served_by="a/m1", limits=(100, 200))
    led.attempt("old", "a/m1")
    led.request("old", 10.0, served_by="a/m1", limits=None)  # written before the fields
    rep = report(led.rows, assume_cliff_s=100.0)
    desk = route_of(rep, "desk")
    assert desk["assumed"] == 1
    assert desk["margin_to_cliff_s"] == 90.0  # the old row, against the assumed 100 s
    assert desk["margin_to_total_s"] == 50.0  # the new row, against its own 100 s
    assert rep["assumed"] == {"requests": 1, "total_timeout_s": 300.0,
                              "client_cliff_s": 100.0}
    text = fo.render_audit(rep, 120)
    assert re.search(r"all requests +2 +50.0 +50.0\* +90.0\*", text)
    assert "1 request row(s) predate total_timeout_s and client_cliff_s" in text
    assert "client_cliff_s = 100 s" in text


def test_only_old_rows_say_the_limits_were_not_recorded():
    led = Ledger()
    led.attempt("old", "a/m1")
    led.request("old", 10.0, served_by="a/m1", limits=None)
    rep = report(led.rows)
    assert (route_of(rep, "desk")["total_timeout_s"], route_of(rep, "desk")["client_cliff_s"]) \
        == (None, None)
    assert "total_timeout_s not recorded, client_cliff_s not recorded (assumed 300 s and " \
        "660 s)" in fo.render_audit(rep, 120)


def test_trend_by_hour_and_by_day_in_the_given_zone():
    led = Ledger()
    for at, total in ((-3600, 10.0), (-1800, 30.0), (600, 20.0), (4000, 5.0)):
        rid = f"r{at}"
        led.attempt(rid, "a/m1", at=at)
        led.request(rid, total, served_by="a/m1", at=at)
    cet = dt.timezone(dt.timedelta(hours=1))
    by_hour = route_of(report(led.rows, by="hour", tz=cet), "desk")["trend"]
    assert [(b["bucket"], b["requests"], b["latency_s"]["max"]) for b in by_hour] == [
        ("2026-01-02 10:00", 2, 30.0), ("2026-01-02 11:00", 1, 20.0),
        ("2026-01-02 12:00", 1, 5.0)]
    assert by_hour[0]["margin_to_total_s"] == 270.0
    far_east = dt.timezone(dt.timedelta(hours=13, minutes=30))  # past midnight at 10:30 UTC
    by_day = route_of(report(led.rows, by="day", tz=far_east), "desk")["trend"]
    assert [(b["bucket"], b["requests"]) for b in by_day] == [
        ("2026-01-02", 3), ("2026-01-03", 1)]


def test_since_keeps_only_rows_since_then(generated):
    since = fo.utc_timestamp(T0 + 50 * 60)
    rep = report(generated.rows, since_ts=since)
    assert model(rep, "desk", "z/primary")["latency_s"]["n"] == 50
    # ok0..ok49's attempt and request rows, and all ten hangs' three rows, came before
    assert rep["older_rows_skipped"] == 2 * 50 + 3 * 10


@pytest.mark.parametrize(("text", "seconds"), [
    ("30m", 1800), ("24h", 86400), ("1w", 604800), ("24 hours", 86400), ("90s", 90),
    ("2d", 172800), ("1h 30m", 5400), ("1 week", 604800), ("1.5h", 5400), (" 10 MIN ", 600)])
def test_since_durations(text, seconds):
    assert fo.parse_since(text, now=1e9) == 1e9 - seconds


def test_since_timestamps_local_unless_zoned(monkeypatch):
    monkeypatch.setenv("TZ", "CET-1")
    import time
    time.tzset()
    try:
        assert fo.parse_since("2026-01-02T10:00:00Z", now=0) == T0
        assert fo.parse_since("2026-01-02T12:00+02:00", now=0) == T0
        assert fo.parse_since("2026-01-02 11:00", now=0) == T0  # local: CET
        assert fo.parse_since("2026-01-02", now=0) == T0 - 11 * 3600
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("text", ["yesterday", "30", "5 parsecs", "", "1h and a bit"])
def test_since_rejects_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="expected a duration such as 30m, 24h, 1w"):
        fo.parse_since(text, now=0)


def test_since_on_the_command_line(tmp_path, generated):
    path = generated.write(tmp_path / "ledger.jsonl")
    bad = run("audit", path, "--since", "yesterday")
    assert bad.exit_code == 2
    assert "expected a duration such as 30m, 24h, 1w or '24 hours'" in bad.output
    recent = run("audit", path, "--json", "--since", "1w")
    assert recent.exit_code == 0, recent.output
    assert msgspec.json.decode(recent.output)["rows"] == 0  # the rows are from 2026-01-02


# -- files --------------------------------------------------------------------------------


def test_rotated_and_gzipped_files_read_as_one_ledger(tmp_path, generated):
    whole = report(generated.rows)
    rows = generated.rows
    path = tmp_path / "ledger.jsonl"
    third = len(rows) // 3
    with gzip.open(f"{path}.2.gz", "wb") as f:
        f.write(b"".join(msgspec.json.encode(r) + b"\n" for r in rows[:third]))
    generated.write(f"{path}.1", rows[third:2 * third])
    generated.write(path, rows[2 * third:])
    for age, name in ((300, f"{path}.2.gz"), (200, f"{path}.1"), (100, str(path))):
        os.utime(name, (T0 - age, T0 - age))
    (tmp_path / "ledger.jsonl.bak").write_text("not a rotation suffix\n")
    config = tmp_path / "failoverd.toml"
    config.write_text(f'[daemon]\nledger = "{path}"\n')
    found = run("audit", "--json", "--config", str(config))  # the ledger and its siblings
    assert found.exit_code == 0, found.output
    got = msgspec.json.decode(found.output)
    assert got["files"] == [f"{path}.2.gz", f"{path}.1", str(path)]
    assert got["routes"] == whole["routes"]
    named = run("audit", "--json", str(path), f"{path}.2.gz", f"{path}.1")  # any order
    assert msgspec.json.decode(named.output)["routes"] == whole["routes"]


def test_a_gzip_cut_short_gives_what_it_has(tmp_path, generated):
    data = gzip.compress(b"".join(msgspec.json.encode(r) + b"\n" for r in generated.rows))
    path = tmp_path / "ledger.jsonl.1.gz"
    path.write_bytes(data[:len(data) // 2])
    result = CliRunner().invoke(fo.cli, ["audit", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "read up to there" in result.stderr
    assert 0 < msgspec.json.decode(result.stdout)["rows"] < len(generated.rows)


def test_missing_files_are_named(tmp_path):
    result = run("audit", str(tmp_path / "absent.jsonl"))
    assert result.exit_code == 2
    assert "no ledger file at" in result.output
    assert "absent.jsonl" in result.output


def test_torn_lines_are_counted_not_fatal(tmp_path, generated):
    path = generated.write(tmp_path / "ledger.jsonl")
    with open(path, "ab") as f:
        f.write(b'{"kind":"attempt","ts":"2026-01-02T1\n')
    result = run("audit", path, "--width", "100")
    assert result.exit_code == 0, result.output
    assert "1 line(s) were not ledger rows" in result.output


# -- the table ----------------------------------------------------------------------------


def long_names() -> Ledger:
    led = Ledger()
    for i in range(30):
        led.attempt(f"r{i}", LONG_A, "first_token_timeout" if i % 5 == 0 else "ok",
                    latency_ms=1000.0 * (i + 1), ttft_ms=None if i % 5 == 0 else 50.0 * i,
                    route="a-route-with-a-long-name", at=i * 600)
        if i % 5 == 0:
            led.attempt(f"r{i}", LONG_B, latency_ms=1234.5, ttft_ms=12.0,
                        route="a-route-with-a-long-name", at=i * 600)
        led.request(f"r{i}", 1.0 + i, route="a-route-with-a-long-name", at=i * 600,
                    served_by=LONG_B if i % 5 == 0 else LONG_A)
    return led


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("by", [None, "hour", "day"])
def test_the_table_never_exceeds_the_width(tmp_path, width, by):
    path = long_names().write(tmp_path / "ledger.jsonl")
    args = ["audit", path, "--width", str(width), *(["--by", by] if by else [])]
    result = run(*args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= width
    assert len(LONG_A) == len(LONG_B) == 60
    # Long names fold; the figures beside them are whole.
    assert "".join(lines).count("a" * 20) >= 3
    assert re.search(r" 30 +80\.0 ", result.output)  # n and ok% of the long-named model
    if by:
        assert re.search(r"2026-01-02( 1\d:00)? +\d+ +\d+\.\d", result.output)


def test_the_table_reads_the_terminal_width_by_default(tmp_path):
    path = long_names().write(tmp_path / "ledger.jsonl")
    result = CliRunner().invoke(fo.cli, ["audit", path], env={"COLUMNS": "90"})
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 90


def test_an_empty_ledger_says_so(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text("")
    result = run("audit", str(path))
    assert result.exit_code == 0
    assert "no attempt or request rows" in result.output


# -- --html -------------------------------------------------------------------------------


EXTERNAL = re.compile(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}|<link|<script|@import|url\(|"
                      r"(?:src|href)\s*=", re.I)


def test_html_is_one_self_contained_page(tmp_path):
    led = long_names()
    led.attempt("x", "c/other", latency_ms=500.0, route="second", at=60)
    led.request("x", 0.5, served_by="c/other", route="second", at=60)
    path = led.write(tmp_path / "ledger.jsonl")
    page_path = tmp_path / "audit.html"
    result = run("audit", path, "--html", str(page_path), "--width", "100")
    assert result.exit_code == 0, result.output
    page = page_path.read_text()
    assert page.startswith("<!doctype html>")
    assert EXTERNAL.search(page) is None, EXTERNAL.search(page)
    svgs = re.findall(r"<svg\b.*?</svg>", page, re.S)
    titles = [" ".join(re.findall(r'<text[^>]*class="title plot_title"[^>]*>(.*?)</text>', s))
              for s in svgs]
    # Per route: its trend, then one plot per model in chain order.
    assert titles == [
        "route a-route-with-a-long-name: request latency per hour",
        f"#0 {LONG_A}: attempt latency", f"#1 {LONG_B}: attempt latency",
        "route second: request latency per hour", "#0 c/other: attempt latency"]
    first = svgs[1]
    assert first.count('class="dot') >= 30  # each attempt a point (plus the legend)
    assert "timed out" in first
    for label in ("total_timeout_s 300", "cliff 660", "answer p50", "answer p90",
                  "answer p99"):
        assert label in first
    assert "by hour" not in result.output  # the table shows no trend unless --by is given


def test_html_plots_at_most_a_bounded_number_of_points(tmp_path, monkeypatch):
    monkeypatch.setattr(fo, "HTML_MAX_POINTS", 10)
    led = long_names()
    path = led.write(tmp_path / "ledger.jsonl")
    page = tmp_path / "audit.html"
    assert run("audit", path, "--html", str(page)).exit_code == 0
    assert "(plotted: " in page.read_text()
    assert "of 30: failures, every" in page.read_text()


def test_html_without_the_report_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pygal", None)  # import pygal -> ImportError
    path = long_names().write(tmp_path / "ledger.jsonl")
    result = run("audit", path, "--html", str(tmp_path / "audit.html"))
    assert result.exit_code == 2
    assert "pip install 'failoverd[report]'" in result.output
    assert not (tmp_path / "audit.html").exists()


# -- from a real daemon -------------------------------------------------------------------


async def test_audit_of_a_daemons_own_ledger(harness, autojump_clock):
    h = harness({"a/m1": [HUNG, ok_script("a", first=2.0), ok_script("a", first=4.0)],
                 "b/m2": ok_script("b", first=1.0, gap=1.0)},
                models={"b/m2": fo.ModelConfig(price_in_per_mtok=1e6)},  # $1 per prompt token
                total_timeout_s=200)
    for _ in range(3):
        await h.chat()
    rows = [row for _, row in fo.read_ledger(h.ledger_path) if row is not None]
    rep = report(rows)
    a, b = (model(rep, "r", k) for k in ("a/m1", "b/m2"))
    assert (a["n"], a["success_pct"], a["hangs"], a["failovers"]) == (3, 66.7, 1, 1)
    assert (a["ttft_s"]["p50"], a["ttft_s"]["max"], a["latency_s"]["max"]) == (2.0, 4.0, 4.0)
    assert a["served"]["margin_to_total_s"] == 196.0  # the slowest request a served: 4 s
    assert a["served"]["margin_to_cliff_s"] == 656.0
    assert (b["n"], b["cost_usd"]) == (1, 12.0)
    assert b["served"]["margin_to_cliff_s"] == 660.0 - 31.0  # 30 s on hung a, then 1 s on b
    assert rep["assumed"]["requests"] == 0


def test_a_lost_hedge_is_neither_a_failure_nor_a_failover():
    led = Ledger()
    led.attempt("r", "a/m1", "hedge_lost", latency_ms=5000.0, cost_usd=0.1, ttft_ms=None)
    led.attempt("r", "b/m2", latency_ms=3000.0, ttft_ms=3000.0, hedge=True)
    led.request("r", 5.0, served_by="b/m2")
    a = model(report(led.rows), "desk", "a/m1")
    assert (a["n"], a["hedges_lost"], a["success_pct"], a["failovers"], a["failed_held_s"]) \
        == (1, 1, None, 0, 0.0)
    assert (a["cost_usd"], a["failed_cost_usd"]) == (0.1, 0.1)  # the loser may be billed


async def test_audit_counts_answers_rescued_by_continuation(harness, autojump_clock):
    parts = ["The", " answer", " is", " here", "."]
    h = harness({"a/m1": fo.ContinuingModel(parts, cut_after=2), "b/m2": fo.ContinuingModel(parts)},
                models={"b/m2": fo.ModelConfig(prefill="trailing")}, continuation=True)
    await h.chat(stream=True)  # broken, continued, ok
    h.upstreams.scripts["b/m2"] = fo.ContinuingModel(parts, rejects=True)
    await h.chat(stream=True)  # broken, continuation refused: an in-band error
    rows = [row for _, row in fo.read_ledger(h.ledger_path) if row is not None]
    [route] = report(rows)["routes"]
    assert (route["continued"], route["rescued"]) == (2, 1)
    assert "1 of 2 broken answers rescued by continuation" in fo.render_audit(report(rows), 120)


def test_a_refused_request_counts_in_n_and_ok_but_not_in_the_latencies():
    led = Ledger()
    led.attempt("r", "a/m1", latency_ms=2000.0, ttft_ms=1000.0)
    led.request("r", 2.0, served_by="a/m1")
    led.rows.append(fo.RequestRow(  # shed at once: no attempt
        ts=led.rows[-1].ts, request_id="shed", route="desk", outcome="error", served_by=None,
        attempts=0, total_ms=0.0, ttft_ms=None, status=503, total_timeout_s=300.0,
        client_cliff_s=660.0))
    rep = report(led.rows)
    [route] = rep["routes"]
    assert (route["requests"], route["success_pct"], route["timed"]) == (2, 50.0, 1)
    assert route["latency_s"]["n"] == 1
    assert "2 requests, 50.0% ok" in fo.render_audit(rep, 120)
