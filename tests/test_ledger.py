"""The JSONL ledger: rows round-trip, a crash's torn line costs one line and no more,
a full disk costs rows but never a request, and API keys never reach the file.
"""

from __future__ import annotations

import errno
import logging
import os

import msgspec
import pytest
from conftest import Harness, MockUpstreams, make_config, ok_script

import failoverd as fo

KEY = "sk-test-secret-key-aaaa"  # conftest's Harness gives provider a this key
TS = "2026-01-02T03:04:05.678Z"


def attempt_row(**fields) -> fo.AttemptRow:
    defaults = {"ts": TS, "request_id": "r1", "route": "desk", "attempt": 0, "provider": "a",
                "model": "m1", "outcome": "ok"}
    return fo.AttemptRow(**{**defaults, **fields})


ROWS = [
    attempt_row(status=200, ttft_ms=120.5, latency_ms=900.0, max_gap_ms=40.0, committed=True,
                tokens_in=12, tokens_out=3, cost_usd=0.0001, stream=True, client_pid=42,
                client_uid=1000),
    attempt_row(attempt=1, outcome="skipped", skip_reason="breaker_open"),
    fo.RequestRow(ts=TS, request_id="r1", route="desk", outcome="ok", served_by="a/m1",
                  attempts=2, total_ms=901.0, ttft_ms=121.0, status=200),
    fo.BreakerRow(ts=TS, scope="provider", key="a", from_="closed", to="open",
                  reason="3 consecutive failures", open_until=TS),
]


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "ledger.jsonl")


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_rows(path: str, rows: list[fo.LedgerRow]) -> None:
    ledger = fo.Ledger(path)
    for row in rows:
        ledger.write(row)
    ledger.close()


def test_rows_round_trip(path):
    write_rows(path, ROWS)

    assert [row for _, row in fo.read_ledger(path)] == ROWS


def test_each_row_is_one_json_line_with_kind_and_ts(path):
    write_rows(path, ROWS)

    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[-1] == b""  # every row ends its line
    objects = [msgspec.json.decode(line) for line in lines[:-1]]
    assert [o["kind"] for o in objects] == ["attempt", "attempt", "request", "breaker"]
    assert {o["ts"] for o in objects} == {TS}
    assert (objects[3]["from"], objects[3]["to"]) == ("closed", "open")


def test_reopening_appends_after_earlier_rows(path):
    write_rows(path, ROWS[:2])
    write_rows(path, ROWS[2:])

    assert [row for _, row in fo.read_ledger(path)] == ROWS


def test_torn_last_line_stays_one_bad_line_and_the_next_row_is_intact(path):
    write_rows(path, ROWS[:1])
    torn = b'{"kind":"attempt","ts":"2026-01-02T03:04'
    with open(path, "ab") as f:  # the crash: half a row, no newline
        f.write(torn)

    write_rows(path, ROWS[1:2])

    assert list(fo.read_ledger(path)) == [
        (msgspec.json.encode(ROWS[0]), ROWS[0]), (torn, None),
        (msgspec.json.encode(ROWS[1]), ROWS[1])]


def test_ledger_follows_rotation_on_reopen(path):
    ledger = fo.Ledger(path)
    ledger.write(ROWS[0])
    os.rename(path, path + ".1")
    ledger.reopen()
    ledger.write(ROWS[1])
    ledger.close()

    assert [row for _, row in fo.read_ledger(path + ".1")] == ROWS[:1]
    assert [row for _, row in fo.read_ledger(path)] == ROWS[1:2]


@pytest.fixture
def failoverd_log(caplog, monkeypatch) -> pytest.LogCaptureFixture:
    """Capture the daemon's log even after the CLI has turned propagation off."""
    monkeypatch.setattr(fo.log, "propagate", True)
    caplog.set_level(logging.INFO, logger="failoverd")
    return caplog


