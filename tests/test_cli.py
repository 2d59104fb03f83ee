"""The command line: `check` reports worst cases and fails on bad configs or keys;
`tail` prints ledger rows, human-readable or as JSON, and survives a torn line.
"""

from __future__ import annotations

import os
import time

import msgspec
import pytest
from click.testing import CliRunner, Result

import failoverd as fo

GOOD = """\
[daemon]
ledger = "{ledger}"
client_cliff_s = 660

[defaults]
retry_same = 0
adaptive_deadlines = false

[providers.a]
base_url = "http://a.test/v1"
api_key_env = "FAILOVERD_TEST_A_KEY"
connect_timeout_s = 5

[providers.local]
base_url = "http://127.0.0.1:8080/v1"
connect_timeout_s = 2

[routes.desk]
chain = ["a/m1", "local/qwen/qwen3-8b"]
first_token_timeout_s = 30

[routes.quick]
chain = ["local/qwen/qwen3-8b"]
first_token_timeout_s = 10
"""
KEYS = {"FAILOVERD_TEST_A_KEY": "sk-cli-test-key"}
TS = "2026-01-02T03:04:05.678Z"
ROWS = [
    fo.AttemptRow(ts=TS, request_id="req1", route="desk", attempt=0, provider="a", model="m1",
                  outcome="first_token_timeout", error="no output within 30 s",
                  latency_ms=30000.0),
    fo.AttemptRow(ts=TS, request_id="req1", route="desk", attempt=1, provider="local",
                  model="qwen/qwen3-8b", outcome="ok", status=200, ttft_ms=80.0,
                  latency_ms=400.0, committed=True, tokens_in=12, tokens_out=3),
    fo.RequestRow(ts=TS, request_id="req1", route="desk", outcome="ok",
                  served_by="local/qwen/qwen3-8b", attempts=2, total_ms=30400.0, ttft_ms=30080.0,
                  status=200),
    fo.BreakerRow(ts=TS, scope="provider", key="a", from_="closed", to="open",
                  reason="first_token_timeout", open_until=TS),
]
TORN = b'{"kind":"request","ts":"2026-01-02T03:04:05.678Z","request_id":"req2","rou'


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    env = {"FAILOVERD_CONFIG": "/nonexistent/failoverd.toml", **(env or {})}
    return CliRunner().invoke(fo.cli, list(args), env=env)


@pytest.fixture
def ledger(tmp_path) -> str:
    path = str(tmp_path / "ledger.jsonl")
    writer = fo.Ledger(path)
    for row in ROWS:
        writer.write(row)
    writer.close()
    return path


@pytest.fixture
def config(tmp_path, ledger):
    """config(text=GOOD) -> path of a config file whose ledger is the `ledger` fixture."""

    def write(text: str = GOOD) -> str:
        path = tmp_path / "failoverd.toml"
        path.write_text(text.format(ledger=ledger))
        return str(path)

    return write


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# -- check --------------------------------------------------------------------------------


def test_check_prints_each_routes_worst_case_and_cliff_margin(config):
    result = run("check", "--config", config(), env=KEYS)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    desk = next(line for line in lines if line.startswith("route desk:"))
    quick = next(line for line in lines if line.startswith("route quick:"))
    # desk: a/m1 then local, 30 s each (connecting included); quick: local, 10 s.
    assert "worst case before first byte or error 60 s" in desk
    assert "client cliff 660 s, margin 600 s" in desk
    assert "worst case before first byte or error 10 s" in quick
    assert "margin 650 s" in quick
    assert lines[-1] == "config OK"


def test_check_reads_the_config_named_by_the_environment(config):
    result = run("check", env={**KEYS, "FAILOVERD_CONFIG": config()})

    assert result.exit_code == 0, result.output
    assert "route desk:" in result.stdout


def test_check_with_a_typo_exits_1_and_names_the_key_path(config):
    path = config(GOOD.replace("first_token_timeout_s = 30", "first_token_timeot_s = 30"))

    result = run("check", "--config", path, env=KEYS)

    assert result.exit_code == 1
    assert "routes.desk" in result.output
    assert "first_token_timeot_s" in result.output
    assert "config OK" not in result.output


def test_check_with_a_missing_api_key_exits_1_and_names_the_variable(config):
    result = run("check", "--config", config())

    assert result.exit_code == 1
    assert "providers.a.api_key_env" in result.output
    assert "FAILOVERD_TEST_A_KEY" in result.output
    assert "config OK" not in result.output


def test_check_no_keys_validates_without_the_credentials(config):
    result = run("check", "--config", config(), "--no-keys")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "config OK"


def test_check_without_a_readable_config_exits_1(tmp_path):
    path = str(tmp_path / "absent.toml")

    result = run("check", "--config", path)

    assert result.exit_code == 1
    assert f"cannot read config {path}" in result.output


# -- tail ---------------------------------------------------------------------------------


