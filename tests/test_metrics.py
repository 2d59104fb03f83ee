"""GET /metrics: Prometheus families kept from the ledger's rows, checked against the
ledger itself with prometheus_client's own text parser; the row fields the operator's
view reads (deadlines, total_timeout_s, client_cliff_s); the ledger's observers."""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx2
import pytest
import trio
from conftest import http_request, ok_script
from prometheus_client.parser import text_string_to_metric_families
from test_engine import HUNG, respond

import failoverd as fo

REQUIRED = {
    "failoverd_requests": ("counter", {"route", "outcome"}),
    "failoverd_attempts": ("counter", {"provider", "model", "outcome"}),
    "failoverd_first_token_seconds": ("histogram", {"provider", "model"}),
    "failoverd_request_duration_seconds": ("histogram", {"route"}),
    "failoverd_breaker_state": ("gauge", {"scope", "key"}),
    "failoverd_in_flight_requests": ("gauge", set()),
    "failoverd_event_loop_lag_seconds": ("gauge", set()),
    "failoverd_cost_usd": ("counter", {"provider", "model"}),
    "failoverd_ledger_dropped_rows": ("counter", set()),
    "failoverd_deadline_seconds": ("gauge", {"provider", "model", "kind"}),
}
PRICED = {"b/m2": fo.ModelConfig(price_in_per_mtok=1e6)}  # $1 per prompt token


async def scrape(h) -> tuple[str, dict]:
    r = await h.send(http_request(b"", path="/metrics", method="GET"))
    assert r.status == 200, r.body
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    return r.headers["content-type"], families


def samples(family, name: str | None = None) -> dict[tuple, float]:
    """{sorted label items: value} of one sample name (default: the family's own)."""
    name = name or family.name
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def labels(**kw: str) -> tuple:
    return tuple(sorted(kw.items()))


async def test_metrics_match_the_ledger_after_failovers_hangs_and_breaker_trips(
        harness, autojump_clock):
    h = harness({"a/m1": HUNG, "b/m2": [respond(500), ok_script("b")], "c/m3": respond(503)},
                routes={"r": ["a/m1", "b/m2"], "solo": ["c/m3"]}, models=PRICED)
    for _ in range(4):  # three hangs on a open its breakers; the fourth skips a
        await h.chat(stream=True)
    assert (await h.chat("solo")).status == 502  # 503, retried once, then nothing left
    content_type, fams = await scrape(h)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    for name, (kind, label_names) in REQUIRED.items():
        assert fams[name].type == kind, name
        for s in fams[name].samples:
            assert set(s.labels) - {"le"} == label_names, (name, s)

    attempts, requests = h.rows("attempt"), h.rows("request")
    want = collections.Counter((r["provider"], r["model"], r["outcome"]) for r in attempts)
    assert samples(fams["failoverd_attempts"], "failoverd_attempts_total") == {
        labels(provider=p, model=m, outcome=o): n for (p, m, o), n in want.items()}
    assert want[("a", "m1", "first_token_timeout")] == 3
    assert want[("a", "m1", "skipped")] == 1
    assert want[("b", "m2", "http_error")] == 1

    want = collections.Counter((r["route"], r["outcome"]) for r in requests)
    assert samples(fams["failoverd_requests"], "failoverd_requests_total") == {
        labels(route=r, outcome=o): n for (r, o), n in want.items()}
    assert want == {("r", "ok"): 4, ("solo", "error"): 1}

    durations = samples(fams["failoverd_request_duration_seconds"],
                        "failoverd_request_duration_seconds_sum")
    assert durations[labels(route="r")] == pytest.approx(
        sum(r["total_ms"] for r in requests if r["route"] == "r") / 1000)
    buckets = samples(fams["failoverd_request_duration_seconds"],
                      "failoverd_request_duration_seconds_bucket")
    edges = {dict(k)["le"] for k in buckets}
    assert {"120.0", "300.0", "600.0", "660.0", "+Inf"} <= edges
    # 30.3 s (hang, 500, retry), 30 s, 30 s, then 0 s past a's open breaker.
    assert [buckets[labels(route="r", le=le)] for le in ("20.0", "30.0", "45.0")] == [1, 3, 4]

    ttft = samples(fams["failoverd_first_token_seconds"], "failoverd_first_token_seconds_count")
    with_ttft = collections.Counter((r["provider"], r["model"]) for r in attempts
                                    if r["ttft_ms"] is not None)
    assert ttft == {labels(provider=p, model=m): n for (p, m), n in with_ttft.items()}

    cost = samples(fams["failoverd_cost_usd"], "failoverd_cost_usd_total")
    assert cost[labels(provider="b", model="m2")] == pytest.approx(
        sum(r["cost_usd"] or 0 for r in attempts if r["model"] == "m2"))
    assert cost[labels(provider="b", model="m2")] > 0

    held = samples(fams["failoverd_attempt_seconds"], "failoverd_attempt_seconds_total")
    assert held[labels(provider="a", model="m1", outcome="first_token_timeout")] == \
        pytest.approx(90.0)

    breakers = h.rows("breaker")
    want = collections.Counter((r["scope"], r["key"], r["to"]) for r in breakers)
    assert samples(fams["failoverd_breaker_transitions"],
                   "failoverd_breaker_transitions_total") == {
        labels(scope=s, key=k, to=t): n for (s, k, t), n in want.items()}
    states = samples(fams["failoverd_breaker_state"])
    assert states[labels(scope="provider", key="a")] == 2  # open
    assert states[labels(scope="provider", key="b")] == 0  # closed
    deadlines = samples(fams["failoverd_deadline_seconds"])
    assert deadlines[labels(provider="a", model="m1", kind="first_token")] == 30.0
    assert deadlines[labels(provider="a", model="m1", kind="stall")] == 60.0
    assert samples(fams["failoverd_client_cliff_seconds"]) == {(): 660.0}
    assert samples(fams["failoverd_total_timeout_seconds"]) == {
        labels(route="r"): 300.0, labels(route="solo"): 300.0}


