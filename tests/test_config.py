"""Config loading: SPEC section 3's example parses, every error names its key path,
keys resolve from their three sources, and `check`'s worst case holds in practice.
"""

from __future__ import annotations

import msgspec
import pytest

import failoverd as fo

EXAMPLE = """\
[daemon]
socket = "/run/failoverd/failoverd.sock"
socket_mode = "0660"
tcp = "127.0.0.1:8411"
ledger = "/var/lib/failoverd/ledger.jsonl"
client_cliff_s = 660

[providers.xai]
kind = "openai"
base_url = "https://api.x.ai/v1"
api_key_env = "XAI_API_KEY"
connect_timeout_s = 5

[providers.openrouter]
base_url = "https://openrouter.ai/api/v1"
api_key_file = "/etc/failoverd/openrouter.key"

[providers.anthropic]
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
credential = "anthropic"

[models."xai/grok-4.3"]
context_window = 256000
price_in_per_mtok = 3.0
price_out_per_mtok = 15.0

[routes.desk]
chain = ["xai/grok-4.3", "openrouter/minimax/minimax-m3", "anthropic/claude-haiku-4-5"]
first_token_timeout_s = 30
stall_timeout_s = 60
total_timeout_s = 300
"""


def config_error(text: str) -> str:
    with pytest.raises(fo.ConfigError) as e:
        fo.parse_config(text)
    return str(e.value)


def edited(old: str, new: str) -> str:
    assert old in EXAMPLE
    return EXAMPLE.replace(old, new, 1)


def test_spec_example_parses():
    cfg = fo.parse_config(EXAMPLE)

    assert cfg.daemon.tcp == "127.0.0.1:8411"
    assert cfg.daemon.client_cliff_s == 660
    assert cfg.providers["anthropic"].kind == "anthropic"
    assert cfg.providers["openrouter"].api_key_file == "/etc/failoverd/openrouter.key"
    assert cfg.models["xai/grok-4.3"].context_window == 256000
    route = fo.resolve_route(cfg, "desk", cfg.routes["desk"])
    assert (route.timing.first_token_timeout_s, route.timing.stall_timeout_s,
            route.timing.total_timeout_s) == (30, 60, 300)


def test_model_id_may_contain_slashes():
    cfg = fo.parse_config(EXAMPLE)

    route = fo.resolve_route(cfg, "desk", cfg.routes["desk"])

    assert route.slots == (fo.Slot("xai", "grok-4.3"), fo.Slot("openrouter", "minimax/minimax-m3"),
                           fo.Slot("anthropic", "claude-haiku-4-5"))
    assert route.slots[1].key == "openrouter/minimax/minimax-m3"


# (id, text in EXAMPLE, replacement, words the error must contain)
BAD_CONFIGS = [
    ("typo in a route key", "first_token_timeout_s = 30", "first_token_timeot_s = 30",
     ["routes.desk", "first_token_timeot_s"]),
    ("typo in a daemon key", 'socket_mode = "0660"', 'socket_mod = "0660"',
     ["daemon", "socket_mod"]),
    ("typo in a provider key", 'api_key_env = "XAI_API_KEY"', 'api_key_evn = "XAI_API_KEY"',
     ["providers.xai", "api_key_evn"]),
    ("typo in a section name", "[routes.desk]", "[route.desk]", ["route"]),
    ("wrong type in a route", "stall_timeout_s = 60", 'stall_timeout_s = "60s"',
     ["routes.desk.stall_timeout_s", "str"]),
    ("wrong type in the daemon", "client_cliff_s = 660", 'client_cliff_s = "soon"',
     ["daemon.client_cliff_s", "str"]),
    ("negative deadline", "first_token_timeout_s = 30", "first_token_timeout_s = -1",
     ["routes.desk.first_token_timeout_s", "> 0"]),
    ("chain is not an array", "chain = [", 'chain = "xai/grok-4.3"\nold_chain = [',
     ["routes.desk.chain", "array"]),
    ("empty chain", "chain = [", "chain = []\nold_chain = [", ["routes.desk.chain"]),
    ("provider without base_url", 'base_url = "https://openrouter.ai/api/v1"\n', "",
     ["providers.openrouter", "base_url"]),
    ("unknown provider kind", 'kind = "anthropic"', 'kind = "gemini"',
     ["providers.anthropic.kind", "openai", "anthropic"]),
    ("base_url without a scheme", '"https://api.x.ai/v1"', '"api.x.ai/v1"',
     ["providers.xai", "base_url", "http"]),
    ("two key sources", 'api_key_env = "XAI_API_KEY"',
     'api_key_env = "XAI_API_KEY"\napi_key_file = "/k"', ["providers.xai", "at most one"]),
    ("TCP listener off loopback", 'tcp = "127.0.0.1:8411"', 'tcp = "0.0.0.0:8411"',
     ["daemon", "0.0.0.0:8411", "loopback"]),
    ("chain names an undeclared provider", '"openrouter/minimax/minimax-m3"',
     '"openruoter/minimax/minimax-m3"',
     ["routes.desk.chain[1]", "openruoter", "anthropic, openrouter, xai"]),
    ("chain entry without a slash", '["xai/grok-4.3",', '["grok-4.3",',
     ["routes.desk.chain[0]", "'grok-4.3'", "PROVIDER/MODEL"]),
    ("models entry for an undeclared provider", '[models."xai/grok-4.3"]',
     '[models."xia/grok-4.3"]', ["models", "xia/grok-4.3", "PROVIDER/MODEL"]),
    ("route total at the cliff", "total_timeout_s = 300", "total_timeout_s = 660",
     ["routes.desk.total_timeout_s", "daemon.client_cliff_s = 660"]),
    ("cliff below the route total", "client_cliff_s = 660", "client_cliff_s = 200",
     ["routes.desk.total_timeout_s = 300", "daemon.client_cliff_s = 200"]),
    ("invalid TOML", "[routes.desk]", "[routes.desk", ["not valid TOML"]),
]