@pytest.fixture
def local_zone(monkeypatch):
    """A local zone one hour east of UTC (a POSIX TZ string: no tzdata needed)."""
    monkeypatch.setenv("TZ", "CET-1")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_tail_prints_one_human_readable_line_per_row_in_local_time(ledger, local_zone):
    result = run("tail", ledger)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(ROWS)
    assert all(line.startswith("2026-01-02 04:04:05.678 CET ") for line in lines)
    assert lines[3].endswith("(open until 2026-01-02 04:04:05.678 CET)")
    assert "attempt req1 desk #0 a/m1 first_token_timeout" in lines[0]
    assert "-- no output within 30 s" in lines[0]
    assert "attempt req1 desk #1 local/qwen/qwen3-8b ok status=200 ttft=80ms" in lines[1]
    assert "request req1 desk ok status=200 served_by=local/qwen/qwen3-8b attempts=2" in lines[2]
    assert "breaker provider a closed -> open -- first_token_timeout" in lines[3]


def test_tail_json_prints_the_rows_as_json_lines(ledger):
    result = run("tail", "--json", ledger)

    assert result.exit_code == 0, result.output
    printed = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert printed == [msgspec.to_builtins(row) for row in ROWS]


def test_tail_skips_a_torn_last_line(ledger):
    append(ledger, TORN)

    result = run("tail", "--json", ledger)

    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == len(ROWS)
    assert "req2" not in result.stdout


def test_tail_n_prints_the_last_rows(ledger):
    result = run("tail", "-n", "1", "--json", ledger)

    assert result.exit_code == 0, result.output
    assert [msgspec.json.decode(line) for line in result.stdout.splitlines()] == [
        msgspec.to_builtins(ROWS[-1])]


def test_tail_n_counts_rows_not_torn_lines(ledger):
    """After a crash the daemon restarts and appends: the torn line sits between rows."""
    append(ledger, TORN)
    writer = fo.Ledger(ledger)
    writer.write(ROWS[0])
    writer.close()

    result = run("tail", "-n", "2", "--json", ledger)

    assert result.exit_code == 0, result.output
    assert [msgspec.json.decode(line) for line in result.stdout.splitlines()] == [
        msgspec.to_builtins(ROWS[-1]), msgspec.to_builtins(ROWS[0])]


def test_tail_defaults_to_the_configured_ledger(config):
    result = run("tail", env={"FAILOVERD_CONFIG": config()})

    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == len(ROWS)


def test_tail_of_a_missing_ledger_exits_1(tmp_path):
    path = str(tmp_path / "absent.jsonl")

    result = run("tail", path)

    assert result.exit_code == 1
    assert f"no ledger at {path}" in result.output


class Sleeps:
    """Stands in for time.sleep in `tail -f`: each call performs the next action."""

    def __init__(self, *actions) -> None:
        self.actions = list(actions)

    def __call__(self, seconds: float) -> None:
        if not self.actions:
            raise KeyboardInterrupt  # what Ctrl-C does to `tail -f`
        self.actions.pop(0)()


def test_tail_follow_prints_appended_rows_once_complete(ledger, monkeypatch):
    line = msgspec.json.encode(ROWS[2]) + b"\n"
    monkeypatch.setattr(fo.time, "sleep", Sleeps(lambda: append(ledger, line[:20]),
                                                 lambda: append(ledger, line[20:])))

    result = run("tail", "-f", "--json", ledger)

    assert result.exit_code == 0, result.output
    printed = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert printed == [msgspec.to_builtins(row) for row in [*ROWS, ROWS[2]]]


def test_tail_follow_continues_in_the_new_file_after_rotation(ledger, monkeypatch):
    def rotate() -> None:
        os.rename(ledger, ledger + ".1")
        append(ledger, msgspec.json.encode(ROWS[3]) + b"\n")

    monkeypatch.setattr(fo.time, "sleep", Sleeps(rotate))

    result = run("tail", "-f", "--json", ledger)

    assert result.exit_code == 0, result.output
    printed = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert printed == [msgspec.to_builtins(row) for row in [*ROWS, ROWS[3]]]


def test_check_reports_host_errors_and_every_key_problem(config, tmp_path):
    text = GOOD.replace('ledger = "{ledger}"', f'ledger = "{tmp_path}/typo/ledger.jsonl"\n'
                        f'socket = "{tmp_path}/nodir/fo.sock"')

    result = run("check", "--config", config(text))

    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert [e.split(" =")[0] for e in errors] == [
        "error: daemon.socket", "error: daemon.ledger", "error: providers.a.api_key_env: "
        "environment variable FAILOVERD_TEST_A_KEY is not set; export it or use api_key_file / "
        "credential"]


def test_check_without_the_services_credentials_suggests_no_keys(config, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = config(GOOD.replace('api_key_env = "FAILOVERD_TEST_A_KEY"', 'credential = "a"'))

    result = run("check", "--config", path)

    assert result.exit_code == 1
    assert "providers.a.credential: $CREDENTIALS_DIRECTORY is not set" in result.output
    assert "run `failoverd check --no-keys`" in result.output
    assert run("check", "--config", path, "--no-keys").exit_code == 0


def test_serve_refuses_to_start_in_a_mistyped_ledger_directory(config, tmp_path):
    path = config(GOOD.replace('ledger = "{ledger}"', f'ledger = "{tmp_path}/typo/l.jsonl"'))

    result = run("serve", "--config", path, env=KEYS)

    assert result.exit_code == 1
    assert (f"cannot start:\n  daemon.ledger = '{tmp_path}/typo/l.jsonl': directory "
            in result.output)
    assert not (tmp_path / "typo").exists()