async def test_breaker_state_reads_the_cooldown_without_moving_the_breaker(
        harness, autojump_clock):
    h = harness({"a/m1": HUNG, "b/m2": ok_script("b")})
    for _ in range(3):
        await h.chat()
    before = len(h.rows("breaker"))
    _, fams = await scrape(h)
    assert samples(fams["failoverd_breaker_state"])[labels(scope="provider", key="a")] == 2
    await trio.sleep(10)  # the 5 s cooldown is over: the next request would probe
    _, fams = await scrape(h)
    assert samples(fams["failoverd_breaker_state"])[labels(scope="provider", key="a")] == 1
    assert h.d.health.breakers[("provider", "a")].state == "open"  # not moved by the scrape
    assert len(h.rows("breaker")) == before  # and no transition row written


async def test_in_flight_lag_and_dropped_rows_are_read_at_scrape_time(
        harness, autojump_clock, nursery):
    h = harness({"a/m1": HUNG, "b/m2": HUNG})
    nursery.start_soon(h.chat)
    await trio.sleep(1)
    h.d.loop_lag = 0.125
    _, fams = await scrape(h)
    assert samples(fams["failoverd_in_flight_requests"]) == {(): 1.0}
    assert samples(fams["failoverd_event_loop_lag_seconds"]) == {(): 0.125}
    assert samples(fams["failoverd_ledger_dropped_rows"],
                   "failoverd_ledger_dropped_rows_total") == {(): 0.0}
    h.ledger.close()  # the disk went away: every row from now on is dropped
    await trio.sleep(100)  # both hang to their deadline: two attempts, one request
    _, fams = await scrape(h)
    assert samples(fams["failoverd_in_flight_requests"]) == {(): 0.0}
    assert samples(fams["failoverd_ledger_dropped_rows"],
                   "failoverd_ledger_dropped_rows_total") == {(): 3.0}
    # Counted even though the rows never reached the disk.
    assert samples(fams["failoverd_requests"], "failoverd_requests_total") == {
        labels(route="r", outcome="error"): 1.0}


async def test_a_stream_updates_metrics_once_per_row_not_per_chunk(harness, autojump_clock):
    h = harness({"a/m1": ok_script(" ".join(["w"] * 200))})
    calls = []
    metrics = h.d.metrics
    original = metrics._child

    def counted(metric, *label_values):
        calls.append(metric)
        return original(metric, *label_values)

    metrics._child = counted
    r = await h.chat(stream=True)
    assert r.status == 200
    assert len(r.events) > 200
    # attempts, time held, first token, cost, two deadlines; then requests, duration
    assert len(calls) == 8


