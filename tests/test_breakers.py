"""Breakers in virtual time: an outage costs the first few requests, then only probes.

Defaults here: open after 3 consecutive failures, cooldown 5 s doubling per reopen
(jitter pinned to the middle of its range, so cooldowns are exact), route "r" is
a/m1 -> b/m2.
"""

from __future__ import annotations

import sys

import pytest
import trio
from conftest import ok_script
from test_engine import HUNG, respond

import failoverd as fo


def fails_until(heal_at: float) -> object:
    """a/m1 answers 500 before `heal_at` (trio time), then answers normally."""
    return lambda now: respond(500) if now < heal_at else ok_script("primary")


async def test_outage_costs_a_few_requests_then_only_probes(harness, autojump_clock):
    h = harness({"a/m1": fails_until(60.0), "b/m2": ok_script("fallback")},
                breakers=fo.BreakerConfig(cooldown_s=5.0, cooldown_max_s=300.0))
    served = []
    for i in range(40):  # a request every 3 s for 120 s
        await trio.sleep_until(3.0 * i)
        r = await h.chat()
        served.append((3.0 * i, r.status, r.headers["x-failoverd-served-by"]))
    primary = [t for t, key in h.upstreams.calls if key == "a/m1"]
    # Request 0 fails twice (one retry), request 1 opens the breaker (3 in a row),
    # then only probes: cooldowns of 5, 10, 20, 40 s; the probe at 84 s finds it healed.
    assert primary == [0.0, 0.3, 3.0, 9.0, 21.0, 42.0, 84.0, *[3.0 * i for i in range(29, 40)]]
    assert all(status == 200 for _, status, _ in served)  # service never blanked
    first_back = next(t for t, _, key in served if key == "a/m1")
    assert first_back == 84.0  # within one cooldown (40 s) of healing at 60 s
    transitions = [(b["key"], b["from"], b["to"]) for b in h.rows("breaker")
                   if b["scope"] == "model"]
    assert transitions == [("a/m1", "closed", "open")] + [
        ("a/m1", "open", "half_open"), ("a/m1", "half_open", "open")] * 3 + [
        ("a/m1", "open", "half_open"), ("a/m1", "half_open", "closed")]
    opened = [b for b in h.rows("breaker") if b["to"] == "open"]
    assert {b["scope"] for b in opened} == {"provider", "model"}
    assert opened[0]["reason"] == "3 consecutive failures"


async def test_a_hung_probe_costs_its_client_only_the_probe_hedge_delay(harness, autojump_clock,
                                                                       nursery):
    h = harness({"a/m1": HUNG, "b/m2": ok_script("fallback")},
                breakers=fo.BreakerConfig(consecutive_failures=1))
    await h.chat()  # a hangs: times out at 30 s, breaker open until 31 s
    assert [b["to"] for b in h.rows("breaker") if b["scope"] == "model"] == ["open"]
    await trio.sleep_until(40.0)
    r = await h.chat()  # a's probe at 40 s, raced against b started 1 s later
    assert (r.t_first, r.text) == (41.0, "fallback")
    assert r.headers["x-failoverd-attempts"] == "2"
    assert h.upstreams.calls[-2:] == [(40.0, "a/m1"), (41.0, "b/m2")]
    await trio.sleep_until(45.0)
    r = await h.chat()  # while the probe runs on, the slot is out: b at once
    assert (r.t_first, r.text) == (45.0, "fallback")
    assert h.outcomes()[-1:] == [("b/m2", "ok")]
    assert h.outcomes()[-2] == ("a/m1", "skipped:breaker_open")
    await trio.sleep_until(75.0)
    # The detached probe failed at its own deadline (40 + 30 s), not when its client
    # was answered, and reopened the breaker with a doubled cooldown.
    [probe] = [r for r in h.rows("attempt") if r["probe"]]
    assert (probe["outcome"], probe["latency_ms"], probe["attempt"]) == \
        ("first_token_timeout", 30000.0, 0)
    model_rows = [(b["from"], b["to"]) for b in h.rows("breaker") if b["scope"] == "model"]
    assert model_rows == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]
    assert h.d.health.breakers[("model", "a/m1")].open_until == 72.0  # 70 s + 2 s (doubled)
    assert [t for t, key in h.upstreams.calls if key == "a/m1"] == [0.0, 40.0]


async def test_retry_after_holds_the_model_out_for_exactly_that_long(harness, autojump_clock):
    h = harness({"a/m1": [respond(429, headers={"retry-after": "7"}), ok_script("a")],
                 "b/m2": ok_script("b")})
    assert (await h.chat()).text == "b"
    await trio.sleep_until(6.999)
    assert (await h.chat()).text == "b"
    await trio.sleep_until(7.0)
    assert (await h.chat()).text == "a"
    [opened, closed] = h.rows("breaker")
    assert (opened["key"], opened["to"], closed["to"]) == ("a/m1", "open", "closed")


