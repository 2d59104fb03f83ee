"""`failoverd tail` behaves like tail(1): the last 10 rows by default, `-n N`, `-n 0 -f`
only new rows, read backwards from the end of the file, rotation followed, filters."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import msgspec
import pytest
from click.testing import CliRunner
from test_cli import ROWS, TS, Sleeps, append, run

import failoverd as fo


def attempt(i: int, *, route: str = "desk", outcome: str = "ok", request_id: str | None = None,
            **kw) -> fo.AttemptRow:
    return fo.AttemptRow(ts=TS, request_id=request_id or f"req{i}", route=route, attempt=0,
                         provider="a", model="m1", outcome=outcome, latency_ms=float(i), **kw)


def write_rows(path, rows) -> None:
    with open(path, "ab") as f:
        for row in rows:
            f.write(msgspec.json.encode(row) + b"\n")


def printed(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [msgspec.json.decode(line) for line in result.stdout.splitlines()]


@pytest.fixture
def long_ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_rows(path, [attempt(i) for i in range(25)])
    return str(path)


def test_tail_prints_the_last_10_rows_by_default(long_ledger):
    assert [r["latency_ms"] for r in printed(run("tail", "--json", long_ledger))] == \
        [float(i) for i in range(15, 25)]


def test_tail_n_0_prints_nothing(long_ledger):
    result = run("tail", "-n", "0", long_ledger)
    assert result.exit_code == 0
    assert result.stdout == ""


def test_tail_refuses_a_negative_count(long_ledger):
    result = run("tail", "-n", "-1", long_ledger)
    assert result.exit_code == 2
    assert "-n" in result.output


def test_tail_filters_by_route_outcome_and_request_id(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_rows(path, [
        attempt(0, route="desk", outcome="first_token_timeout", request_id="r1"),
        attempt(1, route="desk", outcome="ok", request_id="r1"),
        attempt(2, route="batch", outcome="skipped", skip_reason="breaker_open",
                request_id="r2"),
        attempt(3, route="batch", outcome="ok", request_id="r2"),
        fo.RequestRow(ts=TS, request_id="r2", route="batch", outcome="ok", served_by="a/m1",
                      attempts=2, total_ms=3.0, ttft_ms=1.0, status=200),
        ROWS[3],  # a breaker row: no route, no request
    ])

    def latencies(*args):
        return [r.get("latency_ms", r["kind"]) for r in printed(run("tail", "--json", *args,
                                                                     str(path)))]

    assert latencies("--route", "batch") == [2.0, 3.0, "request"]
    assert latencies("--outcome", "first_token_timeout", "--outcome", "breaker_open") == \
        [0.0, 2.0]
    assert latencies("--outcome", "ok", "--route", "batch") == [3.0, "request"]
    assert latencies("--request-id", "r1", "-n", "1") == [1.0]
    assert latencies() == [0.0, 1.0, 2.0, 3.0, "request", "breaker"]


class CountingFile(io.BufferedReader):
    def __init__(self, raw) -> None:
        super().__init__(raw)
        self.read_bytes = 0

    def read(self, size=-1):  # noqa: D102
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_tail_reads_only_the_end_of_a_large_ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_rows(path, [attempt(i) for i in range(20_000)])
    size = os.path.getsize(path)
    with CountingFile(open(path, "rb", buffering=0)) as f:  # noqa: SIM115
        whole = fo._after_last_newline(f, size)
        rows = fo.last_rows(f, whole, 10, None)
    assert [r.latency_ms for _, r in rows] == [float(i) for i in range(19_990, 20_000)]
    assert size > 50 * fo.TAIL_BLOCK
    assert f.read_bytes <= 2 * fo.TAIL_BLOCK


@pytest.mark.parametrize("block", [7, 64, 333])
def test_reading_backwards_matches_reading_forwards(tmp_path, monkeypatch, block):
    """Small blocks put line ends at every place a block can cut them, and the long
    error text makes lines longer than a block; torn lines sit in between."""
    monkeypatch.setattr(fo, "TAIL_BLOCK", block)
    path = tmp_path / "ledger.jsonl"
    rows = [attempt(i, error="x" * (i * 37 % 500)) for i in range(60)]
    with open(path, "wb") as f:
        for i, row in enumerate(rows):
            f.write(msgspec.json.encode(row) + b"\n")
            if i % 17 == 5:
                f.write(b'{"kind":"attempt","ts":"torn\n')
        f.write(b'{"kind":"request","ts":"still being wri')
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        whole = fo._after_last_newline(f, size)
        assert whole == size - len(b'{"kind":"request","ts":"still being wri')
        for n in (0, 1, 2, 10, 59, 60, 100):
            got = [row for _, row in fo.last_rows(f, whole, n, None)]
            assert got == rows[len(rows) - min(n, len(rows)):], n


def test_tail_follow_finishes_the_old_file_after_rotation(tmp_path, monkeypatch):
    path = str(tmp_path / "ledger.jsonl")
    write_rows(path, [attempt(0)])

    def rotate() -> None:
        os.rename(path, path + ".1")
        write_rows(path + ".1", [attempt(1)])  # the daemon still writes to the old file ...
        write_rows(path, [attempt(2)])  # ... until SIGHUP

    monkeypatch.setattr(fo.time, "sleep", Sleeps(rotate, lambda: write_rows(path, [attempt(3)])))
    assert [r["latency_ms"] for r in printed(run("tail", "-f", "--json", path))] == \
        [0.0, 1.0, 2.0, 3.0]


def test_tail_follow_applies_the_filters_to_new_rows(tmp_path, monkeypatch):
    path = str(tmp_path / "ledger.jsonl")
    write_rows(path, [attempt(0, route="batch")])
    monkeypatch.setattr(fo.time, "sleep", Sleeps(lambda: write_rows(path, [
        attempt(1, route="desk"), attempt(2, route="batch")])))
    assert [r["latency_ms"] for r in printed(run("tail", "-f", "--json", "-n", "0",
                                                 "--route", "batch", path))] == [2.0]


def _wait_until_open(pid: int, path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fds = os.listdir(f"/proc/{pid}/fd")
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return
            except FileNotFoundError:
                continue
        time.sleep(0.02)
    raise AssertionError(f"tail never opened {path}")


def test_tail_n_0_f_prints_only_new_rows(tmp_path):
    path = str(tmp_path / "ledger.jsonl")
    write_rows(path, ROWS)
    proc = subprocess.Popen([sys.executable, "-m", "failoverd", "tail", "-n", "0", "-f",
                             "--json", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_until_open(proc.pid, path)
        time.sleep(0.3)  # past its first look at the end of the file
        new = attempt(99, route="fresh")
        append(path, msgspec.json.encode(new) + b"\n")
        deadline = time.monotonic() + 20
        line = b""
        os.set_blocking(proc.stdout.fileno(), False)
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            line += proc.stdout.read() or b""
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [msgspec.json.decode(x) for x in line.splitlines()] == [msgspec.to_builtins(new)]


def test_tail_finds_the_ledger_through_config_and_never_guesses(tmp_path, monkeypatch):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_bytes(msgspec.json.encode(fo.RequestRow(
        ts="2026-01-01T00:00:00.000Z", request_id="r1", route="desk", outcome="ok",
        served_by="a/m", attempts=1, total_ms=1.0, ttft_ms=1.0, status=200)) + b"\n")
    config = tmp_path / "failoverd.toml"
    config.write_text(f'[daemon]\nledger = "{ledger}"\n')
    runner = CliRunner()
    ok = runner.invoke(fo.cli, ["tail", "--config", str(config)])
    assert ok.exit_code == 0, ok.output
    assert "r1" in ok.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n")
    monkeypatch.setenv("FAILOVERD_CONFIG", str(broken))
    bad = runner.invoke(fo.cli, ["tail"])
    assert bad.exit_code == 1
    assert "not valid TOML" in bad.output  # said, not a silent fall back to another ledger


def test_an_unreadable_ledger_says_who_may_read_it(tmp_path, monkeypatch):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fo, "_tail", refuse)
    r = CliRunner().invoke(fo.cli, ["tail", str(ledger)])
    assert r.exit_code == 1
    assert "permission denied" in r.output
    assert "sudo failoverd tail" in r.output


def test_status_with_a_config_that_does_not_load_says_so(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n")
    r = CliRunner().invoke(fo.cli, ["status", "--config", str(broken)])
    assert r.exit_code == 1
    assert "not valid TOML" in r.output  # not a question to some other daemon's socket
