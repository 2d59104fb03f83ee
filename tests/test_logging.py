"""The daemon's log lines: a local timestamp on each line unless stderr is the journal
(which keeps its own, and reads "<N>" priority prefixes), and --log-format json."""

from __future__ import annotations

import os
import re
import sys
import time

import msgspec
import pytest
from click.testing import CliRunner

import failoverd as fo


class Stderr:
    """stderr as a real file (so it has a device and inode), set when logging is set up
    (pytest's capture swaps sys.stderr back between a fixture and its test)."""

    def __init__(self, path, monkeypatch) -> None:
        self.path, self.monkeypatch = path, monkeypatch
        self.file = open(path, "w")  # noqa: SIM115

    def setup(self, **kw) -> None:
        self.monkeypatch.setattr(sys, "stderr", self.file)
        fo._setup_logging(**kw)

    def lines(self) -> list[str]:
        self.file.flush()
        return self.path.read_text().splitlines()


@pytest.fixture
def stderr_file(tmp_path, monkeypatch):
    """The failoverd logger is restored afterwards (serve's setup replaces its handlers)."""
    saved = (fo.log.handlers[:], fo.log.level, fo.log.propagate)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setenv("TZ", "CET-1")
    time.tzset()
    f = Stderr(tmp_path / "stderr", monkeypatch)
    yield f
    fo.log.handlers[:], fo.log.level, fo.log.propagate = saved
    f.file.close()
    monkeypatch.undo()
    time.tzset()


def journal_of(f: Stderr) -> str:
    st = os.fstat(f.file.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_each_line_has_a_local_timestamp_off_the_journal(stderr_file):
    stderr_file.setup(verbose=True)
    fo.log.warning("breaker %s opened", "a")
    [line] = stderr_file.lines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+01:00 failoverd WARNING: "
                        r"breaker a opened", line), line


def test_the_journal_gets_priorities_and_no_timestamp(stderr_file, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", journal_of(stderr_file))
    stderr_file.setup(verbose=True)
    fo.log.warning("breaker a opened")
    fo.log.error("ledger full")
    fo.log.info("config reloaded")
    assert stderr_file.lines() == ["<4>breaker a opened", "<3>ledger full", "<6>config reloaded"]


def test_a_stderr_redirected_away_from_the_journal_gets_timestamps(stderr_file, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")  # inherited, but not this stderr
    stderr_file.setup(verbose=True)
    fo.log.warning("hello")
    [line] = stderr_file.lines()
    assert line.endswith(" failoverd WARNING: hello")
    assert not line.startswith("<")


def test_json_lines_for_log_shippers(stderr_file):
    stderr_file.setup(verbose=False, fmt="json")
    fo.log.info("not shown when quiet")
    fo.log.warning("breaker %s: %s", "a", 'quote " and newline\nhere')
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        fo.log.exception("handler failed")
    first, second = (msgspec.json.decode(line) for line in stderr_file.lines())
    assert first == {"ts": first["ts"], "level": "warning", "logger": "failoverd",
                     "msg": 'breaker a: quote " and newline\nhere'}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["level"] == "error"
    assert second["msg"].startswith("handler failed\nTraceback")
    assert "RuntimeError: boom" in second["msg"]


def test_json_on_the_journal_keeps_the_priority(stderr_file, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", journal_of(stderr_file))
    stderr_file.setup(verbose=True, fmt="json")
    fo.log.error("ledger full")
    [line] = stderr_file.lines()
    assert line.startswith("<3>{")
    assert msgspec.json.decode(line[3:])["msg"] == "ledger full"


def test_serve_takes_log_format():
    result = CliRunner().invoke(fo.cli, ["serve", "--log-format", "xml"])
    assert result.exit_code == 2
    assert "'text', 'json'" in result.output or "text, json" in result.output