async def test_401_isolates_every_model_on_the_credential_only(harness, autojump_clock, caplog):
    h = harness({"a/m1": respond(401), "a/m2": ok_script("a2"), "b/m2": ok_script("b")},
                routes={"r": ["a/m1", "b/m2"], "r2": ["a/m2", "b/m2"]})
    await h.chat("r")
    r = await h.chat("r2")
    assert r.text == "b"
    assert h.outcomes()[-2] == ("a/m2", "skipped:breaker_open")
    status = {(b["scope"], b["key"].split(":")[0]): b for b in h.d.status()["breakers"]}
    assert status[("credential", "a")]["state"] == "open"
    assert "HTTP 401" in status[("credential", "a")]["last_reason"]
    [warning] = [r for r in caplog.records if r.getMessage().startswith("breaker credential")]
    assert warning.levelname == "WARNING"  # one line on stderr per transition
    assert "closed -> open" in warning.getMessage()
    assert status[("provider", "b")]["state"] == "closed"
    # Isolation is long: still out after 14 minutes.
    await trio.sleep(14 * 60)
    assert (await h.chat("r2")).text == "b"


async def test_reload_with_a_new_key_clears_the_credential_isolation(
        harness, autojump_clock, tmp_path, monkeypatch):
    h = harness({"a/m1": [respond(401), ok_script("a, new key")], "b/m2": ok_script("b")})
    await h.chat()
    assert (await h.chat()).text == "b"
    config = tmp_path / "failoverd.toml"
    config.write_text(
        f'[daemon]\nledger = "{h.ledger_path}"\n'
        '[providers.a]\nbase_url = "http://a.test/v1"\napi_key_env = "A_KEY"\n'
        '[providers.b]\nbase_url = "http://b.test/v1"\n'
        '[routes.r]\nchain = ["a/m1", "b/m2"]\n')
    monkeypatch.setenv("A_KEY", "sk-a-brand-new-key-bbbb")
    assert h.d.reload(str(config)) is None  # None: reloaded
    assert (await h.chat()).text == "a, new key"
    assert h.upstreams.requests[-1].headers["authorization"] == "Bearer sk-a-brand-new-key-bbbb"


async def test_reload_with_a_bad_config_keeps_serving_the_old_one(harness, autojump_clock,
                                                                  tmp_path):
    h = harness({"a/m1": ok_script("a")})
    config = tmp_path / "failoverd.toml"
    config.write_text("[routes.r]\nchain = ['nope/m']\n")
    assert "routes.r.chain[0]" in h.d.reload(str(config))  # why it was rejected
    assert (await h.chat()).text == "a"


async def test_open_breaker_survives_a_restart(harness, autojump_clock):
    h = harness({"a/m1": respond(503), "b/m2": ok_script("b")})
    await h.chat()
    await h.chat()  # the third failure, at 0.3 s, opens a's breakers for 1 s
    assert h.d.health.blocked_until(fo.Slot("a", "m1")) == 1.3
    restarted = harness({"a/m1": ok_script("a"), "b/m2": ok_script("b")})
    assert restarted.d.health.blocked_until(fo.Slot("a", "m1")) == pytest.approx(1.3, abs=0.1)
    r = await restarted.chat()
    assert r.text == "b"
    assert restarted.upstreams.keys_called() == ["b/m2"]


async def test_every_slot_open_probes_the_soonest_to_recover(harness, autojump_clock):
    h = harness({"a/m1": [respond(429, headers={"retry-after": "20"}), ok_script("a")],
                 "b/m2": [respond(503), ok_script("b")]},
                breakers=fo.BreakerConfig(consecutive_failures=1, cooldown_s=5.0), retry_same=0)
    r = await h.chat()
    assert r.status == 502  # a is held out until 20 s, b's breaker is open until 5 s
    await trio.sleep_until(1.0)
    r = await h.chat()
    assert (r.status, r.text, r.t_first) == (200, "b", 1.0)
    assert h.outcomes()[2:] == [("a/m1", "skipped:rate_limited"), ("b/m2", "skipped:breaker_open"),
                                ("b/m2", "ok")]


async def test_slow_first_tokens_open_the_breaker(harness, autojump_clock):
    h = harness({"a/m1": ok_script("slow", first=12.0), "b/m2": ok_script("b")},
                breakers=fo.BreakerConfig(slow_call_s=10.0, min_calls=5, slow_call_rate=0.8))
    for _ in range(5):
        assert (await h.chat()).text == "slow"
    assert (await h.chat()).text == "b"
    opened = [b for b in h.rows("breaker") if b["scope"] == "model"]
    assert opened[0]["reason"] == "5 of 5 first tokens slower than 10 s"