def test_full_disk_drops_rows_without_raising_and_logs_once(failoverd_log):
    ledger = fo.Ledger("/dev/full")  # every write fails with ENOSPC

    for row in ROWS:
        ledger.write(row)

    assert ledger.dropped == len(ROWS)
    errors = [r for r in failoverd_log.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "/dev/full" in errors[0].getMessage()
    assert "dropped" in errors[0].getMessage()


async def test_full_disk_does_not_stop_requests(tmp_path, nursery, failoverd_log,
                                                autojump_clock):
    cfg = make_config({"r": ["a/m1"]})
    cfg = msgspec.structs.replace(cfg, daemon=fo.DaemonConfig(ledger="/dev/full", state_file=""))
    h = Harness(cfg, MockUpstreams({"a/m1": ok_script()}), "/dev/full", nursery)

    first, second = await h.chat(), await h.chat(stream=True)
    status = await h.send(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")

    assert (first.status, first.text) == (200, "hi there")
    assert (second.status, second.text) == (200, "hi there")
    assert h.ledger.dropped == 4  # an attempt and a request row each
    assert status.json["ledger"]["dropped_rows"] == 4
    assert len([r for r in failoverd_log.records if r.levelno == logging.ERROR]) == 1


class FillingDisk:
    """os.write for one descriptor as a disk with `free` bytes left: a write takes what
    fits (a short write), then ENOSPC. Space comes back when `free` is raised."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fd: int, free: int) -> None:
        self.fd, self.free = fd, free
        self._write = os.write
        monkeypatch.setattr(fo.os, "write", self.write)

    def write(self, fd: int, data) -> int:
        if fd != self.fd:
            return self._write(fd, data)
        if self.free <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self._write(fd, bytes(data)[:self.free])
        self.free -= n
        return n


def test_a_row_torn_by_a_full_disk_is_cut_off_before_the_next_row(path, monkeypatch):
    """The disk fills mid-row, then space comes back: the torn row is gone, not glued
    to the next one, so every line of the file is a whole row."""
    ledger = fo.Ledger(path)
    ledger.write(ROWS[0])
    disk = FillingDisk(monkeypatch, ledger.fd, free=25)
    ledger.write(ROWS[1])  # 25 bytes of it reach the file, then the disk is full
    # A reader (tail -f, jq) sees only whole rows meanwhile.
    assert [row for _, row in fo.read_ledger(path)] == [ROWS[0]]
    ledger.write(ROWS[2])  # nothing fits
    disk.free = 10**9  # space is freed
    ledger.write(ROWS[3])
    ledger.close()

    assert [row for _, row in fo.read_ledger(path)] == [ROWS[0], ROWS[3]]
    with open(path, "rb") as f:
        assert f.read().endswith(b"}\n")
    assert ledger.dropped == 2


def test_a_short_write_that_completes_loses_nothing(path, monkeypatch):
    """A write cut short by a signal, not a full disk: the rest follows, the row is whole."""
    ledger = fo.Ledger(path)
    disk = FillingDisk(monkeypatch, ledger.fd, free=25)
    real = disk.write

    def short_once(fd, data):
        n = real(fd, data)
        disk.free = 10**9
        return n

    monkeypatch.setattr(fo.os, "write", short_once)
    ledger.write(ROWS[0])
    ledger.write(ROWS[1])
    ledger.close()

    assert [row for _, row in fo.read_ledger(path)] == ROWS[:2]
    assert ledger.dropped == 0


def test_a_row_stays_dropped_until_the_torn_one_can_be_cut_then_rotation_cuts_it(
        path, monkeypatch):
    """If even the cut fails (an I/O error), no row is appended to the torn one; the
    cut is retried before each row, and on the rotated file when the ledger reopens."""
    ledger = fo.Ledger(path)
    ledger.write(ROWS[0])
    real_ftruncate = os.ftruncate

    def broken_ftruncate(fd, length):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fo.os, "ftruncate", broken_ftruncate)
    disk = FillingDisk(monkeypatch, ledger.fd, free=25)
    ledger.write(ROWS[1])  # torn, and the cut fails
    disk.free = 10**9
    ledger.write(ROWS[2])  # not glued to the torn row: dropped
    monkeypatch.setattr(fo.os, "ftruncate", real_ftruncate)
    os.rename(path, path + ".1")
    ledger.reopen()
    ledger.write(ROWS[3])
    ledger.close()

    assert [row for _, row in fo.read_ledger(path + ".1")] == ROWS[:1]
    assert [row for _, row in fo.read_ledger(path)] == ROWS[3:]
    assert ledger.dropped == 2


def error_json(text: str) -> bytes:
    return msgspec.json.encode({"error": {"message": text, "type": "invalid_request_error",
                                          "code": None, "param": None}})


ECHO = f"Incorrect API key provided: {KEY}. Authorization: Bearer {KEY}"

# (id, a/m1's script): every upstream failure that carries text into the ledger
KEY_ECHOES = [
    ("401 body", [("respond", 401, {}, error_json(ECHO))]),
    ("400 passed through to the client", [("respond", 400, {}, error_json(ECHO))]),
    ("500 body", [("respond", 500, {}, error_json(ECHO))]),
    ("error event in the stream", [("head", 200, {}), ("sse", {"error": {"message": ECHO}})]),
]


@pytest.mark.parametrize("script", [pytest.param(s, id=i) for i, s in KEY_ECHOES])
async def test_api_key_echoed_by_the_upstream_never_reaches_ledger_or_log(
        harness, autojump_clock, failoverd_log, script):
    h = harness({"a/m1": script, "b/m2": ok_script()})

    await h.chat()

    assert h.upstreams.requests[0].headers["authorization"] == f"Bearer {KEY}"
    errors = [r["error"] for r in h.rows("attempt") if r["provider"] == "a"]
    assert errors
    assert all("[redacted]" in e for e in errors)
    ledger_text = read_text(h.ledger_path)
    for fragment in (KEY, "secret-key-aaaa"):
        assert fragment not in ledger_text
        assert fragment not in failoverd_log.text


# (id, text, known secrets, scrubbed text)
SCRUB = [
    ("Bearer token", "Authorization: Bearer abcDEF123456.ghi-jkl", (),
     "Authorization: Bearer [redacted]"),
    ("lower-case bearer", "authorization: bearer abcDEF1234567", (),
     "authorization: bearer [redacted]"),
    ("x-api-key header", "x-api-key: abcdef0123456789", (), "x-api-key: [redacted]"),
    ("x-api-key as JSON", '{"x-api-key": "abcdef0123456789"}', (), '{"x-api-key": "[redacted]"}'),
    ("OpenAI key", "bad key sk-proj-AbC123dEf456", (), "bad key sk-[redacted]"),
    ("Anthropic key", "key=sk-ant-api03-AbC_123-xyz.", (), "key=sk-[redacted]."),
    ("xAI key", "xai-AbCdEf123456 is invalid", (), "xai-[redacted] is invalid"),
    ("Groq key", "gsk_AbCdEf123456", (), "gsk_[redacted]"),
    ("Google key in a URL", "GET /v1?key=AIzaSyAbCdEf123456", (), "GET /v1?key=AIza[redacted]"),
    ("known secret of no known shape", "token hunter2hunter2 rejected", ("hunter2hunter2",),
     "token [redacted] rejected"),
    ("every occurrence of a known secret", "p4ssw0rd! then p4ssw0rd!", ("p4ssw0rd!",),
     "[redacted] then [redacted]"),
    ("plain error text", "HTTP 500: upstream overloaded, retry later", (),
     "HTTP 500: upstream overloaded, retry later"),
    ("words that merely contain sk-", "risk-assessment and task-management", (),
     "risk-assessment and task-management"),
    ("the start of a known key, cut off at the end", "bad key Zq9dk2LmPa0s",
     ("Zq9dk2LmPa0sXw8QQr7T",), "bad key [redacted]"),
    ("the end of a known key, cut off at the start", "Xw8QQr7T was refused",
     ("Zq9dk2LmPa0sXw8QQr7T",), "[redacted] was refused"),
    ("a piece from the middle of a known key", "key ...dk2LmPa0sXw... revoked",
     ("Zq9dk2LmPa0sXw8QQr7T",), "key ...[redacted]... revoked"),
    ("a piece shorter than 8 characters stays", "id Zq9dk2L", ("Zq9dk2LmPa0sXw8QQr7T",),
     "id Zq9dk2L"),
]


@pytest.mark.parametrize(("text", "known", "scrubbed"),
                         [pytest.param(*case[1:], id=case[0]) for case in SCRUB])
def test_scrub(text, known, scrubbed):
    assert fo.scrub(text, known) == scrubbed


CANARY = "Zq9dk2LmPa0sXw8QQr7TtYu3VvBn1MmC"  # a key of no known shape: only `known` finds it


def fragments(secret: str, n: int = 8) -> list[str]:
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


@pytest.mark.parametrize("before_cut", [5, 8, 20, len(CANARY) - 1, len(CANARY) + 10])
async def test_no_fragment_of_a_key_at_the_cut_reaches_anyone(
        harness, autojump_clock, failoverd_log, tmp_path, before_cut):
    """The upstream echoes the key so that the 300-character cut of its message falls
    inside it: no 8-character piece of it reaches the ledger, the log, /status,
    state.json or the client."""
    message = "x" * (300 - before_cut) + CANARY + " is not a valid key"
    h = harness({"a/m1": [("respond", 401, {}, error_json(message))]}, routes={"r": ["a/m1"]})
    h.d.snap.keys = {"a": CANARY}
    h.d.snap.secrets = [CANARY]

    reply = await h.chat()
    status = await h.send(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")

    assert reply.status == 502
    assert h.rows("breaker")[0]["reason"].startswith("credential isolated: HTTP 401: xxx")
    places = {"ledger": read_text(h.ledger_path), "log": failoverd_log.text,
              "client": reply.body.decode(), "status": status.body.decode(),
              "state.json": (tmp_path / "state.json").read_text()}
    assert all("xxxx" in text for text in places.values())  # the message got there
    leaks = {where: piece for where, text in places.items() for piece in fragments(CANARY)
             if piece in text}
    assert leaks == {}
    # Scrubbed before the cut: not even a shorter piece is left at the end of the message.
    assert not [where for where, text in places.items() if CANARY[:5] in text]


def test_state_file_is_created_0640_like_the_ledger(tmp_path):
    """Breaker reasons quote upstream errors: the state file is no more readable than the
    ledger, even where a crash left a world-readable .tmp behind."""
    (tmp_path / "state.json.tmp").write_text("{}")
    os.chmod(tmp_path / "state.json.tmp", 0o644)
    old_umask = os.umask(0o022)
    try:
        d = fo.Daemon(make_config({"r": ["a/m1"]}), ledger=fo.Ledger(str(tmp_path / "l.jsonl")))
        d.save_state()
    finally:
        os.umask(old_umask)

    assert oct(os.stat(tmp_path / "l.jsonl").st_mode & 0o777) == "0o640"
    assert oct(os.stat(tmp_path / "state.json").st_mode & 0o777) == "0o640"
    assert not (tmp_path / "state.json.tmp").exists()
    assert msgspec.json.decode((tmp_path / "state.json").read_bytes())["version"] == 1