async def test_metrics_can_be_turned_off(harness, autojump_clock, monkeypatch):
    monkeypatch.setenv(fo.METRICS_ENV, "off")
    h = harness({"a/m1": ok_script()})
    assert h.d.metrics is None
    assert h.ledger.observers == []
    r = await h.send(http_request(b"", path="/metrics", method="GET"))
    assert r.status == 404
    assert "FAILOVERD_METRICS=off" in r.json["error"]["message"]
    assert (await h.chat()).status == 200


async def test_post_to_metrics_is_405(harness, autojump_clock):
    h = harness({})
    r = await h.send(http_request(b"{}", path="/metrics"))
    assert r.status == 405


async def test_each_daemon_has_its_own_registry(harness, autojump_clock):
    one = harness({"a/m1": ok_script(), "b/m2": ok_script()})
    two = harness({"a/m1": ok_script(), "b/m2": ok_script()})
    await one.chat()
    _, fams = await scrape(two)
    assert samples(fams["failoverd_requests"], "failoverd_requests_total") == {}


async def test_metrics_on_the_unix_socket_and_the_tcp_listener(tmp_path):
    sock = os.path.join(tempfile.mkdtemp(dir="/tmp"), "fo.sock")
    cfg = fo.Config(daemon=fo.DaemonConfig(socket=sock, tcp="127.0.0.1:0",
                                           ledger=str(tmp_path / "ledger.jsonl")),
                    providers={"a": fo.ProviderConfig(base_url="http://127.0.0.1:9/v1")},
                    routes={"r": fo.RouteConfig(chain=["a/m"])})
    listeners = await fo.open_listeners(cfg)
    port = listeners[1].socket.getsockname()[1]
    d = fo.Daemon(cfg, ledger=fo.Ledger(cfg.daemon.ledger))
    async with trio.open_nursery() as nursery:
        await nursery.start(fo.serve, d, listeners)
        with trio.fail_after(10):
            for client in (httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}"),
                           httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=sock),
                                             base_url="http://failoverd")):
                async with client:
                    r = await client.get("/metrics")
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
                names = {f.name for f in text_string_to_metric_families(r.text)}
                assert set(REQUIRED) <= names
                assert "process_resident_memory_bytes" in names
        d.shutdown.set()


@pytest.mark.parametrize(("command", "loads"), [
    (["tail"], []), (["audit"], ["rich"]), (["audit", "--shadows"], ["rich"]),
    (["check", "--no-keys", "--config", "examples/failoverd.toml"], ["tomllib"])])
def test_cli_commands_and_the_module_do_not_import_the_daemons_extras(tmp_path, command,
                                                                      loads):
    """Neither the metrics and report extras nor the network libraries (loaded on first
    use: failoverd's _library) are loaded by importing failoverd; a CLI command loads
    only what it shows or reads with (rich for the audit's tables, tomllib for a
    config). A module still waiting for its first use is a _LazyModule (type() does not
    load it)."""
    path = tmp_path / "ledger.jsonl"
    path.write_text("")
    args = command + ([] if command[0] == "check" else [str(path)])
    code = ("import sys, failoverd\n"
            "loaded = lambda: sorted(m for m in ('prometheus_client', 'pygal', 'rich', 'trio', "
            "'httpx2', 'httpcore2', 'h11', 'anyio', 'ssl', 'tomllib') if m in sys.modules "
            "and type(sys.modules[m]).__name__ != '_LazyModule')\n"
            "print('import', loaded())\n"
            "from click.testing import CliRunner\n"
            f"r = CliRunner().invoke(failoverd.cli, {args!r})\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sys.argv[1], loaded())\n")
    out = subprocess.run([sys.executable, "-c", code, command[0]], capture_output=True,
                         text=True, check=True, timeout=60,
                         cwd=Path(__file__).parent.parent).stdout.splitlines()
    assert out == ["import []", f"{command[0]} {loads}"]


# -- what rows carry for the operator's view ---------------------------------------------