@pytest.mark.parametrize(("old", "new", "words"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_CONFIGS])
def test_config_error_names_the_key_path(old, new, words):
    message = config_error(edited(old, new))

    for word in words:
        assert word in message


def test_every_error_is_reported_at_once():
    text = (edited("first_token_timeout_s = 30", "first_token_timeot_s = 30")
            + '\n[routes.batch]\nchain = ["xai/grok-4.3"]\nstall_timeout_s = "long"\n')

    message = config_error(text)

    assert "routes.desk" in message
    assert "first_token_timeot_s" in message
    assert "routes.batch.stall_timeout_s" in message


def test_route_total_just_below_the_cliff_is_accepted():
    cfg = fo.parse_config(edited("total_timeout_s = 300", "total_timeout_s = 659"))

    assert cfg.routes["desk"].total_timeout_s == 659


DEFAULTS = """\
[defaults]
first_token_timeout_s = 20
stall_timeout_s = 45
retry_same = 0

[providers.a]
base_url = "http://a.test/v1"

[routes.fast]
chain = ["a/m"]
first_token_timeout_s = 10
retry_same = 1

[routes.plain]
chain = ["a/m"]
"""


def test_routes_inherit_defaults_and_their_overrides_win():
    cfg = fo.parse_config(DEFAULTS)
    fast = fo.resolve_route(cfg, "fast", cfg.routes["fast"]).timing
    plain = fo.resolve_route(cfg, "plain", cfg.routes["plain"]).timing

    assert (fast.first_token_timeout_s, fast.stall_timeout_s, fast.retry_same) == (10, 45, 1)
    assert (plain.first_token_timeout_s, plain.stall_timeout_s, plain.retry_same) == (20, 45, 0)
    assert fast.total_timeout_s == plain.total_timeout_s == fo.Timing().total_timeout_s


def test_default_total_at_the_cliff_is_rejected_for_routes_that_inherit_it():
    message = config_error(DEFAULTS.replace("retry_same = 0", "total_timeout_s = 700"))

    assert "defaults.total_timeout_s = 700: must be below daemon.client_cliff_s = 660" in message


def test_default_total_at_the_cliff_is_rejected_even_when_every_route_overrides_it():
    """A bare PROVIDER/MODEL request runs on [defaults]: its total must be below the cliff too."""
    text = (DEFAULTS.replace("retry_same = 0", "total_timeout_s = 700")
            .replace("retry_same = 1", "total_timeout_s = 100") + "total_timeout_s = 100\n")

    message = config_error(text)

    assert "defaults.total_timeout_s" in message
    assert "daemon.client_cliff_s" in message


# -- API keys ---------------------------------------------------------------------------


def provider(**source: str) -> fo.ProviderConfig:
    return fo.ProviderConfig(base_url="https://api.x.ai/v1", **source)


def test_api_key_from_environment_variable():
    key = fo.resolve_api_key("xai", provider(api_key_env="XAI_API_KEY"),
                             {"XAI_API_KEY": "xai-secret-1\n"})

    assert key == "xai-secret-1"