async def test_failure_rate_over_the_window_opens_the_breaker(harness, autojump_clock):
    flaky = [respond(500), ok_script("a")]
    h = harness({"a/m1": flaky * 5, "b/m2": ok_script("b")}, retry_same=0,
                breakers=fo.BreakerConfig(consecutive_failures=100, min_calls=6, failure_rate=0.5))
    for _ in range(3):  # fail, ok, fail, ok, fail, ok: 3 of 6
        await h.chat()
        await h.chat()
    assert h.d.health.breakers[("model", "a/m1")].state == "open"
    assert [b["reason"] for b in h.rows("breaker")][0] == "3 of 6 calls failed in 60 s"


async def test_probe_that_proves_nothing_frees_the_half_open_slot(harness, autojump_clock):
    h = harness({"a/m1": [respond(503), respond(400, {"error": {"message": "bad temp"}}),
                          ok_script("a")], "b/m2": ok_script("b")},
                breakers=fo.BreakerConfig(consecutive_failures=1), retry_same=0)
    await h.chat()
    await trio.sleep_until(6.0)
    r = await h.chat()  # the probe gets a 400: no verdict on a's health
    assert r.status == 400
    assert h.d.health.breakers[("model", "a/m1")].state == "half_open"
    assert (await h.chat()).text == "a"  # the next request probes, and closes it


def test_breaker_cooldown_grows_and_caps_with_jitter():
    cfg = fo.BreakerConfig(consecutive_failures=1, cooldown_s=5, cooldown_max_s=30, jitter=0.2)
    b = fo.Breaker()
    now, cooldowns = 0.0, []
    for i in range(5):
        b.result(now, True, False, cfg, jitter=0.5, probe=i > 0)
        cooldowns.append(b.open_until - now)
        now = b.open_until
        b.poll(now)
        assert b.claim_probe()
    assert cooldowns == [5.0, 10.0, 20.0, 30.0, 30.0]
    b2 = fo.Breaker()
    b2.result(0.0, True, False, cfg, jitter=0.0)
    assert b2.open_until == pytest.approx(4.0)  # -20 %
    b3 = fo.Breaker()
    b3.result(0.0, True, False, cfg, jitter=0.999999)
    assert b3.open_until == pytest.approx(6.0)  # +20 %


async def test_alert_command_gets_each_transition_on_stdin(harness, tmp_path):
    out = tmp_path / "alerts.jsonl"
    script = f"import sys; open({str(out)!r}, 'ab').write(sys.stdin.buffer.read() + b'\\n')"
    h = harness({"a/m1": respond(401), "b/m2": ok_script()},
                breakers=fo.BreakerConfig(alert_command=[sys.executable, "-c", script]))
    with trio.fail_after(10):
        r = await h.chat()
        assert r.status == 200
        assert h.d.health.alerts_in_flight == 1  # the request did not wait for the alert
        await h.d.health.alerts_idle.wait()
    event = fo.msgspec.json.decode(out.read_bytes().splitlines()[0])
    assert (event["kind"], event["scope"], event["to"]) == ("breaker", "credential", "open")
    assert "sk-test-secret" not in out.read_text()


async def test_alert_command_gets_a_minimal_environment_and_its_stderr_is_scrubbed(
        harness, tmp_path, monkeypatch, caplog):
    """The alert command sees PATH, LANG and FAILOVERD_* facts, never the daemon's
    environment (where api_key_env keys live); what it prints is scrubbed."""
    key = "Zq9dk2LmPa0sXw8QQr7TtYu3VvBn1MmC"
    monkeypatch.setenv("XAI_API_KEY", key)
    monkeypatch.setenv("SOME_DAEMON_SETTING", "x")
    out = tmp_path / "env.json"
    script = (f"import json, os, sys; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)));"
              f"sys.stderr.write('paging failed, key ' + os.environ.get('XAI_API_KEY', {key!r}));"
              "sys.exit(3)")
    h = harness({"a/m1": respond(401), "b/m2": ok_script()},
                breakers=fo.BreakerConfig(alert_command=[sys.executable, "-c", script]))
    h.d.snap.secrets.append(key)
    with trio.fail_after(10):
        assert (await h.chat()).status == 200
        await h.d.health.alerts_idle.wait()
    env = fo.msgspec.json.decode(out.read_bytes())
    assert set(env) - {"LC_CTYPE"} == {"PATH", "LANG", "FAILOVERD_VERSION", "FAILOVERD_PID",
                                       "FAILOVERD_SOCKET", "FAILOVERD_LEDGER"}
    assert env["FAILOVERD_LEDGER"] == h.ledger_path
    assert "exited 3: paging failed, key [redacted]" in caplog.text
    assert key[:8] not in caplog.text


async def test_alert_command_that_hangs_is_killed(harness, caplog):
    h = harness({"a/m1": respond(401), "b/m2": ok_script()},
                breakers=fo.BreakerConfig(alert_command=["sleep", "60"], alert_timeout_s=0.2))
    with trio.fail_after(10):
        assert (await h.chat()).status == 200
        await h.d.health.alerts_idle.wait()
    assert "did not finish within 0.2 s" in caplog.text
