"""`failoverd audit`: per-model figures from the ledger."""

from __future__ import annotations

import os

import msgspec
import pytest
from click.testing import CliRunner
from conftest import ok_script
from test_engine import HUNG

import failoverd as fo


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [fo.percentile(values, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert fo.percentile([], 50) is None
    assert fo.percentile([7.0], 99) == 7.0


async def test_audit_summarises_each_model(harness, autojump_clock):
    h = harness({"a/m1": [HUNG, ok_script("a", first=2.0), ok_script("a", first=4.0)],
                 "b/m2": ok_script("b", first=1.0, gap=1.0)},
                models={"b/m2": fo.ModelConfig(price_in_per_mtok=1e6)})  # $1 per prompt token
    for _ in range(3):
        await h.chat()
    rows = [row for _, row in fo.read_ledger(h.ledger_path) if row is not None]
    a, b = fo.audit(rows, cliff_s=660.0)
    assert (a["model"], a["n"], a["success_pct"], a["hangs"], a["failovers"]) == \
        ("a/m1", 3, pytest.approx(66.7), 1, 1)
    assert (a["ttft_p50_ms"], a["ttft_max_ms"]) == (2000.0, 4000.0)
    assert a["latency_max_ms"] == 4000.0
    assert a["cliff_margin_s"] == 656.0  # the slowest request a served took 4 s
    assert (b["model"], b["n"], b["success_pct"], b["cost_usd"]) == ("b/m2", 1, 100.0, 12.0)
    assert b["cliff_margin_s"] == 660.0 - 31.0  # 30 s on hung a, then 1 s on b


async def test_audit_command_prints_a_table_and_json(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a"), "b/m2": ok_script()})
    await h.chat()
    runner = CliRunner()
    text = runner.invoke(fo.cli, ["audit", h.ledger_path])
    assert text.exit_code == 0, text.output
    header, line = text.output.splitlines()
    assert header.split()[:3] == ["model", "n", "ok%"]
    assert line.split()[:3] == ["a/m1", "1", "100.0"]
    as_json = runner.invoke(fo.cli, ["audit", h.ledger_path, "--json"])
    assert msgspec.json.decode(as_json.output)[0]["model"] == "a/m1"


async def test_audit_since_keeps_only_recent_rows(harness, autojump_clock):
    h = harness({"a/m1": ok_script("a")})
    await h.chat()
    old = '{"kind":"attempt","ts":"2020-01-01T00:00:00.000Z","request_id":"x","route":"r",' \
          '"attempt":0,"provider":"z","model":"old","outcome":"ok"}\n'
    os.write(h.ledger.fd, old.encode())  # a row from long ago, through the ledger's own fd
    runner = CliRunner()
    everything = runner.invoke(fo.cli, ["audit", h.ledger_path, "--json"]).output
    recent = runner.invoke(fo.cli, ["audit", h.ledger_path, "--json", "--since", "2d"]).output
    assert [r["model"] for r in msgspec.json.decode(everything)] == ["a/m1", "z/old"]
    assert [r["model"] for r in msgspec.json.decode(recent)] == ["a/m1"]
    bad = runner.invoke(fo.cli, ["audit", h.ledger_path, "--since", "yesterday"])
    assert bad.exit_code == 2
    assert "expected a duration like 30m, 6h or 2d" in bad.output