def test_api_key_from_key_file(tmp_path):
    (tmp_path / "xai.key").write_text("xai-secret-2\n")

    key = fo.resolve_api_key("xai", provider(api_key_file=str(tmp_path / "xai.key")), {})

    assert key == "xai-secret-2"


def test_api_key_from_systemd_credential(tmp_path):
    (tmp_path / "xai").write_text("xai-secret-3")

    key = fo.resolve_api_key("xai", provider(credential="xai"),
                             {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert key == "xai-secret-3"


def test_provider_without_a_key_source_has_no_key():
    assert fo.resolve_api_key("local", provider(), {"XAI_API_KEY": "unused"}) is None


# (id, source, env, words the error must contain)
KEY_ERRORS = [
    ("missing environment variable", {"api_key_env": "XAI_API_KEY"}, {},
     ["providers.xai.api_key_env", "XAI_API_KEY"]),
    ("empty environment variable", {"api_key_env": "XAI_API_KEY"}, {"XAI_API_KEY": ""},
     ["providers.xai.api_key_env", "XAI_API_KEY"]),
    ("credential outside systemd", {"credential": "xai"}, {},
     ["providers.xai.credential", "CREDENTIALS_DIRECTORY", "LoadCredential=xai"]),
]


@pytest.mark.parametrize(("source", "env", "words"),
                         [pytest.param(*case[1:], id=case[0]) for case in KEY_ERRORS])
def test_unresolvable_api_key_names_the_key_path(source, env, words):
    with pytest.raises(fo.ConfigError) as e:
        fo.resolve_api_key("xai", provider(**source), env)

    for word in words:
        assert word in str(e.value)


def test_missing_key_file_names_the_provider_and_the_file(tmp_path):
    path = str(tmp_path / "absent.key")

    with pytest.raises(fo.ConfigError) as e:
        fo.resolve_api_key("xai", provider(api_key_file=path), {})

    assert "providers.xai" in str(e.value)
    assert path in str(e.value)


def test_missing_credential_names_the_provider(tmp_path):
    with pytest.raises(fo.ConfigError) as e:
        fo.resolve_api_key("xai", provider(credential="xai"),
                           {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert "providers.xai" in str(e.value)
    assert str(tmp_path / "xai") in str(e.value)


# -- worst case before the first byte ----------------------------------------------------

WORST = """\
[daemon]
client_cliff_s = 660

[defaults]
first_token_timeout_s = 30
retry_same = 0
adaptive_deadlines = false

[providers.a]
base_url = "http://a.test/v1"
connect_timeout_s = 5

[providers.b]
base_url = "http://b.test/v1"
connect_timeout_s = 2

[routes.r]
chain = ["a/m1", "a/m2", "b/m3"]
"""


def worst_case(text: str, route: str = "r") -> tuple[list[tuple[str, float]], float]:
    cfg = fo.parse_config(text)
    starts, worst = fo.worst_case_first_byte(cfg, fo.resolve_route(cfg, route, cfg.routes[route]))
    return [(slot.key, start) for slot, start in starts], worst


def test_worst_case_counts_each_slots_first_token_deadline():
    """Two slots on one provider each pay in full: a slow 5xx is no timeout, so the
    provider's second slot is not skipped (see the engine scenario below). The
    first-token deadline runs from the attempt's start, so it covers connecting."""
    starts, worst = worst_case(WORST)

    assert starts == [("a/m1", 0.0), ("a/m2", 30.0), ("b/m3", 60.0)]
    assert worst == 90.0


def test_worst_case_includes_one_same_slot_retry():
    starts, worst = worst_case(WORST.replace("retry_same = 0", "retry_same = 1"))

    # Each slot may add a fast failure (2 s) and then a backoff of up to 1.5 x 0.3 s or
    # a Retry-After of up to retry_after_max_s = 3 s, before its retry's full budget.
    assert starts == [("a/m1", 0.0), ("a/m2", 35.0), ("b/m3", 70.0)]
    assert worst == 105.0


def test_worst_case_is_clipped_by_the_total_deadline():
    starts, worst = worst_case(WORST + "total_timeout_s = 50\n")

    assert starts[-1] == ("b/m3", 60.0)
    assert worst == 50.0


def test_check_report_prints_worst_case_and_cliff_margin():
    lines, _ = fo.check_report(fo.parse_config(WORST))

    assert "route r: 3 slot(s)" in lines[0]
    assert "worst case before first byte or error 90 s" in lines[0]
    assert "client cliff 660 s, margin 570 s" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["a/m1", "a/m2", "b/m3"]
    assert lines[3].endswith("starts by 60 s at the latest")


def test_check_warns_about_a_slot_unreachable_within_total_timeout():
    _, warnings = fo.check_report(fo.parse_config(WORST + "total_timeout_s = 60\n"))

    unreachable = [w for w in warnings if "is not reached" in w]
    assert len(unreachable) == 1
    assert unreachable[0].startswith("routes.r: b/m3 ")
    assert "start at 60 s" in unreachable[0]


def test_check_has_no_reachability_warning_when_every_slot_fits():
    _, warnings = fo.check_report(fo.parse_config(WORST + "total_timeout_s = 61\n"))

    assert not [w for w in warnings if "is not reached" in w]


def respond(status: int, headers: dict[str, str] | None = None) -> list:
    body = msgspec.json.encode({"error": {"message": f"status {status}", "type": "server_error"}})
    return [("respond", status, headers or {}, body)]


def ok() -> list:
    return fo.token_script(["hi"])


# Upstreams that fail as late as they can without timing out.
# (id, chain, scripts, the moment the last slot is called)
ADVERSARIAL = [
    ("each slot of one provider fails slowly without timing out", ["a/m1", "a/m2", "b/m3"],
     {"a/m1": [("sleep", 29.9), *respond(500)], "a/m2": [("sleep", 29.9), *respond(500)],
      "b/m3": ok()}, 59.8),
    ("fast 5xx, then the retry fails slowly", ["a/m1", "b/m2"],
     {"a/m1": [[("sleep", 1.9), *respond(500)], [("sleep", 29.9), *respond(500)]],
      "b/m2": ok()}, 1.9 + 0.3 + 29.9),
    # A 429 that was slow to come is not retried: it would be as slow again.
    ("late 429 with a short Retry-After is not retried", ["a/m1", "b/m2"],
     {"a/m1": [[("sleep", 29.9), *respond(429, {"retry-after": "3"})],
               [("sleep", 29.9), *respond(500)]],
      "b/m2": ok()}, 29.9),
    ("fast 429 with a short Retry-After, then the retry fails slowly", ["a/m1", "b/m2"],
     {"a/m1": [[("sleep", 1.9), *respond(429, {"retry-after": "3"})],
               [("sleep", 29.9), *respond(500)]],
      "b/m2": ok()}, 1.9 + 3 + 29.9),
]


@pytest.mark.parametrize(("chain", "scripts", "t_last"),
                         [pytest.param(*case[1:], id=case[0]) for case in ADVERSARIAL])
async def test_check_latest_start_holds_against_slow_failing_upstreams(
        harness, autojump_clock, chain, scripts, t_last):
    h = harness(scripts, routes={"r": chain}, adaptive_deadlines=False)
    reported = dict((slot.key, start) for slot, start in
                    fo.worst_case_first_byte(h.d.cfg, h.d.routes["r"])[0])

    result = await h.chat("r")

    assert result.status == 200
    t_called, key = h.upstreams.calls[-1]
    assert key == chain[-1]
    assert t_called == pytest.approx(t_last)
    assert t_called <= reported[key]


# -- every error at once, with the key it meant -------------------------------------------


def test_two_typos_in_two_sections_are_both_reported_with_the_key_meant():
    message = config_error(edited('socket_mode = "0660"', 'socket_mod = "0660"')
                           .replace("first_token_timeout_s = 30", "first_token_timeot_s = 30"))

    assert "daemon.socket_mod: unknown key; did you mean 'socket_mode'?" in message
    assert ("routes.desk.first_token_timeot_s: unknown key; did you mean "
            "'first_token_timeout_s'?") in message


def test_a_misspelt_section_suggests_the_section_meant():
    message = config_error(edited("[routes.desk]", "[route.desk]") + "[breaker]\nwindow_s = 9\n")

    assert "[route]: unknown section; did you mean 'routes'?" in message
    assert "[breaker]: unknown section; did you mean 'breakers'?" in message


def test_an_unknown_key_with_no_near_match_lists_the_keys():
    message = config_error(edited("client_cliff_s = 660", "client_cliff_s = 660\nzzz = 1"))

    assert "daemon.zzz: unknown key; expected one of " in message
    assert ", client_cliff_s, " in message


def test_every_bad_value_of_one_table_is_reported():
    message = config_error(edited("client_cliff_s = 660", 'client_cliff_s = "soon"\n'
                                  'head_timeout_s = -1\nsocket_mod = "0600"'))

    assert "Expected `float`, got `str` - at `daemon.client_cliff_s`" in message
    assert "Expected `float` > 0.0 - at `daemon.head_timeout_s`" in message
    assert "daemon.socket_mod: unknown key" in message
    assert "missing required" not in message


def test_a_rejected_provider_is_not_reported_again_as_undeclared():
    message = config_error(edited('"https://api.x.ai/v1"', '"api.x.ai/v1"'))

    assert "base_url = 'api.x.ai/v1': expected an http:// or https:// URL" in message
    assert "not declared" not in message
    assert "'xai/grok-4.3'" not in message


def test_errors_in_tables_and_across_them_come_together():
    message = config_error(edited('"openrouter/minimax/minimax-m3"', '"openruoter/minimax-m3"')
                           .replace("stall_timeout_s = 60", 'stall_timeout_s = "60s"'))

    assert "routes.desk.stall_timeout_s" in message
    assert "routes.desk.chain[1] = 'openruoter/minimax-m3': provider 'openruoter'" in message


# -- the default total follows a short cliff -----------------------------------------------


def test_a_cliff_below_the_default_total_moves_the_default_total_below_it():
    cfg = fo.parse_config('[daemon]\nclient_cliff_s = 200\n[providers.a]\nbase_url = "http://a"\n'
                          '[routes.r]\nchain = ["a/m"]\n')

    assert cfg.defaults.total_timeout_s == 180  # CLIFF_MARGIN = 10 % below the cliff
    assert fo.resolve_route(cfg, "r", cfg.routes["r"]).timing.total_timeout_s == 180


def test_a_cliff_above_the_default_total_leaves_it_alone():
    cfg = fo.parse_config("[daemon]\nclient_cliff_s = 310\n")

    assert cfg.defaults.total_timeout_s == fo.Timing().total_timeout_s


def test_an_explicit_default_total_over_the_cliff_is_still_an_error():
    message = config_error("[daemon]\nclient_cliff_s = 200\n[defaults]\ntotal_timeout_s = 250\n")

    assert "defaults.total_timeout_s = 250: must be below daemon.client_cliff_s = 200" in message


# -- the host: socket path and directories ------------------------------------------------


def test_a_relative_socket_path_is_an_error():
    message = config_error('[daemon]\nsocket = "run/failoverd.sock"\n')

    assert "daemon.socket = 'run/failoverd.sock': expected an absolute path" in message


def test_a_socket_path_over_107_bytes_is_an_error_naming_its_length():
    long = "/run/" + "x" * 122 + ".sock"  # 132 bytes: bind() would fail with no errno
    assert len(long) == 132

    message = config_error(f'[daemon]\nsocket = "{long}"\n')

    assert "132 bytes, over the 107 a Unix socket path can have" in message
    assert fo.parse_config(f'[daemon]\nsocket = "/{"x" * 106}"\n')  # 107 bytes: fine


def host_config(tmp_path, **daemon: str) -> fo.Config:
    paths = {"socket": str(tmp_path / "fo.sock"), "ledger": str(tmp_path / "ledger.jsonl"),
             **daemon}
    return fo.Config(daemon=fo.DaemonConfig(**paths))


def test_host_check_passes_when_the_directories_exist(tmp_path):
    assert fo.host_errors(host_config(tmp_path)) == []


def test_host_check_names_a_missing_socket_and_ledger_directory(tmp_path):
    cfg = host_config(tmp_path, socket=str(tmp_path / "nope" / "fo.sock"),
                      ledger=str(tmp_path / "failoverdd" / "ledger.jsonl"))

    errors = fo.host_errors(cfg)

    assert [e.split(":")[0] for e in errors] == [
        f"daemon.socket = '{tmp_path}/nope/fo.sock'",
        f"daemon.ledger = '{tmp_path}/failoverdd/ledger.jsonl'"]
    assert f"directory {tmp_path}/failoverdd does not exist; create it or fix the path" in errors[1]
    assert fo.host_errors(cfg, socket=False) == errors[1:]  # socket activation: not ours


def test_the_units_own_directories_may_be_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(fo, "SYSTEMD_DIRECTORIES", (str(tmp_path / "run"), str(tmp_path / "lib")))
    cfg = host_config(tmp_path, socket=str(tmp_path / "run" / "fo.sock"),
                      ledger=str(tmp_path / "lib" / "ledger.jsonl"))

    assert fo.host_errors(cfg) == []
    ledger = fo.Ledger(cfg.daemon.ledger)  # made as StateDirectory= would have
    ledger.close()
    assert (tmp_path / "lib").is_dir()


def test_the_ledger_never_creates_a_mistyped_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        fo.Ledger(str(tmp_path / "failoverdd" / "ledger.jsonl"))

    assert not (tmp_path / "failoverdd").exists()