async def test_rows_carry_the_deadlines_total_timeout_and_cliff(harness, autojump_clock):
    h = harness({"a/m1": HUNG, "b/m2": ok_script()}, first_token_timeout_s=12,
                stall_timeout_s=7, total_timeout_s=200)
    for _ in range(4):
        await h.chat()
    attempts = h.rows("attempt")
    tried = [r for r in attempts if r["outcome"] != "skipped"]
    skipped = [r for r in attempts if r["outcome"] == "skipped"]
    assert skipped  # the fourth request skips a's open breaker
    assert {(r["first_token_deadline_s"], r["stall_deadline_s"]) for r in tried} == {(12, 7)}
    assert {(r["first_token_deadline_s"], r["stall_deadline_s"]) for r in skipped} == \
        {(None, None)}
    assert {(r["total_timeout_s"], r["client_cliff_s"]) for r in h.rows("request")} == \
        {(200, 660)}


async def test_a_shed_request_row_carries_total_timeout_and_cliff(harness, autojump_clock):
    h = harness({"a/m1": ok_script()})
    h.d.shed_share = 0.99
    h.d.rng.value = 0.0  # FixedJitter: every draw sheds
    assert (await h.chat()).status == 503
    [row] = h.rows("request")
    assert (row["status"], row["total_timeout_s"], row["client_cliff_s"]) == (503, 300, 660)
    _, fams = await scrape(h)
    assert samples(fams["failoverd_requests"], "failoverd_requests_total") == {
        labels(route="r", outcome="error"): 1.0}
    # A refusal never reached an upstream: it does not pull the duration quantiles down.
    assert samples(fams["failoverd_request_duration_seconds"],
                   "failoverd_request_duration_seconds_count") == {}


async def test_in_flight_requests_say_how_long_they_have_left(harness, autojump_clock, nursery):
    h = harness({"a/m1": HUNG, "b/m2": HUNG}, total_timeout_s=100)
    nursery.start_soon(h.chat)
    await trio.sleep(40)
    [inflight] = h.d.status()["in_flight"]
    assert inflight["left_s"] == 60.0


# -- the ledger's observers --------------------------------------------------------------


def test_an_observer_that_raises_never_costs_the_row(tmp_path, caplog):
    ledger = fo.Ledger(str(tmp_path / "ledger.jsonl"))
    seen = []

    def broken(row):
        raise RuntimeError("observer bug")

    ledger.observers += [broken, seen.append]
    row = fo.BreakerRow(ts="t", scope="provider", key="a", from_="closed", to="open",
                        reason="x")
    with caplog.at_level(logging.ERROR, logger="failoverd"):
        ledger.write(row)
        ledger.write(row)
    ledger.close()
    assert len((tmp_path / "ledger.jsonl").read_bytes().splitlines()) == 2
    assert seen == [row, row]  # the next observer still ran
    assert caplog.text.count("ledger observer") == 1  # logged once
    assert "observer bug" in caplog.text


def test_breaker_state_at_is_read_only():
    b = fo.Breaker()
    assert fo.breaker_state_at(b, 0.0) == ("closed", 0.0)
    b.state, b.open_until = "open", 10.0
    assert fo.breaker_state_at(b, 5.0) == ("open", 10.0)
    assert fo.breaker_state_at(b, 10.0) == ("half_open", 0.0)
    b.hold = True
    assert fo.breaker_state_at(b, 10.0) == ("closed", 0.0)
    b.state, b.probing = "half_open", True
    assert fo.breaker_state_at(b, 11.0) == ("half_open", math.inf)
    assert (b.state, b.open_until, b.probing) == ("half_open", 10.0, True)


async def test_the_grafana_dashboard_uses_only_metrics_the_daemon_serves(harness,
                                                                         autojump_clock):
    h = harness({"a/m1": HUNG, "b/m2": ok_script()})
    for _ in range(3):
        await h.chat()
    _, fams = await scrape(h)
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "grafana-dashboard.json")
    with open(path) as f:  # noqa: ASYNC230 -- a test reading a fixture
        dashboard = fo.msgspec.json.decode(f.read())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 15
    used = {re.sub(r"_(bucket|total|sum|count)$", "", name)
            for e in exprs for name in re.findall(r"\b(?:failoverd|process)_[a-z_]+", e)}
    assert used - set(fams) == set()
    # What the issue asks the dashboard to show.
    for name in ("failoverd_first_token_seconds", "failoverd_request_duration_seconds",
                 "failoverd_total_timeout_seconds", "failoverd_client_cliff_seconds",
                 "failoverd_attempts", "failoverd_requests", "failoverd_breaker_state",
                 "failoverd_cost_usd"):
        assert name in used, name
