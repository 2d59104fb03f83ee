"""failoverd: a local supervisor for LLM calls.

Agents on a host send OpenAI chat-completions requests to failoverd over a Unix
socket (HTTP/1.1, keep-alive). The request's `model` names a route: a chain of
upstream `PROVIDER/MODEL` slots. failoverd always streams from the upstream, holds
each attempt to a first-token and a stall deadline, fails over the moment a slot
hangs, stalls or errors (invisibly, until the first meaningful output has reached
the client), keeps circuit breakers per provider, model and credential, and appends
every attempt to a JSONL ledger. Config: `$FAILOVERD_CONFIG`, else
`/etc/failoverd/failoverd.toml`. Run `failoverd --help` for the commands.
"""

from __future__ import annotations

__version__ = "0.1.0"

import collections
import contextlib
import datetime as _dt
import errno
import functools
import gc
import hashlib
import hmac
import importlib.util
import logging
import math
import os
import random
import re
import resource
import secrets as _secrets
import select
import signal
import socket as _socket
import stat
import struct
import sys
import time
import types
import zlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Annotated, Any, Literal

import click
import msgspec

log = logging.getLogger("failoverd")


def _library(name: str) -> types.ModuleType:
    """`import name`, run at the module's first attribute access rather than here: the
    commands that never serve or call an upstream (tail, audit, check) do not pay for
    the network libraries: `failoverd tail` starts in about a third of the time and
    memory (bench/tail.py)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"failoverd needs the package {name!r}; reinstall failoverd")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


h11 = _library("h11")
httpcore2 = _library("httpcore2")
httpx2 = _library("httpx2")
trio = _library("trio")
# The same for the standard library's heavier modules that `tail` never needs.
difflib = _library("difflib")
email_utils = _library("email.utils")
ssl = _library("ssl")
tempfile = _library("tempfile")
tomllib = _library("tomllib")


class _NoTaskStatus:
    """trio.TASK_STATUS_IGNORED for the defaults of functions that may be started with
    nursery.start (which passes its own) or called directly: a name from trio there
    would load trio at import."""

    def started(self, value: Any = None) -> None:
        pass


TASK_STATUS_IGNORED: Any = _NoTaskStatus()

# ---------------------------------------------------------------------------
# Config
# msgspec Structs mirroring failoverd.toml (unknown keys are errors), loading with
# key paths in every error, cross-section checks, and the `check` report.
# ---------------------------------------------------------------------------

DEFAULT_CONFIG_PATH = "/etc/failoverd/failoverd.toml"

Seconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """The config cannot be used; the message names the key path and the fix."""


class DaemonConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    socket: str = "/run/failoverd/failoverd.sock"
    socket_mode: Annotated[str, msgspec.Meta(pattern=r"^0?[0-7]{3}$")] = "0660"
    tcp: str | None = None
    ledger: str = "/var/lib/failoverd/ledger.jsonl"
    client_cliff_s: Seconds = 660.0
    # 16 MiB holds a 1M-token prompt as JSON with room to spare (issue 2's default).
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    # A well-behaved client sends its head in one write; 10 s is generous even
    # for a loaded host and bounds a byte-at-a-time client.
    head_timeout_s: Seconds = 10.0
    body_timeout_s: Seconds = 60.0
    # Same as nginx's keepalive_timeout default.
    keepalive_timeout_s: Seconds = 75.0
    shutdown_grace_s: NonNegative = 30.0
    # A client that stops reading for this long is dropped (not the upstream's fault).
    client_write_timeout_s: Seconds = 30.0
    # Client connections open at once. At the cap an idle keep-alive connection is closed
    # to make room; with none idle, a new connection gets 503 (GET /healthz is answered).
    # Unset: derived from the open-file limit (see connection_cap).
    max_connections: PositiveInt | None = None
    # Load shedding: while the event loop runs later than this, a share of new
    # requests (rising with the lateness, falling slowly once it is gone) gets a fast
    # 503 with Retry-After: 1 instead of joining a queue that only grows. Streaming
    # requests are refused only past 10 times this lateness (a burst of new streams
    # costs the loop once, and their clients wait seconds for a first token anyway).
    # OpenAI SDKs retry a 503 on their own. 0 turns shedding off.
    shed_lag_s: NonNegative = 0.02
    # Breaker state and token divisors survive restarts here; default: state.json
    # beside the ledger. "" turns persistence off.
    state_file: str | None = None
    # Who may call, besides what the socket file's mode lets in: when either is set, a
    # Unix-socket peer (SO_PEERCRED) whose uid is in allow_uids, or whose primary or
    # supplementary group is in allow_gids. Anyone else gets 403. Numeric ids.
    allow_uids: list[int] | None = None
    allow_gids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.tcp is not None:
            host, _, port = self.tcp.rpartition(":")
            if not port.isdigit() or host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(
                    f"tcp = {self.tcp!r}: expected a loopback HOST:PORT such as "
                    "'127.0.0.1:8411' (failoverd has no authentication)"
                )


class ProviderConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    kind: Literal["openai", "anthropic"] = "openai"
    base_url: str
    api_key_env: str | None = None
    api_key_file: str | None = None
    credential: str | None = None
    connect_timeout_s: Seconds = 5.0
    headers: dict[str, str] = {}

    def __post_init__(self) -> None:
        sources = [s for s in (self.api_key_env, self.api_key_file, self.credential) if s]
        if len(sources) > 1:
            raise ValueError("set at most one of api_key_env, api_key_file, credential")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url = {self.base_url!r}: expected an http:// or https:// URL")


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    context_window: PositiveInt | None = None
    price_in_per_mtok: NonNegative = 0.0
    price_out_per_mtok: NonNegative = 0.0
    truncates_silently: bool = False
    # Room kept for the answer when the client sends no max_tokens.
    output_reserve: PositiveInt = 1024
    # Anthropic requires max_tokens; used when the client sends none.
    max_output_tokens: PositiveInt = 4096
    # Our own budget for this model: skip it rather than push it over its quota.
    tpm_limit: PositiveInt | None = None
    rpm_limit: PositiveInt | None = None
    # How this model can continue a partial answer (SPEC section 11): "trailing" = the
    # partial answer as a final assistant message (Anthropic; llama.cpp and other
    # OpenAI-compatible servers that really continue it), "prefix" = that message with
    # "prefix": true (DeepSeek, Mistral), "vllm" = continue_final_message. "none": it
    # is never asked to continue one.
    prefill: Literal["none", "trailing", "prefix", "vllm"] = "none"
    # Live spend cap (SPEC section 13): once the model's billed cost today (UTC), failed
    # attempts included, reaches this, its slots are skipped until UTC midnight.
    budget_usd_per_day: NonNegative | None = None
    # Pins (SPEC section 10): this model's deadlines in every route, never learned.
    first_token_timeout_s: Seconds | None = None
    stall_timeout_s: Seconds | None = None


class BreakerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """When a provider or model is taken out of rotation, and for how long."""

    consecutive_failures: PositiveInt = 3
    # Failure-rate trip: over the last window_s, with at least min_calls calls.
    window_s: Seconds = 60.0
    min_calls: PositiveInt = 5
    failure_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    # A first token later than slow_call_s is a slow call; latency is the early warning.
    slow_call_s: Seconds = 20.0
    slow_call_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    # Cooldown doubles with each reopen (cooldown_s, 2x, 4x ...) up to cooldown_max_s.
    # Short, because a probe costs its client at most probe_hedge_after_s (SPEC
    # section 9): a primary back from an outage of any length serves again within one
    # cooldown (at most 6 s with the jitter) of the next request after it recovered.
    cooldown_s: Seconds = 1.0
    cooldown_max_s: Seconds = 5.0
    jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2
    auth_isolation_s: Seconds = 900.0
    not_found_isolation_s: Seconds = 900.0
    rate_limit_default_s: Seconds = 30.0
    rate_limit_max_s: Seconds = 600.0
    # Run on every breaker transition with the event as JSON on stdin.
    alert_command: list[str] | None = None
    alert_timeout_s: Seconds = 10.0


class Timing(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Deadlines and retry rules; `[defaults]` holds them, a route may override."""

    # SPEC section 1: a hung upstream is abandoned after 30 s, not 600 s.
    first_token_timeout_s: Seconds = 30.0
    stall_timeout_s: Seconds = 60.0
    # Well below the agent runtime's ~660 s cancel cliff.
    total_timeout_s: Seconds = 300.0
    retry_same: Annotated[int, msgspec.Meta(ge=0, le=1)] = 1
    retry_backoff_s: NonNegative = 0.3
    retry_after_max_s: NonNegative = 3.0
    # Hedging (SPEC section 9), off unless one of the first two is set: start the next
    # slot when the attempt has shown no output this long after it was sent, or after
    # the model's learned first-token quantile (never below hedge_min_s). At most one
    # hedge per request, and on at most hedge_max_share of a route's requests a minute.
    hedge_after_s: Seconds | None = None
    hedge_quantile: Annotated[float, msgspec.Meta(gt=0, lt=1)] | None = None
    hedge_min_s: Seconds = 1.0
    hedge_max_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    # A half-open probe is raced against the next slot started this much later, so a
    # hung probe costs its client at most this (SPEC section 9).
    probe_hedge_after_s: NonNegative = 1.0
    # After commit, continue a broken answer on the next slot that can (SPEC section 11).
    continuation: bool = False
    # SPEC section 10: learn each model's deadlines, within these bounds. 10 s is the
    # floor below which a healthy first token is too often just a busy minute; 180 s is
    # above the 94 s first-token p99 of the slowest thinking model in the field data.
    adaptive_deadlines: bool = True
    first_token_min_s: Seconds = 10.0
    first_token_max_s: Seconds = 180.0
    stall_min_s: Seconds = 10.0
    stall_max_s: Seconds = 120.0


class RouteShadow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """[routes.NAME.shadow] (SPEC section 13): after a sampled request's reply is complete,
    a copy goes to `model` for evaluation; it never reaches the client. The budget is
    required: an unbudgeted shadow is how a team finds a surprise on its invoice."""

    model: str
    sample: Annotated[float, msgspec.Meta(ge=0, le=1)]
    budget_usd_per_day: NonNegative


class ShadowConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """[shadow]: the kill switch for every route's shadow (off unless turned on; a reload
    applies it to new requests) and how many shadow calls may run at once."""

    enabled: bool = False
    max_in_flight: PositiveInt = 4


class RouteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    chain: Annotated[list[str], msgspec.Meta(min_length=1)]
    first_token_timeout_s: Seconds | None = None
    stall_timeout_s: Seconds | None = None
    total_timeout_s: Seconds | None = None
    retry_same: Annotated[int, msgspec.Meta(ge=0, le=1)] | None = None
    retry_backoff_s: NonNegative | None = None
    retry_after_max_s: NonNegative | None = None
    hedge_after_s: Seconds | None = None
    hedge_quantile: Annotated[float, msgspec.Meta(gt=0, lt=1)] | None = None
    hedge_min_s: Seconds | None = None
    hedge_max_share: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    probe_hedge_after_s: NonNegative | None = None
    continuation: bool | None = None
    shadow: RouteShadow | None = None
    adaptive_deadlines: bool | None = None
    first_token_min_s: Seconds | None = None
    first_token_max_s: Seconds | None = None
    stall_min_s: Seconds | None = None
    stall_max_s: Seconds | None = None


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    daemon: DaemonConfig = DaemonConfig()
    defaults: Timing = Timing()
    breakers: BreakerConfig = BreakerConfig()
    providers: dict[str, ProviderConfig] = {}
    models: dict[str, ModelConfig] = {}
    routes: dict[str, RouteConfig] = {}
    shadow: ShadowConfig = ShadowConfig()


class Slot(msgspec.Struct, frozen=True):
    """One entry of a chain: `provider` is the text before the first `/`."""

    provider: str
    model: str

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model}"


class Route(msgspec.Struct, frozen=True):
    name: str
    slots: tuple[Slot, ...]
    timing: Timing
    shadow: RouteShadow | None = None


NO_MODEL = ModelConfig()


def parse_slot(entry: str) -> Slot | None:
    provider, sep, model = entry.partition("/")
    return Slot(provider, model) if sep and provider and model else None


def resolve_route(cfg: Config, name: str, rc: RouteConfig) -> Route:
    overrides = {f: getattr(rc, f) for f in Timing.__struct_fields__ if getattr(rc, f) is not None}
    timing = msgspec.structs.replace(cfg.defaults, **overrides)
    slots = tuple(s for s in map(parse_slot, rc.chain) if s is not None)
    return Route(name, slots, timing, rc.shadow)


_ENUMS = {"kind": "'openai' or 'anthropic'",
          "prefill": "'none', 'trailing', 'prefix' or 'vllm'"}


def _expected(text: str) -> str:
    """msgspec's enum errors say what was wrong, not what is allowed: add that."""
    m = re.search(r"Invalid enum value .* - at `[^`]*\.(\w+)`", text)
    return f"{text}; expected {_ENUMS[m.group(1)]}" if m and m.group(1) in _ENUMS else text


def _entry_error(where: str, err: msgspec.ValidationError) -> str:
    # msgspec's paths start at the value converted (`$.chain[0]`); name the section instead.
    text = str(err)
    if where:
        text = re.sub(r"`\$", f"`{where}", text) if "`$" in text else f"{text} - at `{where}`"
    return _expected(text)


def _unknown(where: str, key: str, known: Iterable[str]) -> str:
    """An unknown key or section, with the one it most likely meant."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(known)}"
    if not where:
        return f"[{key}]: unknown section; {hint}"
    return f"{where}.{key}: unknown key; {hint}"


def _nested(t: msgspec.inspect.Type) -> tuple[type | None, bool]:
    """The Struct a field holds, and whether it holds a table of them ([routes.NAME])."""
    if isinstance(t, msgspec.inspect.UnionType):  # `X | None`
        inner = [u for u in t.types if not isinstance(u, msgspec.inspect.NoneType)]
        t = inner[0] if len(inner) == 1 else t
    if isinstance(t, msgspec.inspect.StructType):
        return t.cls, False
    if isinstance(t, msgspec.inspect.DictType) and isinstance(t.value_type,
                                                             msgspec.inspect.StructType):
        return t.value_type.cls, True
    return None, False


def _struct_errors(value: Any, typ: type, where: str) -> tuple[list[str], Any]:
    """Every error in one table: unknown keys (with a suggestion), then each bad value,
    nested tables included; and what is left of the table that converts (None: nothing)."""
    if not isinstance(value, dict):
        try:
            msgspec.convert(value, typ)
        except msgspec.ValidationError as e:
            return [_entry_error(where, e)], None
    fields = {f.encode_name: f for f in msgspec.inspect.type_info(typ).fields}
    errors: list[str] = []
    kept: dict[str, Any] = {}
    for key, item in value.items():
        if key not in fields:
            errors.append(_unknown(where, key, fields))
            continue
        errs, item = _field_errors(item, fields[key].type, f"{where}.{key}" if where else key)
        errors += errs
        if item is not None or errs == []:
            kept[key] = item
    return _converted_rest(kept, typ, where, errors)


def _field_errors(item: Any, t: msgspec.inspect.Type, path: str) -> tuple[list[str], Any]:
    """The errors nested in one key's value (a table, or a table of tables)."""
    cls, table = _nested(t)
    if cls is None or item is None:
        return [], item
    if not table:
        return _struct_errors(item, cls, path)
    if not isinstance(item, dict):
        return [], item  # msgspec says what it expected
    errors, entries = [], {}
    for name, entry in item.items():
        errs, entries[name] = _struct_errors(entry, cls, f"{path}.{name}")
        errors += errs
    return errors, {name: entry for name, entry in entries.items() if entry is not None}


def _converted_rest(kept: dict[str, Any], typ: type, where: str,
                    errors: list[str]) -> tuple[list[str], Any]:
    """msgspec stops at its first error: set each failing key aside and try again."""
    set_aside: set[str] = set()
    while True:
        try:
            msgspec.convert(kept, typ)
            return errors, kept
        except msgspec.ValidationError as e:
            text = str(e)
            missing = re.match(r"Object missing required field `(\w+)`", text)
            if missing and missing.group(1) in set_aside:
                return errors, None  # already reported as a bad value
            errors.append(_entry_error(where, e))
            failed = re.search(r"- at `\$\.(\w+)", text)
            if failed is None or failed.group(1) not in kept:
                return errors, None  # a check across the table's keys: the table is out
            set_aside.add(failed.group(1))
            del kept[failed.group(1)]


def config_errors(cfg: Config) -> list[str]:
    """Cross-section checks msgspec cannot express, each naming its key path."""
    errors = _daemon_errors(cfg.daemon)
    declared = ", ".join(sorted(cfg.providers)) or "none"
    cliff = cfg.daemon.client_cliff_s
    if cfg.defaults.total_timeout_s >= cliff:
        # Bare PROVIDER/MODEL requests run on the defaults, whatever the routes say.
        errors.append(
            f"defaults.total_timeout_s = {cfg.defaults.total_timeout_s:g}: must be below "
            f"daemon.client_cliff_s = {cliff:g} (bare PROVIDER/MODEL requests use it)")
    for name, mc in cfg.models.items():
        slot = parse_slot(name)
        if slot is None or slot.provider not in cfg.providers:
            errors.append(
                f"models.{name!r}: expected PROVIDER/MODEL with a provider declared under "
                f"[providers] (declared: {declared})"
            )
        elif cfg.providers[slot.provider].kind == "anthropic" and cfg.models[name].prefill in (
                "prefix", "vllm"):
            errors.append(
                f"models.{name!r}.prefill = {cfg.models[name].prefill!r}: provider "
                f"{slot.provider!r} is of kind 'anthropic', whose Messages API continues a final "
                "assistant message as it is; expected 'trailing' or 'none'")
        if mc.budget_usd_per_day is not None and not _priced(mc):
            errors.append(
                f"models.{name!r}.budget_usd_per_day: set price_in_per_mtok / "
                "price_out_per_mtok too; without prices failoverd cannot count the spend")
    for name, rc in cfg.routes.items():
        for i, entry in enumerate(rc.chain):
            slot = parse_slot(entry)
            if slot is None:
                errors.append(f"routes.{name}.chain[{i}] = {entry!r}: expected PROVIDER/MODEL")
            elif slot.provider not in cfg.providers:
                errors.append(
                    f"routes.{name}.chain[{i}] = {entry!r}: provider {slot.provider!r} is not "
                    f"declared under [providers] (declared: {declared})"
                )
        errors += _shadow_errors(cfg, name, rc.shadow)
        total = rc.total_timeout_s
        if total is not None and total >= cliff:
            errors.append(
                f"routes.{name}.total_timeout_s = {total:g}: must be below "
                f"daemon.client_cliff_s = {cliff:g}, or the client's "
                "runtime cancels the turn before failoverd reports the failure"
            )
    return errors + deadline_bound_errors(cfg)


_DEADLINE_BOUNDS = (("first_token_min_s", "first_token_max_s"), ("stall_min_s", "stall_max_s"))


def _bound_at(cfg: Config, where: str, rc: RouteConfig | None, key: str) -> tuple[str, float]:
    """Where a route's (or the defaults') bound comes from, and its value."""
    own = None if rc is None else getattr(rc, key)
    return ("defaults", getattr(cfg.defaults, key)) if own is None else (where, own)


def deadline_bound_errors(cfg: Config) -> list[str]:
    """Each learned deadline's min must not exceed its max, in [defaults] and in every
    route once the route's overrides are laid over the defaults."""
    errors = []
    tables: list[tuple[str, RouteConfig | None]] = [("defaults", None)]
    tables += [(f"routes.{name}", rc) for name, rc in cfg.routes.items()]
    for where, rc in tables:
        for low_key, high_key in _DEADLINE_BOUNDS:
            (low_at, low), (high_at, high) = (_bound_at(cfg, where, rc, k)
                                              for k in (low_key, high_key))
            if low > high and where in (low_at, high_at):  # else reported under defaults
                errors.append(
                    f"{low_at}.{low_key} = {low:g} is above {high_at}.{high_key} = {high:g}: "
                    f"expected {low_key} <= {high_key}")
    return errors


def _priced(mc: ModelConfig) -> bool:
    return bool(mc.price_in_per_mtok or mc.price_out_per_mtok)


def _shadow_errors(cfg: Config, route: str, shadow: RouteShadow | None) -> list[str]:
    """A shadow names a declared PROVIDER/MODEL with prices: its budget counts dollars."""
    if shadow is None:
        return []
    where = f"routes.{route}.shadow.model = {shadow.model!r}"
    slot = parse_slot(shadow.model)
    if slot is None or slot.provider not in cfg.providers:
        return [f"{where}: expected PROVIDER/MODEL with a provider declared under [providers] "
                f"(declared: {', '.join(sorted(cfg.providers)) or 'none'})"]
    if not _priced(cfg.models.get(shadow.model, NO_MODEL)):
        return [f"{where}: set price_in_per_mtok / price_out_per_mtok under "
                f"[models.\"{shadow.model}\"]; without prices the shadow's "
                "budget_usd_per_day cannot be kept"]
    return []


# When [daemon] client_cliff_s is set below the default total deadline and [defaults]
# does not set total_timeout_s, the default total follows the cliff, this share below
# it: the client's clock started before failoverd's (its queue, connecting, sending the
# body) and the failure report must still reach it before it gives up. 10 % keeps the
# shipped defaults' shape (300 s total well below a 660 s cliff) for short cliffs too.
CLIFF_MARGIN = 0.1


# A Unix socket's path fits in sockaddr_un's 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
# The directories systemd makes for the unit (RuntimeDirectory=failoverd,
# StateDirectory=failoverd): the only ones failoverd creates itself when run without it.
SYSTEMD_DIRECTORIES = ("/run/failoverd", "/var/lib/failoverd")


def _daemon_errors(dc: DaemonConfig) -> list[str]:
    errors = []
    if dc.tcp is not None and (dc.allow_uids is not None or dc.allow_gids is not None):
        errors.append(f"daemon.tcp = {dc.tcp!r}: cannot be combined with daemon.allow_uids / "
                      "allow_gids: a TCP peer has no credentials to check, so any local user "
                      "could call; remove tcp or the allow lists")
    size = len(os.fsencode(dc.socket))
    if not os.path.isabs(dc.socket):
        errors.append(f"daemon.socket = {dc.socket!r}: expected an absolute path (a relative "
                      "one depends on the directory failoverd happens to start in)")
    elif size > MAX_SOCKET_PATH:
        errors.append(f"daemon.socket = {dc.socket!r}: {size} bytes, over the "
                      f"{MAX_SOCKET_PATH} a Unix socket path can have; use a shorter one "
                      "such as /run/failoverd/failoverd.sock")
    return errors


def host_errors(cfg: Config, *, socket: bool = True) -> list[str]:
    """What this host lacks for the config: the socket's and the ledger's directories
    (`socket=False` when the socket comes from systemd's failoverd.socket)."""
    dc = cfg.daemon
    paths = [("daemon.socket", dc.socket)] if socket else []
    paths.append(("daemon.ledger", dc.ledger))
    if dc.state_file:
        paths.append(("daemon.state_file", dc.state_file))
    errors = []
    for key, path in paths:
        directory = os.path.dirname(path)
        if not directory or os.path.isdir(directory):
            continue
        if directory in SYSTEMD_DIRECTORIES and os.path.isdir(os.path.dirname(directory)):
            continue  # systemd makes it for the unit, failoverd when run by hand
        errors.append(f"{key} = {path!r}: directory {directory} does not exist; create it "
                      "or fix the path (failoverd creates only "
                      f"{' and '.join(SYSTEMD_DIRECTORIES)}, as its systemd unit does)")
    return errors


def make_systemd_directory(directory: str) -> None:
    """Create `directory` if it is one of SYSTEMD_DIRECTORIES (as the unit would);
    any other missing directory stays missing, and opening a file in it fails."""
    if directory in SYSTEMD_DIRECTORIES and not os.path.isdir(directory):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o755)


def parse_config(text: str, source: str = "config") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    errors, kept = _struct_errors(raw, Config, "")
    cfg = msgspec.convert(kept or {}, Config)
    defaults, providers = (t if isinstance(t, dict) else {}
                           for t in (raw.get("defaults"), raw.get("providers")))
    if "total_timeout_s" not in defaults \
            and cfg.defaults.total_timeout_s >= cfg.daemon.client_cliff_s:
        total = cfg.daemon.client_cliff_s * (1 - CLIFF_MARGIN)
        cfg = msgspec.structs.replace(
            cfg, defaults=msgspec.structs.replace(cfg.defaults, total_timeout_s=total))
    # A provider set aside above is not "undeclared": say nothing more about it.
    rejected = [f"'{name}" for name in providers if name not in cfg.providers]
    errors += [e for e in config_errors(cfg) if not any(r in e for r in rejected)]
    if errors:
        raise ConfigError(f"{source}: " + "\n  ".join(["invalid config:", *errors]))
    return cfg


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(
            f"cannot read config {path}: {e.strerror}; pass --config PATH or set FAILOVERD_CONFIG"
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_config(text, path)


def _checked_key(name: str, where: str, key: str) -> str:
    """A key goes into an HTTP header: printable ASCII only. A stray newline or a
    pasted zero-width space would otherwise fail every request, key in the error."""
    if not key.isascii() or not key.isprintable() or " " in key:
        raise ConfigError(
            f"providers.{name}: the key from {where} contains spaces, control or non-ASCII "
            "characters (a second line? a pasted invisible character?); fix the key")
    return key


def resolve_api_key(name: str, p: ProviderConfig, env: Mapping[str, str]) -> str | None:
    """The provider's key, or None for keyless local servers; ConfigError if unreadable."""
    if p.api_key_env:
        key = env.get(p.api_key_env)
        if not key:
            raise ConfigError(
                f"providers.{name}.api_key_env: environment variable {p.api_key_env} is not set; "
                "export it or use api_key_file / credential"
            )
        return _checked_key(name, f"${p.api_key_env}", key.strip())
    path = p.api_key_file
    if p.credential:
        creds = env.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise ConfigError(
                f"providers.{name}.credential: $CREDENTIALS_DIRECTORY is not set; add "
                f"LoadCredential={p.credential}:/path/to/key to the systemd unit"
            )
        path = os.path.join(creds, p.credential)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return _checked_key(name, path, f.read().strip())
        except UnicodeDecodeError:
            raise ConfigError(f"providers.{name}: key file {path} is not text") from None
        except OSError as e:
            raise ConfigError(
                f"providers.{name}: cannot read key file {path}: {e.strerror}") from None
    return None


def state_file_path(daemon: DaemonConfig) -> str:
    """daemon.state_file; by default state.json beside the ledger; "" = no state file."""
    if daemon.state_file is not None:
        return daemon.state_file
    return os.path.join(os.path.dirname(daemon.ledger), "state.json") if daemon.ledger else ""


def worst_deadlines(cfg: Config, route: Route, slot: Slot, learned: DeadlineLearner | None
                    ) -> tuple[tuple[float, str], tuple[float, str]]:
    """The longest first-token and stall deadlines the slot may hold an attempt to, each
    with where it comes from: "pinned" (the model's own), "configured" (the route's, not
    adaptive), "learned" (the state file's, within the bounds) or "bound" (adaptive,
    nothing learned yet: it may grow to first_token_max_s / stall_max_s)."""
    sd = slot_deadlines(route.timing, cfg.models.get(slot.key, NO_MODEL))
    ft_pin = cfg.models.get(slot.key, NO_MODEL).first_token_timeout_s is not None
    stall_pin = cfg.models.get(slot.key, NO_MODEL).stall_timeout_s is not None
    fixed = "pinned", "configured"
    if not sd.first_token.adaptive:
        first = sd.first_token_s, fixed[not ft_pin]
    elif (w := learned and learned.worst_first_token(slot.key, sd.first_token_s,
                                                     sd.first_token)) is not None:
        first = math.ceil(w * 10) / 10, "learned"
    else:
        first = sd.first_token.high, "bound"
    if not sd.stall.adaptive:
        stall = sd.stall_s, fixed[not stall_pin]
    elif (g := learned and learned.learned_stall(slot.key)) is not None:
        stall = math.ceil(sd.stall.clamp(g) * 10) / 10, "learned"
    else:
        stall = sd.stall.high, "bound"
    return first, stall


def slot_budget(cfg: Config, route: Route, slot: Slot,
                learned: DeadlineLearner | None = None) -> float:
    """The longest one slot can hold a request before the next starts.

    Its first-token deadline (see worst_deadlines), which runs from the start of the
    attempt and so covers connecting too; where a same-slot retry is allowed, the
    retried failure was fast (at most FAST_FAILURE_S), then a backoff of up to 1.5 x
    retry_backoff_s or a Retry-After up to retry_after_max_s, then one more try.
    """
    t = route.timing
    once = worst_deadlines(cfg, route, slot, learned)[0][0]
    if t.retry_same:
        once += FAST_FAILURE_S + max(1.5 * t.retry_backoff_s, t.retry_after_max_s)
    return once


def worst_case_first_byte(cfg: Config, route: Route, learned: DeadlineLearner | None = None
                          ) -> tuple[list[tuple[Slot, float]], float]:
    """Per slot, the latest moment it can start; and the latest first byte or error.

    The worst case is every slot failing just before its deadline without timing
    out (a slow 5xx), so no provider is skipped; the total deadline clips it all.
    """
    starts, elapsed = [], 0.0
    for slot in route.slots:
        starts.append((slot, elapsed))
        elapsed += slot_budget(cfg, route, slot, learned)
    return starts, min(elapsed, route.timing.total_timeout_s)


def check_report(cfg: Config, learned: DeadlineLearner | None = None
                 ) -> tuple[list[str], list[str]]:
    """Lines describing each route's worst case, and warnings (not errors)."""
    lines, warnings = [], []
    cliff = cfg.daemon.client_cliff_s
    for name, rc in cfg.routes.items():
        route = resolve_route(cfg, name, rc)
        t = route.timing
        starts, worst = worst_case_first_byte(cfg, route, learned)
        margin = cliff - worst
        deadlines = (f"first token {t.first_token_timeout_s:g} s, stall {t.stall_timeout_s:g} s"
                     if not t.adaptive_deadlines else
                     f"adaptive: first token {t.first_token_min_s:g}-{t.first_token_max_s:g} s, "
                     f"stall {t.stall_min_s:g}-{t.stall_max_s:g} s, "
                     f"{t.first_token_timeout_s:g} s / {t.stall_timeout_s:g} s until learned")
        lines.append(
            f"route {name}: {len(route.slots)} slot(s); worst case before first byte or error "
            f"{worst:g} s ({deadlines}, total {t.total_timeout_s:g} s); client cliff {cliff:g} s, "
            f"margin {margin:g} s"
        )
        fix = ("lower first_token_max_s, pin the slow models' first_token_timeout_s"
               if t.adaptive_deadlines else "lower first_token_timeout_s")
        for slot, start in starts:
            (first, first_how), (stall, stall_how) = worst_deadlines(cfg, route, slot, learned)
            lines.append(f"    {slot.key:<40} first token {first:g} s ({first_how}), stall "
                         f"{stall:g} s ({stall_how}); starts by {start:g} s at the latest")
            if start >= t.total_timeout_s:
                warnings.append(
                    f"routes.{name}: {slot.key} is not reached if every earlier slot fails at "
                    f"its deadline (it would start at {start:g} s, total_timeout_s is "
                    f"{t.total_timeout_s:g}); {fix} or shorten the chain"
                )
        if t.continuation and all(
                cfg.models.get(s.key, NO_MODEL).prefill == "none" for s in route.slots[1:]):
            warnings.append(
                f"routes.{name}: continuation = true, but no slot after the first declares "
                "prefill, so an answer that breaks cannot be continued; set prefill under "
                "[models.\"PROVIDER/MODEL\"] for the fallbacks that can continue one")
        for slot in route.slots:
            if slot.key not in cfg.models:
                warnings.append(
                    f"routes.{name}: {slot.key} has no [models.\"{slot.key}\"] entry; "
                    "its context window and prices are unknown"
                )
    return lines, warnings


# ---------------------------------------------------------------------------
# Records
# Ledger rows (a tagged union, one JSON object per line) and the small value
# types the engine passes around.
# ---------------------------------------------------------------------------


def utc_timestamp(epoch: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds, as every ledger row's `ts`."""
    t = _dt.datetime.fromtimestamp(time.time() if epoch is None else epoch, _dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AttemptRow(msgspec.Struct, tag="attempt", tag_field="kind", kw_only=True):
    ts: str
    request_id: str
    route: str
    attempt: int
    provider: str
    model: str
    outcome: str
    skip_reason: str | None = None
    status: int | None = None
    error: str | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    max_gap_ms: float | None = None
    committed: bool = False
    tokens_in: int | None = None
    tokens_out: int | None = None
    tokens_estimated: bool = False
    cost_usd: float | None = None
    stream: bool = False
    client_pid: int | None = None
    client_uid: int | None = None
    # The deadlines that applied to this attempt (SPEC section 10).
    first_token_deadline_s: float | None = None
    stall_deadline_s: float | None = None
    hedge: bool = False  # started beside a running attempt (a hedge, or a probe's race)
    probe: bool = False  # it held a half-open breaker's probe
    continued: bool = False  # it continued an answer that broke after commit (SPEC section 11)
    # A shadow call (SPEC section 13): a copy of live request `shadow_of`, made after its
    # reply was complete; its cost_usd is real (and counted on the shadow's budget).
    shadow: bool = False
    shadow_of: str | None = None
    # On a sampled live answer and on its shadow, what `audit` needs to compare them
    # without keeping content: a digest of the answer's text keyed with a secret that
    # lives only in the daemon's memory (a plain hash of "yes" could be looked up), its
    # length in characters, and the names of the tools it called, sorted.
    answer_digest: str | None = None
    answer_chars: int | None = None
    tool_names: list[str] | None = None


class RequestRow(msgspec.Struct, tag="request", tag_field="kind", kw_only=True):
    ts: str
    request_id: str
    route: str
    outcome: Literal["ok", "error"]
    served_by: str | None
    attempts: int
    total_ms: float
    ttft_ms: float | None
    status: int
    stream: bool = False
    client_pid: int | None = None
    client_uid: int | None = None
    # What the request was held to, so that `audit` needs no config (SPEC section 12).
    # None in rows written before these fields existed.
    total_timeout_s: float | None = None
    client_cliff_s: float | None = None
    continued: bool = False  # the answer broke after commit and another model finished it


class BreakerRow(msgspec.Struct, tag="breaker", tag_field="kind", kw_only=True):
    ts: str
    scope: Literal["provider", "model", "credential", "shadow"]
    key: str
    from_: str = msgspec.field(name="from")
    to: str
    reason: str
    open_until: str | None = None


LedgerRow = AttemptRow | RequestRow | BreakerRow


class Peer(msgspec.Struct, frozen=True):
    """Who is calling: SO_PEERCRED of a Unix-socket client, None over TCP."""

    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()  # supplementary groups, read only when allow_gids is set


class Failure(Exception):
    """An attempt that did not produce a complete answer, as data for the engine."""

    def __init__(
        self,
        outcome: str,
        error: str,
        *,
        status: int | None = None,
        body: bytes = b"",
        retry_after: float | None = None,
        timeout: bool = False,
    ) -> None:
        super().__init__(error)
        self.outcome = outcome
        self.error = error
        self.status = status
        self.body = body
        self.retry_after = retry_after
        self.timeout = timeout  # a deadline fired (e.g. httpx's connect timeout)


# ---------------------------------------------------------------------------
# Policy
# Pure functions: classify an upstream reply, parse rate-limit hints, decide
# whether a slot may be retried, scrub secrets. No I/O, no clock reads.
# ---------------------------------------------------------------------------

# SPEC section 5: transient statuses that fail over at once (529 = Anthropic overloaded).
TRANSIENT_STATUSES = frozenset({408, 425, 500, 502, 503, 504, 529})
TIMEOUT_OUTCOMES = frozenset({"first_token_timeout", "stall_timeout", "total_timeout"})
# What each attempt outcome does to the slot's breakers (SPEC section 5's table).
# "failure" and "success" count in the provider and model breakers' windows; "hold"
# keeps the model out for its Retry-After; "isolate_*" takes the credential or the
# model out for a long time and alerts; "none" says nothing about the slot's health:
# the client's own fault (bad_request, client_disconnected), a prompt too large for
# the slot (context_overflow), the request's budget (total_timeout, shutdown), or an
# attempt that another one beat (hedge_lost).
BREAKER_EFFECTS: dict[str, str] = {
    "ok": "success",
    **dict.fromkeys(("connect_error", "first_token_timeout", "stall_timeout", "http_error",
                     "upstream_error_event", "protocol_error", "truncated"), "failure"),
    "rate_limited": "hold",
    "auth_error": "isolate_credential",
    "not_found": "isolate_model",
}


def breaker_effect(outcome: str) -> str:
    return BREAKER_EFFECTS.get(outcome, "none")
# A 5xx that took longer than this to arrive is a gateway timeout in disguise:
# waiting for it twice costs more than moving to the next slot.
FAST_FAILURE_S = 2.0
# How much of an upstream error body is kept (for classification and the ledger).
ERROR_BODY_LIMIT = 64 * 1024
# A 200 reply with one JSON body (a server that ignored `stream`) holds one completion:
# the longest a model writes (128k output tokens, ~0.5 MB of JSON) eight times over. A
# longer one is no answer: the attempt fails over (protocol_error) without reading on.
WHOLE_BODY_LIMIT = 4 * 1024 * 1024

_CONTEXT_OVERFLOW = re.compile(
    rb"context_length_exceeded|context length|context window|maximum context|prompt is too long"
    rb"|too many tokens|reduce the length|input is too long",
    re.IGNORECASE,
)


class _ErrorDetail(msgspec.Struct):
    message: Any = None
    type: Any = None
    code: Any = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail | str | None = None
    message: Any = None


def error_summary(body: bytes, known: Iterable[str] = ()) -> tuple[str, str]:
    """(message, code) from an OpenAI/Anthropic-style error body, else its first bytes;
    the message is scrubbed of `known` secrets before it is cut short."""
    try:
        parsed = msgspec.json.decode(body, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        text = scrubbed_prefix(body.decode("utf-8", "replace"), 200, known).strip()
        return text or "empty body", ""
    err = parsed.error
    if isinstance(err, _ErrorDetail):
        code = next((c for c in (err.code, err.type) if isinstance(c, str)), "")
        msg = err.message if isinstance(err.message, str) else code
        return scrubbed_prefix(msg or "no message", 300, known), code
    if isinstance(err, str):
        return scrubbed_prefix(err, 300, known), ""
    text = str(parsed.message or body.decode("utf-8", "replace"))
    return scrubbed_prefix(text, 300, known), ""


def classify_status(status: int, body: bytes, known: Iterable[str] = ()) -> tuple[str, str]:
    """SPEC section 5's table for a non-2xx reply: (outcome, short error)."""
    message, code = error_summary(body, known)
    error = f"HTTP {status}: {message}"
    if status == 429:
        return "rate_limited", error
    if status in (401, 402, 403):  # 402: out of credits, a credential problem
        return "auth_error", error
    if status == 404 or code == "model_not_found":
        return "not_found", error
    if status == 413 or (status in (400, 422) and _CONTEXT_OVERFLOW.search(body)):
        return "context_overflow", error
    if status in (400, 422):
        return "bad_request", error
    return "http_error", error


# A 400/422 that rejects the prefill of a continuation (SPEC section 11) names the
# final assistant message or the prefill fields. Texts seen or expected:
#   Anthropic   "messages: final assistant content cannot end with trailing whitespace"
#               "When `thinking` is enabled, a final `assistant` message must start with
#               a thinking block ..."; "This model does not support assistant message
#               prefill. The conversation must end with a user message." (wording a guess)
#   Mistral     "Expected last role User or Tool (or Assistant with prefix True) for
#               serving but got assistant"
#   DeepSeek    "The last message of deepseek-reasoner must be a user message, or an
#               assistant message with prefix mode on"
#   vLLM        "Cannot set both `continue_final_message` and `add_generation_prompt` to
#               True."; transformers' "continue_final_message is set but the final message
#               does not appear in the chat after applying the chat template!"
#   llama.cpp   "Cannot have 2 or more assistant messages at the end of the list.",
#               "Assistant response prefill is incompatible with enable_thinking."
#   OpenAI      "Unrecognized request argument supplied: continue_final_message"
#   strict servers (pydantic 422, JSON schema): "'prefix' was unexpected", loc
#               ["body", "messages", 2, "prefix"], "messages.2: ..." (the index we added)
_PREFILL_REJECTED = re.compile(
    rb"prefill|prefix|continue_final_message|add_generation_prompt"
    rb"|(?:final|last|trailing)\W{1,3}(?:assistant|message|role|turn)"
    rb"|assistant messages? at the end|trailing whitespace",
    re.IGNORECASE,
)


def prefill_rejected(status: int | None, body: bytes, index: int | None = None) -> bool:
    """Whether a continuation's 4xx refuses its prefill (the model cannot continue an
    answer in that shape), rather than the request as such. `index`: where the prefill
    sits in the messages sent (an error naming that message is about the prefill)."""
    if status not in (400, 422) or _CONTEXT_OVERFLOW.search(body):
        return False
    if _PREFILL_REJECTED.search(body):
        return True
    return index is not None and re.search(
        rb'messages(?:\[|\.|",\s*)%d(?!\d)' % index, body) is not None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float | None:
    """Go-style durations, as in x-ratelimit-reset-*: `6m0s`, `20ms`, `2d`."""
    text = text.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_retry_after(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds the upstream asks us to wait, from the usual headers; None if none."""
    if (ms := headers.get("retry-after-ms")) is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    if (ra := headers.get("retry-after")) is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            with contextlib.suppress(TypeError, ValueError):
                when = email_utils.parsedate_to_datetime(ra)
                return max(0.0, when.timestamp() - now_epoch)
    resets = [
        d
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if (v := headers.get(name)) is not None and (d := parse_duration(v)) is not None
    ]
    return max(resets) if resets else None


def rate_limit_hold(retry_after: float | None, cfg: BreakerConfig) -> float:
    """How long a 429 keeps a model out: its hint, else the default; capped."""
    wait = cfg.rate_limit_default_s if retry_after is None else retry_after
    return min(cfg.rate_limit_max_s, wait)


Transition = tuple[str, str, str, float | None]  # (from, to, reason, open_until)


class Breaker:
    """One circuit breaker, and the only code that changes one. Pure: the caller
    passes the time and the jitter draw, and does the I/O for each transition.

    closed -> open after `consecutive_failures`, or a failure or slow-call rate over
    the window; open -> half_open when the cooldown ends; half_open lets one probe
    through (`claim_probe`): its verdict closes or reopens with a doubled cooldown, and
    a probe that proves nothing hands its claim back. A hold (a 429's Retry-After)
    simply ends: open -> closed.
    """

    __slots__ = ("state", "consecutive", "window", "failures", "slow", "opens", "open_until",
                 "probing", "reason", "skip", "hold")

    def __init__(self) -> None:
        self.state = "closed"
        self.consecutive = 0
        # Calls in the sliding window as (time, failed, slow), with running counts:
        # O(1) per call however busy the slot is.
        self.window: collections.deque[tuple[float, bool, bool]] = collections.deque()
        self.failures = 0
        self.slow = 0
        self.opens = 0
        self.open_until = 0.0
        self.probing = False
        self.reason = ""
        self.skip = "breaker_open"
        self.hold = False

    def poll(self, now: float) -> Transition | None:
        """Let time pass: an expired cooldown half-opens (or a hold closes)."""
        if self.state != "open" or now < self.open_until:
            return None
        if self.hold:
            self.state, self.hold = "closed", False
            return ("open", "closed", "hold-out ended", None)
        self.state, self.probing = "half_open", False
        return ("open", "half_open", "cooldown ended; the next request probes", None)

    def view(self, now: float) -> str:
        """The state a reader should see now, without changing anything."""
        if self.state == "open" and now >= self.open_until:
            return "closed" if self.hold else "half_open"
        return self.state

    def blocks(self) -> bool:
        return self.state == "open" or (self.state == "half_open" and self.probing)

    def claim_probe(self) -> bool:
        """Take the half-open breaker's one probe; False if it is not on offer."""
        if self.state != "half_open" or self.probing:
            return False
        self.probing = True
        return True

    def release_probe(self) -> None:
        """A probe that ended without a verdict: the next request may probe."""
        if self.state == "half_open":
            self.probing = False

    def force_probe(self, reason: str) -> Transition | None:
        """Never blank: probe now, whatever is left of the cooldown."""
        old = self.state
        if old == "closed":
            return None
        self.state, self.probing = "half_open", True
        return (old, "half_open", reason, None) if old != "half_open" else None

    def restore(self, *, opens: int, reason: str, skip: str, hold: bool,
                open_until: float | None) -> None:
        """State saved before a restart; `open_until` None: it was closed."""
        self.opens, self.reason, self.skip, self.hold = opens, reason, skip, hold
        if open_until is not None:
            self.state, self.open_until, self.probing = "open", open_until, False

    def trip(self, now: float, seconds: float, reason: str, *, skip: str = "breaker_open",
             hold: bool = False) -> Transition | None:
        """Open for `seconds` (a longer open already in force wins)."""
        until = now + seconds
        if self.state == "open" and self.open_until >= until:
            return None
        old = self.state
        self.state, self.open_until, self.reason = "open", until, reason
        self.skip, self.hold, self.probing = skip, hold, False
        return (old, "open", reason, until) if old != "open" else None

    def result(self, now: float, failed: bool, slow: bool, cfg: BreakerConfig,
               jitter: float, *, probe: bool = False) -> Transition | None:
        """Record one finished call; `jitter` is uniform in [0, 1). While half-open,
        only the probe's own result (`probe`) decides."""
        self.expire(now, cfg.window_s)
        if self.state == "half_open":
            if not probe:
                return None
            self.probing = False
            if not failed:
                self.state, self.opens, self.hold = "closed", 0, False
                self.window.clear()
                self.failures = self.slow = self.consecutive = 0
                return ("half_open", "closed", "probe succeeded", None)
            return self._open(now, "probe failed", cfg, jitter)
        self.window.append((now, failed, slow))
        self.failures += failed
        self.slow += slow
        self.consecutive = self.consecutive + 1 if failed else 0
        if self.state != "closed":
            return None
        reason = self._trip_reason(cfg)
        return self._open(now, reason, cfg, jitter) if reason else None

    def expire(self, now: float, window_s: float) -> None:
        """Forget calls older than the window."""
        window = self.window
        while window and window[0][0] <= now - window_s:
            _, failed, slow = window.popleft()
            self.failures -= failed
            self.slow -= slow

    def _trip_reason(self, cfg: BreakerConfig) -> str | None:
        if self.consecutive >= cfg.consecutive_failures:
            return f"{self.consecutive} consecutive failures"
        calls = len(self.window)
        if calls < cfg.min_calls:
            return None
        failures = self.failures
        if failures / calls >= cfg.failure_rate:
            return f"{failures} of {calls} calls failed in {cfg.window_s:g} s"
        slow = self.slow
        if slow / calls >= cfg.slow_call_rate:
            return f"{slow} of {calls} first tokens slower than {cfg.slow_call_s:g} s"
        return None

    def _open(self, now: float, reason: str, cfg: BreakerConfig, jitter: float) -> Transition:
        old = self.state
        self.opens += 1
        cooldown = min(cfg.cooldown_max_s, cfg.cooldown_s * 2 ** (self.opens - 1))
        cooldown *= 1 - cfg.jitter + 2 * cfg.jitter * jitter
        self.state, self.open_until, self.reason = "open", now + cooldown, reason
        self.skip, self.hold, self.probing = "breaker_open", False, False
        self.consecutive = 0
        return (old, "open", reason, self.open_until)


def breaker_state_at(b: Breaker, now: float) -> tuple[str, float]:
    """A breaker's state at `now` (as `Breaker.view`) and until when it blocks (0 if it
    does not), read without moving it. For views (status, metrics) that change nothing."""
    state = b.view(now)
    if state == "open":
        return "open", b.open_until
    if state == "half_open" and b.state == "half_open" and b.probing:
        return "half_open", math.inf  # until the probe in flight finishes
    return state, 0.0


class Gate(msgspec.Struct, frozen=True):
    """What a slot's breakers say now: why it is blocked and until when (skip None:
    it may be tried), and whether trying it is a half-open probe."""

    skip: str | None = None
    until: float = 0.0
    probe: bool = False


def gate(breakers: Sequence[Breaker], now: float) -> Gate:
    """A slot is blocked until its last blocking breaker lets go (a half-open one being
    probed lets go soon); otherwise trying it probes every half-open breaker it has."""
    blocking = [b for b in breakers if b.blocks()]
    if blocking:
        latest = max(blocking, key=lambda b: b.open_until if b.state == "open" else now)
        return Gate(latest.skip, latest.open_until if latest.state == "open" else now)
    return Gate(probe=any(b.state == "half_open" for b in breakers))


class SlotFacts(msgspec.Struct, frozen=True):
    """What the engine knows of one slot for one request, gathered before deciding."""

    provider_timed_out: bool
    needed_tokens: int
    context_window: int | None
    min_window: int
    throttled: str | None
    gate: Gate
    over_budget: bool = False  # the model's spend today has reached its budget


def skip_reason(f: SlotFacts) -> str | None:
    """SPEC section 5's eligibility rules, in the order they are reported: a provider
    that timed out in this request, a prompt the window cannot hold (or no larger than
    one that overflowed), the day's spend budget, our own TPM/RPM budget, then the
    breakers.

    The spend budget comes after the window (a prompt no slot can hold is the client's
    to fix whatever the budgets say: it gets the 400 that makes agents compact) and
    before the per-minute quota and the breakers: it holds until UTC midnight, so it is
    the truer reason; a route whose every slot is out on it gets its 429 with the reset
    time; and a slot out of budget is never the breaker-blocked slot that the
    never-blank rule probes anyway."""
    if f.provider_timed_out:
        return "provider_timed_out"
    window = f.context_window
    if window is not None and (f.needed_tokens > window or window <= f.min_window):
        return "context_window"
    if f.over_budget:
        return "budget"
    if f.throttled is not None:
        return "rate_limited"
    return f.gate.skip


def soonest(blocked: list[tuple[float, int, Slot]]) -> Slot | None:
    """Never blank: of the slots out on a breaker, the one closest to recovery (the
    earlier in the chain on a tie)."""
    return min(blocked)[2] if blocked else None


class HedgeWindow:
    """A route's requests and hedges over the last minute, for `hedge_max_share`.
    Pure: time passed in."""

    WINDOW_S = 60.0  # SPEC section 9: "in any minute"

    __slots__ = ("requests", "hedges")

    def __init__(self) -> None:
        self.requests: collections.deque[float] = collections.deque()
        self.hedges: collections.deque[float] = collections.deque()

    def _expire(self, now: float) -> None:
        for q in (self.requests, self.hedges):
            while q and q[0] <= now - self.WINDOW_S:
                q.popleft()

    def request(self, now: float) -> None:
        self._expire(now)
        self.requests.append(now)

    def may_hedge(self, now: float, share: float) -> bool:
        """One more hedge keeps the minute's hedged share at or below `share`."""
        self._expire(now)
        return len(self.hedges) + 1 <= share * len(self.requests)

    def hedge(self, now: float) -> None:
        self.hedges.append(now)


def retry_wait(
    failure: Failure,
    *,
    elapsed: float,
    remaining: float,
    timing: Timing,
    jitter: float,
) -> float | None:
    """How long to wait before retrying the same slot once, or None to move on.

    SPEC section 5: retry only where waiting is cheaper than leaving the preferred
    model: a fast transient failure (jittered backoff) or a 429 whose Retry-After
    fits the budget. Never after a timeout, nor after a failure that was slow to
    come (it would be as slow again). `jitter` is uniform in [0, 1).
    """
    if timing.retry_same < 1 or elapsed > FAST_FAILURE_S:
        return None
    if failure.outcome == "rate_limited":
        wait = failure.retry_after
        if wait is None or wait > timing.retry_after_max_s:
            return None
    elif failure.outcome in ("http_error", "connect_error"):
        if failure.outcome == "http_error" and failure.status not in TRANSIENT_STATUSES:
            return None
        if is_timeout(failure):
            return None
        wait = timing.retry_backoff_s * (0.5 + jitter)
    else:
        return None
    # The retry must leave room for at least a first-token deadline's worth of work.
    return wait if wait + min(timing.first_token_timeout_s, 1.0) < remaining else None


# Failures after commit that leave a partial answer another model may continue: the
# stream broke. A timeout of the whole request, a client gone or a bad request did not.
CONTINUABLE_OUTCOMES = frozenset({
    "truncated", "stall_timeout", "upstream_error_event", "protocol_error"})


def continue_blocker(
    *, enabled: bool, outcome: str, committed: bool, relayed: Relayed | None, continued: bool,
) -> str | None:
    """Why a request whose attempt failed may not have its answer continued at all, or
    None when it may (SPEC section 11); slot_blocker() then says which slots can."""
    if not enabled or relayed is None:
        return "continuation is off for this route"
    if not committed:
        return "nothing was relayed yet (an ordinary failover)"
    if outcome not in CONTINUABLE_OUTCOMES:
        return f"{outcome} is not a stream that broke"
    if relayed.blocker is not None:
        return relayed.blocker
    if continued:
        return "the request was continued once already"
    return None


def slot_blocker(*, prefill: str, unable: bool) -> str | None:
    """Why a slot cannot continue an answer: its model declares no prefill, or it
    rejected one before (`unable`); None when it can."""
    if prefill == "none":
        return "the model declares no prefill"
    if unable:
        return "the model rejected a prefill before"
    return None


def next_shed_share(share: float, late: float, limit: float) -> float:
    """The share of new requests to refuse, adjusted at each lag probe: up while the
    loop runs later than the limit, by a step per limit's worth of lateness (a probe
    that is itself held up by the overload still acts in proportion), a tenth of a
    step down while it does not (a quick fall made the share swing). Refusing a share,
    not all, keeps serving at capacity; a refusal costs about a sixth of a request."""
    if not limit:
        return 0.0
    if late > limit:
        return min(SHED_MAX, share + SHED_STEP * late / limit)
    return max(0.0, share - SHED_STEP / 10)


def next_release(release: int, late: float) -> int:
    """How many waiting fallbacks the next lag probe lets start: twice as many after a
    probe that woke on time, half as many after one the loop held up."""
    if late <= FALLBACK_LAG_S:
        return min(release * 2, FALLBACK_RELEASE_MAX)
    return max(release // 2, FALLBACK_RELEASE_MIN)


def smoothed_lag(previous: float, observed: float) -> float:
    """Event-loop lag with a fast attack and a slow decay: one late wake-up counts at
    once, and the estimate halves per calm probe instead of dropping to zero."""
    return max(observed, previous / 2)


def peer_allowed(dc: DaemonConfig, peer: Peer) -> bool:
    """daemon.allow_uids / allow_gids: unset lets everyone in who can open the socket."""
    if dc.allow_uids is None and dc.allow_gids is None:
        return True
    if peer.uid is not None and peer.uid in (dc.allow_uids or ()):
        return True
    gids = dc.allow_gids or ()
    return any(g in gids for g in (peer.gid, *peer.groups) if g is not None)


def is_timeout(failure: Failure) -> bool:
    """A deadline fired (ours, or httpx's connect timeout): the provider is unresponsive."""
    return failure.timeout or failure.outcome in TIMEOUT_OUTCOMES


def failure_status(last: Failure | None) -> int:
    """HTTP status for a request whose every slot failed."""
    return 504 if last is not None and is_timeout(last) else 502


# Token estimate (SPEC section 5). The request's size is its body in bytes; English
# chat JSON runs about 4 bytes per token, code and CJK text fewer.
DIVISOR_PRIOR = 4.0
# Bounds on a learned divisor: 1.5 covers CJK and base64, 12 whitespace-heavy JSON.
DIVISOR_MIN, DIVISOR_MAX = 1.5, 12.0
# Weight of each observation; ~10 requests to move most of the way to a new ratio.
DIVISOR_ALPHA = 0.2
# Estimates are padded by 10 % so that a slightly optimistic divisor still fits.
ESTIMATE_SAFETY = 1.1
# Output tokens per character, for estimating tokens_out when usage is missing.
OUTPUT_CHARS_PER_TOKEN = 4.0


def clamp_divisor(value: float) -> float:
    return min(DIVISOR_MAX, max(DIVISOR_MIN, value))


class Estimator:
    """Per-model EMA of request bytes per prompt token. Pure: no I/O, no clock."""

    def __init__(self, divisors: Mapping[str, float] | None = None) -> None:
        self.divisors = {k: clamp_divisor(v) for k, v in (divisors or {}).items()}
        self.dirty = False

    def divisor(self, model: str) -> float:
        return self.divisors.get(model, DIVISOR_PRIOR)

    def estimate(self, model: str, size: int) -> int:
        """Prompt tokens for a request of `size` bytes, with the safety margin."""
        return math.ceil(size / self.divisor(model) * ESTIMATE_SAFETY)

    @staticmethod
    def worst_case(size: int) -> int:
        """Prompt tokens if the text were as dense as any text can be."""
        return math.ceil(size / DIVISOR_MIN)

    def observe(self, model: str, size: int, prompt_tokens: int,
                weight: float = DIVISOR_ALPHA) -> None:
        """One upstream-reported prompt size. The observation is clamped first, so a
        freak report (a cached prompt counted as 1 token) moves the EMA only a step."""
        if prompt_tokens <= 0 or size <= 0:
            return
        observed = clamp_divisor(size / prompt_tokens)
        old = self.divisor(model)
        self.divisors[model] = old + weight * (observed - old)
        self.dirty = True

    def overflowed(self, model: str, size: int, window: int | None,
                   reported: int | None) -> None:
        """The upstream said the prompt did not fit: our estimate was too low."""
        if reported is not None:
            self.observe(model, size, reported, weight=1.0)
        elif window:
            self.divisors[model] = clamp_divisor(min(self.divisor(model), 0.9 * size / window))
        else:
            self.divisors[model] = clamp_divisor(self.divisor(model) * 0.8)
        self.dirty = True


class Throttle:
    """Tokens and requests sent to each model over the last minute. Pure: time passed in."""

    WINDOW_S = 60.0  # the providers' TPM/RPM quotas are per minute

    def __init__(self) -> None:
        self.sent: dict[str, collections.deque[tuple[float, int]]] = {}
        self.tokens: dict[str, int] = {}  # the sum over `sent`, kept as it changes

    def _recent(self, model: str, now: float) -> collections.deque[tuple[float, int]]:
        entries = self.sent.get(model)
        if entries is None:
            entries = self.sent[model] = collections.deque()
            self.tokens[model] = 0
        while entries and entries[0][0] <= now - self.WINDOW_S:
            self.tokens[model] -= entries.popleft()[1]
        return entries

    def over(self, model: str, now: float, tokens: int, cfg: ModelConfig) -> str | None:
        """Why sending `tokens` more now would break the model's budget, or None."""
        if cfg.rpm_limit is None and cfg.tpm_limit is None:
            return None
        recent = self._recent(model, now)
        if cfg.rpm_limit is not None and len(recent) + 1 > cfg.rpm_limit:
            return f"{len(recent)} requests in the last minute, rpm_limit {cfg.rpm_limit}"
        used = self.tokens[model]
        if cfg.tpm_limit is not None and used + tokens > cfg.tpm_limit:
            return (f"{used} + {tokens} tokens in the last minute would pass tpm_limit "
                    f"{cfg.tpm_limit}")
        return None

    def add(self, model: str, now: float, tokens: int, cfg: ModelConfig) -> None:
        if cfg.rpm_limit is not None or cfg.tpm_limit is not None:
            self._recent(model, now).append((now, tokens))
            self.tokens[model] += tokens


def output_reserve(body: Mapping[str, Any], cfg: ModelConfig) -> int:
    """Tokens to keep free for the answer: the client's max_tokens, else the model's reserve."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return cfg.output_reserve


_REPORTED_TOKENS = (
    re.compile(r"(\d[\d,]*) in the messages"),  # OpenAI, vLLM
    re.compile(r"resulted in (\d[\d,]*) tokens"),  # OpenAI
    re.compile(r"too long: (\d[\d,]*) tokens"),  # Anthropic
    re.compile(r"prompt has (\d[\d,]*) tokens"),
)


def reported_prompt_tokens(message: str) -> int | None:
    """The prompt size an upstream's context-overflow message states, if it does."""
    for pattern in _REPORTED_TOKENS:
        m = pattern.search(message)
        if m:
            return int(m.group(1).replace(",", ""))
    return None


def truncation_suspected(prompt_tokens: int | None, window: int | None, reserve: int) -> bool:
    """SPEC section 5's tripwire: reported prompt tokens at or above window minus reserve."""
    return bool(window and prompt_tokens is not None and prompt_tokens >= window - reserve)


_SECRET_PATTERNS = re.compile(
    r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"
    r"|(x-api-key[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9._~+/=-]{8,}"
    r"|\b(sk-|sk_|xai-|gsk_|AIza)[A-Za-z0-9_-]{6,}"
)


# A run of this many characters or more that occurs in a known key is removed wherever
# it appears: what a cut at a length limit leaves of a key (its start at the end of a
# text, its end at the start of one), and the partial keys some upstreams print.
KEY_FRAGMENT = 8


def _without_fragments(text: str, secret: str) -> str:
    """`text` with every run made of `KEY_FRAGMENT`-character pieces of `secret` removed."""
    n = KEY_FRAGMENT
    if len(secret) < n or len(text) < n:
        return text
    pieces = _key_pieces(secret, n)
    spans: list[list[int]] = []
    for i in range(len(text) - n + 1):
        if text[i:i + n] in pieces:
            if spans and i <= spans[-1][1]:
                spans[-1][1] = i + n
            else:
                spans.append([i, i + n])
    if not spans:
        return text
    out, last = [], 0
    for start, end in spans:
        out += [text[last:start], "[redacted]"]
        last = end
    return "".join([*out, text[last:]])


@functools.lru_cache(maxsize=256)
def _key_pieces(secret: str, n: int) -> frozenset[str]:
    """Every n-character piece of a key (keys change only with the config)."""
    return frozenset(secret[i:i + n] for i in range(len(secret) - n + 1))


@functools.lru_cache(maxsize=64)
def _key_quads(known: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Each 4-character piece of the known keys, and the keys it is a piece of."""
    quads: dict[str, tuple[str, ...]] = {}
    for key in known:
        if len(key) >= KEY_FRAGMENT:
            for quad in _key_pieces(key, 4):
                quads[quad] = (*quads.get(quad, ()), key)
    return quads


def keys_in_pieces(text: str, known: tuple[str, ...]) -> set[str]:
    """The known keys of which `text` may hold KEY_FRAGMENT characters: any such run
    holds one of the key's 4-character pieces at a position divisible by 4, so a quarter
    of the text's positions are looked at once, not all of them once per key."""
    quads = _key_quads(known)
    found: set[str] = set()
    for i in range(0, len(text) - 3, 4):
        found.update(quads.get(text[i:i + 4], ()))
    return found


def scrub(text: str, known: Iterable[str] = ()) -> str:
    """Remove API keys, and fragments of known keys, from text bound for the ledger, a
    log line, a status page or a client."""
    known = tuple(known)
    suspects = keys_in_pieces(text, known)
    for secret in known:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "[redacted]")
            if secret in suspects:
                text = _without_fragments(text, secret)
    return _SECRET_PATTERNS.sub(
        lambda m: (m.group(1) or m.group(2) or m.group(3) or "") + "[redacted]", text
    )


def scrubbed_prefix(text: str, limit: int, known: Iterable[str] = ()) -> str:
    """At most `limit` characters of `text`, scrubbed before the cut: a key that the
    cut would halve is removed whole instead of leaving its first characters behind."""
    known = tuple(known)
    # Past the cut: the longest known key, and room for one of a known shape (sk-...).
    margin = max((len(k) for k in known), default=0) + 256
    return scrub(text[:limit + margin], known)[:limit]


def cost_usd(model: ModelConfig, tokens_in: int | None, tokens_out: int | None) -> float | None:
    if not (model.price_in_per_mtok or model.price_out_per_mtok):
        return None
    return round(
        ((tokens_in or 0) * model.price_in_per_mtok + (tokens_out or 0) * model.price_out_per_mtok)
        / 1e6,
        8,
    )


# Spend budgets (SPEC section 13) run per UTC day.
DAY_S = 86400.0


def utc_day(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.UTC).date().isoformat()


def next_utc_midnight(epoch: float) -> float:
    """When the budgets of the day `epoch` falls in reset."""
    return (math.floor(epoch / DAY_S) + 1) * DAY_S


class Spend:
    """Dollars spent per key (a model, or a route's shadow) on the current UTC day; a
    new day starts from zero. Pure: the wall time is passed in. Reads never change it
    (a reader after midnight sees 0 while the stored day is the old one)."""

    __slots__ = ("day", "spent", "dirty")

    def __init__(self, day: str = "", spent: Mapping[str, float] | None = None) -> None:
        self.day = day
        self.spent = dict(spent or {})
        self.dirty = False

    def today(self, key: str, now: float) -> float:
        return self.spent.get(key, 0.0) if utc_day(now) == self.day else 0.0

    def totals(self, now: float) -> dict[str, float]:
        return dict(self.spent) if utc_day(now) == self.day else {}

    def over(self, key: str, now: float, budget: float | None) -> bool:
        """The day's spend has reached the budget (None: no budget)."""
        return budget is not None and self.today(key, now) >= budget

    def fits(self, key: str, now: float, budget: float, usd: float) -> bool:
        """`usd` more would stay within what is left of the budget today."""
        return self.today(key, now) + usd <= budget

    def add(self, key: str, now: float, usd: float) -> str:
        """Count `usd` on today; returns the day it was counted on (see settle)."""
        day = utc_day(now)
        if day != self.day:
            self.day, self.spent = day, {}
        self.spent[key] = self.spent.get(key, 0.0) + usd
        self.dirty = True
        return day

    def settle(self, key: str, now: float, day: str, reserved: float, actual: float) -> None:
        """Replace a reservation made on `day` by the real cost; a reservation from a day
        that has ended went with that day."""
        if utc_day(now) == day == self.day:
            self.spent[key] = max(0.0, self.spent.get(key, 0.0) - reserved)
        self.add(key, now, actual)


def shadow_estimate(model: ModelConfig, prompt_tokens: int, live_tokens_out: int | None,
                    body: Mapping[str, Any]) -> float:
    """What a shadow call is expected to cost: the estimated prompt at the model's input
    price, and as output the live answer's tokens (the same prompt's answer, the best
    guess of its length), else the client's max_tokens or the model's output reserve."""
    tokens_out = live_tokens_out if live_tokens_out is not None else output_reserve(body, model)
    return cost_usd(model, prompt_tokens, tokens_out) or 0.0


def answer_fingerprint(acc: ChoiceAcc | None, key: bytes) -> dict[str, Any]:
    """An answer as the ledger may keep it (see AttemptRow.answer_digest): no content."""
    text = "".join(acc.content) if acc is not None else ""
    tools = sorted(c["function"]["name"] or "" for c in acc.tool_calls.values()) \
        if acc is not None else []
    digest = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:32]
    return {"answer_digest": digest, "answer_chars": len(text), "tool_names": tools}


# Deadlines that know each model (SPEC section 10). A model's first tokens are
# modelled as a prefill time that grows with the prompt plus a rest that does not. Per
# prompt-size band, failoverd keeps a histogram of first-token times; the band's
# median, less the smallest band's, is its prefill shift. All of the model's answers,
# less their band's shift, go into one histogram (learning the tail from every answer,
# not a fifth of them), and the first-token deadline for a prompt is its band's shift
# plus DEADLINE_MARGIN x the 99th percentile of that histogram (read as the upper edge
# of the bin holding it). The stall deadline is learned the same way from each answer's
# longest gap between outputs. Memory is fixed per model; an update is a pass over a
# few histograms of DEADLINE_BINS bins, once per attempt, never per chunk.
DEADLINE_QUANTILE = 0.99
# Twice the p99 cuts at most ~0.3 % of a lognormal tail with sigma up to 1.6 (a p90
# eight times the median), so the first-token and stall deadlines together stay under
# the issue's 0.5 % for false kills. The bin's upper edge adds up to 19 % on top.
DEADLINE_MARGIN = 2.0
# Timeouts that may be healthy answers cut short (vouched_timeouts), when more than this
# share of the answers (the issue's target for false kills), lift the deadline to
# DEADLINE_LIFT x the time they waited. 1.5 lets a model that thinks for a minute now
# and then climb past it within hours, and lets a long-tailed model's hangs lift its
# deadline at most ~1.5x above where its answers alone put it (bench/deadlines.py; 1
# would climb too slowly for the thinker, 2 made the long-tailed model swing 2x).
DEADLINE_CUT_SHARE = 0.005
DEADLINE_LIFT = 1.5
# SPEC section 10: the configured deadline applies until the model has this many
# answered attempts (and as many have taught its shift-free histogram, below).
DEADLINE_COLD_START = 20
# A prompt-size band gets its own shift once its median rests on this many answers;
# until then prompts of that size keep the configured deadline (or a smaller band's,
# if longer), and teach only that median: unshifted, a 150k-token prompt's first token
# would pass for a slow 1k-token one.
DEADLINE_BAND_MIN = 10
# Bins: four per octave (19 % wide), from 0.25 s (bin 0 also holds anything faster) to
# 1024 s (the last bin holds anything slower); far past every bound in use.
DEADLINE_BINS_PER_OCTAVE = 4
DEADLINE_BIN_FLOOR_S = 0.25
DEADLINE_BINS = 48
# The lowest timeout bin, counted from the answers' p99 bin, that can lift a deadline:
# DEADLINE_LIFT x its time must beat DEADLINE_MARGIN x the p99.
DEADLINE_LIFT_BINS = math.ceil(DEADLINE_BINS_PER_OCTAVE * math.log2(DEADLINE_MARGIN
                                                                   / DEADLINE_LIFT))
# Prompt-size bands in estimated tokens: <2k, 2k-8k, 8k-32k, 32k-128k, 128k and more. A
# band is 4x wide: a 150k-token prompt is not judged by a 1k-token prompt's clock.
DEADLINE_TOKEN_BANDS = (2_000, 8_000, 32_000, 128_000)
DEADLINE_BAND_LABELS = ("<2k", "2k-8k", "8k-32k", "32k-128k", ">=128k")
# A sample weighs half after this many later samples in its histogram or this long,
# whichever comes first: a busy model forgets by count, a quiet one by time.
DEADLINE_HALF_LIFE_ANSWERS = 1000
DEADLINE_HALF_LIFE_S = 6 * 3600.0
# Bursts. A learned deadline moves at most 10 % per update, and once it rests on
# DEADLINE_MATURE answers, at most a factor 2 per DEADLINE_DOUBLING_S (up or down). One
# slow minute is a few samples of hundreds and moves a p99 little; where it does, the
# cap keeps it from doubling a deadline, and a degraded hour moves it by up to 2x.
# bench/deadlines.py shows both.
DEADLINE_STEP = 1.1
DEADLINE_MATURE = 100
DEADLINE_DOUBLING_S = 3600.0
_LOG_STEP = math.log(DEADLINE_STEP)
_LOG2_PER_S = math.log(2) / DEADLINE_DOUBLING_S
# Bare PROVIDER/MODEL requests may name any model; no more than this many are learned.
DEADLINE_MAX_MODELS = 1000


class DeadlineBounds(msgspec.Struct, frozen=True):
    """How one kind of deadline is chosen for a slot: learned, within [low, high], when
    adaptive; else the configured value."""

    low: float
    high: float
    adaptive: bool = True

    def clamp(self, seconds: float) -> float:
        return min(self.high, max(self.low, seconds))


class SlotDeadlines(msgspec.Struct, frozen=True):
    first_token_s: float  # configured: the model's pin, else the route's
    stall_s: float
    first_token: DeadlineBounds
    stall: DeadlineBounds


def slot_deadlines(timing: Timing, model: ModelConfig) -> SlotDeadlines:
    """SPEC section 10: a model's own deadline is a pin, in every route, never learned;
    otherwise the route's applies until the model has learned its own."""
    ft_pin, stall_pin = model.first_token_timeout_s, model.stall_timeout_s
    return SlotDeadlines(
        first_token_s=timing.first_token_timeout_s if ft_pin is None else ft_pin,
        stall_s=timing.stall_timeout_s if stall_pin is None else stall_pin,
        first_token=DeadlineBounds(timing.first_token_min_s, timing.first_token_max_s,
                                   timing.adaptive_deadlines and ft_pin is None),
        stall=DeadlineBounds(timing.stall_min_s, timing.stall_max_s,
                             timing.adaptive_deadlines and stall_pin is None),
    )


def token_band(est_tokens: int) -> int:
    band = 0
    for edge in DEADLINE_TOKEN_BANDS:
        if est_tokens < edge:
            break
        band += 1
    return band


def deadline_bin(seconds: float) -> int:
    if seconds <= DEADLINE_BIN_FLOOR_S:
        return 0
    i = math.floor(DEADLINE_BINS_PER_OCTAVE * math.log2(seconds / DEADLINE_BIN_FLOOR_S))
    return i if i < DEADLINE_BINS else DEADLINE_BINS - 1


def bin_upper_s(i: int) -> float:
    return DEADLINE_BIN_FLOOR_S * 2 ** ((i + 1) / DEADLINE_BINS_PER_OCTAVE)


def quantile_bin(weights: list[float], q: float, total: float | None = None) -> int | None:
    """The bin holding the q-quantile of a histogram (the lowest bin with no more than
    1 - q of the weight above it); None if it is empty. Read from the top: a p99 is a
    few bins down."""
    total = sum(weights) if total is None else total
    if total <= 0:
        return None
    above, allowed = 0.0, (1 - q) * total
    for i in range(len(weights) - 1, -1, -1):
        above += weights[i]
        if above > allowed:
            return i
    return 0


def vouched_timeouts(answers: list[float], timeouts: list[float], floor: int = 0,
                     top: int = DEADLINE_BINS - 1) -> Iterator[tuple[int, float]]:
    """(bin, weight) of the timeouts that may have been healthy answers cut short, from
    the top bin down to `floor`.

    A timeout after waiting w says only that no answer came within w: a hang, or a
    healthy answer cut short. The answered tail tells which is plausible: a healthy
    tail that reaches w has answers just below it, and one falling no slower than 1/t
    puts no more beyond w than in the octave up to w. So a timeout bin counts as many
    timeouts as there are answers in the octave up to it, each answer vouching for one
    timeout at most. `top`: no timeout above this bin.
    """
    n = DEADLINE_BINS_PER_OCTAVE
    spare = list(answers)
    for j in range(top, floor - 1, -1):
        if timeouts[j] <= 0:
            continue
        lo = max(0, j - n + 1)
        near = sum(spare[lo:j + 1])
        take = min(timeouts[j], near)
        if take > 0:
            for i in range(lo, j + 1):
                spare[i] *= 1 - take / near
            yield j, take


def lift_bin(answers: list[float], timeouts: list[float], total: float, floor: int,
             top: int = DEADLINE_BINS - 1) -> int | None:
    """The highest bin (not below `floor`) at or above which the vouched timeouts are
    more than DEADLINE_CUT_SHARE of the answers: a deadline there cuts too many."""
    vouched = 0.0
    for j, weight in vouched_timeouts(answers, timeouts, floor, top):
        vouched += weight
        if vouched > DEADLINE_CUT_SHARE * total:
            return j
    return None


def settled(configured_s: float, learned_s: float, answers: int) -> float:
    """A learned deadline shorter than the configured one takes over gradually: from
    the cold start to DEADLINE_MATURE answers it moves from the configured value to the
    learned one (geometrically). A p99 of 20 answers is their maximum, and a model that
    thinks for a minute now and then may not have shown it yet. A longer one applies
    at once."""
    if learned_s >= configured_s:
        return learned_s
    share = (answers - DEADLINE_COLD_START) / (DEADLINE_MATURE - DEADLINE_COLD_START)
    share = min(1.0, max(0.0, share))
    return configured_s ** (1 - share) * learned_s ** share


class Histogram:
    """Decayed counts of durations in log-spaced bins, and the bin holding their
    q-quantile, kept up to date as samples come (a streaming quantile). Pure: the
    caller passes the time.

    Decay is lazy: instead of shrinking every bin at each update, the weight a new
    sample gets (`unit`) grows by the decay factor, and the bins are scaled back down
    only when it gets large. Quantiles and shares are ratios, so both read the same.
    """

    __slots__ = ("q", "n", "answers", "total", "unit", "at", "qbin", "above")

    def __init__(self, q: float) -> None:
        self.q = q
        self.n = 0  # samples ever (not decayed): the cold start counts these
        self.answers = [0.0] * DEADLINE_BINS
        self.total = 0.0
        self.unit = 1.0  # the weight of a sample added now
        self.at: float | None = None  # last update
        self.qbin = 0  # the lowest bin with no more than 1 - q of the weight above it
        self.above = 0.0  # the weight above qbin

    def _decay(self, now: float, samples: int) -> None:
        last, self.at = self.at, now
        if last is not None:
            halvings = (samples / DEADLINE_HALF_LIFE_ANSWERS
                        + max(0.0, now - last) / DEADLINE_HALF_LIFE_S)
            self.unit *= 2.0 ** (halvings if halvings < 200 else 200)  # 2^-200: forgotten
            if self.unit > 1e12:
                self._rescale(1 / self.unit)

    def _rescale(self, f: float) -> None:
        self.answers = [w * f for w in self.answers]
        self.total = sum(self.answers)
        self.unit *= f
        self.above = sum(self.answers[self.qbin + 1:])

    def add(self, seconds: float, now: float) -> None:
        self._decay(now, 1)
        i, unit = deadline_bin(seconds), self.unit
        self.answers[i] += unit
        self.total += unit
        self.n += 1
        if i > self.qbin:
            self.above += unit
        allowed = (1 - self.q) * self.total
        while self.above > allowed and self.qbin < DEADLINE_BINS - 1:
            self.qbin += 1
            self.above -= self.answers[self.qbin]
        while self.qbin > 0 and self.above + self.answers[self.qbin] <= allowed:
            self.above += self.answers[self.qbin]
            self.qbin -= 1

    def quantile_s(self, q: float | None = None) -> float | None:
        """The q-quantile (default: the one it tracks), interpolated within its bin (log
        scale); None if empty."""
        if self.total <= 0:
            return None
        if q is None or q == self.q:
            q, i = self.q, self.qbin
            below = self.total - self.above - self.answers[i]
        else:
            found = quantile_bin(self.answers, q, self.total)
            if found is None:
                return None
            i, below = found, sum(self.answers[:found])
        w = self.answers[i]
        lo, hi = bin_upper_s(i - 1), bin_upper_s(i)
        share = (q * self.total - below) / w if w > 0 else 1.0
        return lo * (hi / lo) ** min(1.0, max(0.0, share))


class LearnedDeadline(Histogram):
    """A histogram of answers, one of timeouts, and the deadline learned from them.

    Censoring. A timeout is a censored observation, "at least w", kept by the time
    waited. Counting every timeout as an answer at w would let a model that hangs push
    its deadline up a margin at a time, to the bound, and its hangs would be caught no
    faster than with a fixed deadline. Ignoring timeouts would let a deadline that cuts
    healthy slow answers (a thinking model's) learn only from the faster answers it let
    through, and settle below them for good. Counting one as anything shorter than w
    would teach a hanging model a shorter deadline. So timeouts count only as far as
    the answered tail vouches for them (vouched_timeouts), and only when those are more
    than DEADLINE_CUT_SHARE of the attempts: then they lift the deadline to
    DEADLINE_LIFT x the time they waited. A model whose answers all come far below its
    deadline, as a fast model's do, gains nothing from its hangs; a long-tailed one can
    lift its deadline only as far as its answers reach. A timeout never lowers one.
    """

    __slots__ = ("timeouts", "timeouts_total", "timeouts_top", "learned", "moved")

    def __init__(self) -> None:
        super().__init__(DEADLINE_QUANTILE)
        self.timeouts = [0.0] * DEADLINE_BINS
        self.timeouts_total = 0.0
        self.timeouts_top = -1  # the highest bin holding a timeout
        self.learned: float | None = None  # raw: the caller clamps to its bounds
        self.moved: float | None = None  # last move of `learned` (rate cap)

    def _rescale(self, f: float) -> None:
        super()._rescale(f)
        self.timeouts = [w * f for w in self.timeouts]
        self.timeouts_total = sum(self.timeouts)

    def answer(self, seconds: float, now: float) -> None:
        self.add(seconds, now)
        self._learn(now, may_fall=True)

    def timeout(self, waited: float, now: float) -> None:
        self._decay(now, 0)
        i = deadline_bin(waited)
        self.timeouts[i] += self.unit
        self.timeouts_total += self.unit
        self.timeouts_top = max(self.timeouts_top, i)
        self._learn(now, may_fall=False)

    def _learn(self, now: float, *, may_fall: bool) -> None:
        if self.n < DEADLINE_COLD_START:
            return
        target = DEADLINE_MARGIN * bin_upper_s(self.qbin)
        # Vouched timeouts are at most all timeouts: often too few to look at.
        floor = self.qbin + DEADLINE_LIFT_BINS
        if self.timeouts_top >= floor and self.timeouts_total > DEADLINE_CUT_SHARE * self.total:
            lift = lift_bin(self.answers, self.timeouts, self.total, floor, self.timeouts_top)
            if lift is not None:
                target = max(target, DEADLINE_LIFT * bin_upper_s(lift))
        if self.learned is None or self.moved is None:
            self.learned, self.moved = target, now
            return
        step = _LOG_STEP
        if self.n >= DEADLINE_MATURE:
            step = min(step, _LOG2_PER_S * max(0.0, now - self.moved))
        change = math.log(target / self.learned)
        change = step if change > step else change if change > -step else -step
        if change > 0 or may_fall:
            self.learned *= math.exp(change)
        self.moved = now

    def snapshot(self) -> dict[str, Any]:
        counted = sum(w for _, w in vouched_timeouts(self.answers, self.timeouts))
        weight = self.total + counted
        return {"answered": self.n,
                "p99_s": round(bin_upper_s(self.qbin), 2) if self.total > 0 else None,
                "learned_s": None if self.learned is None else round(self.learned, 2),
                "timeouts_counted": round(counted / weight, 4) if weight else 0.0}


class ModelDeadlines:
    """What failoverd has learned about one model's deadlines."""

    __slots__ = ("answered", "sizes", "medians", "first_token", "stall",
                 "first_token_timeouts", "stall_timeouts", "shifts", "raw")

    def __init__(self) -> None:
        bands = len(DEADLINE_BAND_LABELS)
        self.answered = 0
        self.sizes = [Histogram(0.5) for _ in range(bands)]  # first tokens by size
        # Per size band, its median first token; None while it rests on fewer than
        # DEADLINE_BAND_MIN answers.
        self.medians: list[float | None] = [None] * bands
        self.first_token = LearnedDeadline()  # first tokens less their band's shift
        self.stall = LearnedDeadline()
        self.first_token_timeouts = 0
        self.stall_timeouts = 0
        # Kept by refresh(). Per size band, its prefill shift: how much later its median
        # first token comes than the smallest band's with a median, never less than a
        # smaller band's; None for a band without a median yet.
        self.shifts: list[float | None] = [None] * bands
        # Per size band: its shift plus the learned deadline, from the largest band up to
        # it that has a median, and whether that is the band itself; None: none has.
        self.raw: list[tuple[float, bool] | None] = [None] * bands

    def refresh(self) -> None:
        learned, ref, shift = self.first_token.learned, None, 0.0
        best: tuple[float, bool] | None = None
        shifts: list[float | None] = []
        raw: list[tuple[float, bool] | None] = []
        for median in self.medians:
            if median is None:
                shifts.append(None)
                raw.append(None if best is None else (best[0], False))
                continue
            if ref is None:
                ref = median
            elif median - ref > shift:
                shift = median - ref
            shifts.append(shift)
            best = None if learned is None else (shift + learned, True)
            raw.append(best)
        self.shifts, self.raw = shifts, raw

    def answer(self, ttft_s: float, band: int, now: float) -> None:
        self.answered += 1
        shift = self.shifts[band]
        h = self.sizes[band]
        h.add(ttft_s, now)
        if h.n >= DEADLINE_BAND_MIN:
            self.medians[band] = h.quantile_s()
        if shift is not None:  # else this size teaches only its median, for now
            self.first_token.answer(ttft_s - shift if ttft_s > shift else 0.0, now)
        self.refresh()

    def first_token_timeout(self, waited_s: float, band: int, now: float) -> None:
        self.first_token_timeouts += 1
        shift = self.shifts[band]
        if shift is not None:
            self.first_token.timeout(waited_s - shift if waited_s > shift else 0.0, now)
            self.refresh()

    def first_token_s(self, band: int, configured_s: float,
                      bounds: DeadlineBounds) -> float | None:
        """The learned first-token deadline for a prompt-size band; None while cold.
        Never shorter than a smaller prompt's (shifts only grow with size); a band
        without a median of its own yet keeps the configured deadline if longer."""
        raw = self.raw[band]
        if self.answered < DEADLINE_COLD_START or raw is None:
            return None
        value, own = bounds.clamp(raw[0]), raw[1]
        if not own:
            return max(configured_s, value)
        return settled(configured_s, value, self.answered)

    def snapshot(self) -> dict[str, Any]:
        sizes = [{"tokens": label, "answered": h.n,
                  "median_s": None if median is None else round(median, 2),
                  "shift_s": None if shift is None else round(shift, 2)}
                 for label, h, median, shift in zip(DEADLINE_BAND_LABELS, self.sizes,
                                                    self.medians, self.shifts, strict=True)
                 if h.n]
        return {
            "answered": self.answered, "cold": self.answered < DEADLINE_COLD_START,
            "first_token": {**self.first_token.snapshot(), "by_size": sizes},
            "stall": self.stall.snapshot(),
            "timeouts": {"first_token": self.first_token_timeouts, "stall": self.stall_timeouts},
        }


class SavedDeadlineBand(msgspec.Struct, kw_only=True):
    """One histogram in the state file (a size band's, or a learned deadline's)."""

    n: int = 0
    age_s: float | None = None  # since the last update, when saved
    answers: dict[int, float] = {}  # bin -> weight; empty bins left out
    timeouts: dict[int, float] = {}
    learned: float | None = None
    moved_age_s: float | None = None


class SavedModelDeadlines(msgspec.Struct, kw_only=True):
    """One model's learned deadlines in the state file."""

    answered: int = 0
    sizes: list[SavedDeadlineBand] = []
    first_token: SavedDeadlineBand = msgspec.field(default_factory=SavedDeadlineBand)
    stall: SavedDeadlineBand = msgspec.field(default_factory=SavedDeadlineBand)
    first_token_timeouts: int = 0
    stall_timeouts: int = 0


def _sparse(weights: list[float], unit: float) -> dict[int, float]:
    """Weights in samples (the latest weighs 1); empty bins left out."""
    return {i: round(w / unit, 4) for i, w in enumerate(weights) if w / unit >= 1e-4}


def _age(t: float | None, now: float) -> float | None:
    return None if t is None else max(0.0, now - t)


def _saved_band(h: Histogram, now: float) -> SavedDeadlineBand:
    saved = SavedDeadlineBand(n=h.n, age_s=_age(h.at, now), answers=_sparse(h.answers, h.unit))
    if isinstance(h, LearnedDeadline):
        saved.timeouts, saved.learned = _sparse(h.timeouts, h.unit), h.learned
        saved.moved_age_s = _age(h.moved, now)
    return saved


def _finite(x: float | None, low: float = 0.0) -> bool:
    return x is None or (math.isfinite(x) and x >= low)


def _restore_band(h: Histogram, s: SavedDeadlineBand, now: float) -> bool:
    """Fill `h` from the state file; False if the entry does not fit."""
    weights = [*s.answers.items(), *s.timeouts.items()]
    if s.n < 0 or not all(0 <= i < DEADLINE_BINS and _finite(w) for i, w in weights) or not (
            _finite(s.learned, 1e-3) and _finite(s.age_s) and _finite(s.moved_age_s)):
        return False
    h.n = s.n
    h.at = None if s.age_s is None else now - s.age_s
    for i, w in s.answers.items():
        h.answers[i] = w
    h.total = sum(h.answers)
    h.qbin = quantile_bin(h.answers, h.q, h.total) or 0
    h.above = sum(h.answers[h.qbin + 1:])
    if isinstance(h, LearnedDeadline):
        for i, w in s.timeouts.items():
            h.timeouts[i] = w
        h.timeouts_total = sum(h.timeouts)
        h.timeouts_top = max(s.timeouts, default=-1)
        h.learned = s.learned
        h.moved = None if s.moved_age_s is None else now - s.moved_age_s
    return True


def _restored_model(s: SavedModelDeadlines, now: float) -> ModelDeadlines | None:
    state = ModelDeadlines()
    parts = list(zip(state.sizes, s.sizes, strict=False))
    parts += [(state.first_token, s.first_token), (state.stall, s.stall)]
    if len(s.sizes) != len(state.sizes) or not all(_restore_band(h, b, now) for h, b in parts):
        return None
    state.answered = max(0, s.answered)
    state.medians = [h.quantile_s() if h.n >= DEADLINE_BAND_MIN else None for h in state.sizes]
    state.refresh()
    state.first_token_timeouts = max(0, s.first_token_timeouts)
    state.stall_timeouts = max(0, s.stall_timeouts)
    return state


class DeadlineLearner:
    """Per-model first-token and stall deadlines learned from answered attempts (SPEC
    section 10). Pure: no I/O, no clock; every `now` is the caller's monotonic clock
    (the daemon's trio clock), and saved state stores ages, not times."""

    def __init__(self, models: dict[str, ModelDeadlines] | None = None) -> None:
        self.models: dict[str, ModelDeadlines] = dict(models or {})
        self.dirty = False  # changed since the state file was written

    def _state(self, model: str) -> ModelDeadlines | None:
        state = self.models.get(model)
        if state is None and len(self.models) < DEADLINE_MAX_MODELS:
            state = self.models[model] = ModelDeadlines()
        return state

    # -- what applies --------------------------------------------------------------

    def first_token_deadline(self, model: str, est_tokens: int, configured_s: float,
                             bounds: DeadlineBounds, remaining_s: float) -> float:
        """Seconds from sending the request to the first meaningful output."""
        value = configured_s
        state = self.models.get(model)
        if bounds.adaptive and state is not None:
            learned = state.first_token_s(token_band(est_tokens), configured_s, bounds)
            value = value if learned is None else learned
        return max(0.0, min(value, remaining_s))

    def stall_deadline(self, model: str, configured_s: float, bounds: DeadlineBounds,
                       remaining_s: float) -> float:
        """The longest gap allowed between meaningful outputs."""
        value = configured_s
        state = self.models.get(model)
        if bounds.adaptive and state is not None and state.stall.learned is not None:
            value = settled(configured_s, bounds.clamp(state.stall.learned), state.stall.n)
        return max(0.0, min(value, remaining_s))

    def worst_first_token(self, model: str, configured_s: float,
                          bounds: DeadlineBounds) -> float | None:
        """The longest first-token deadline any prompt size gets now; None while the
        model has learned nothing (then only the bounds say how long it may grow)."""
        state = self.models.get(model)
        if state is None:
            return None
        per_band = [state.first_token_s(band, configured_s, bounds)
                    for band in range(len(DEADLINE_BAND_LABELS))]
        if all(v is None for v in per_band):
            return None
        return max(configured_s if v is None else v for v in per_band)

    def first_token_quantile(self, model: str, est_tokens: int, q: float) -> float | None:
        """The q-quantile of the model's first tokens for a prompt of this size: its size's
        shift plus the q-quantile of the shift-free answers (SPEC section 9's
        hedge_quantile). None while the model is cold or no size up to this one has a
        median yet. Answers only: a hedge is started early, it cuts nothing."""
        state = self.models.get(model)
        if state is None or state.answered < DEADLINE_COLD_START:
            return None
        raw = state.raw[token_band(est_tokens)]
        pooled = state.first_token
        value = pooled.quantile_s(q)
        if raw is None or value is None or pooled.learned is None:
            return None
        return raw[0] - pooled.learned + value  # this size's shift, plus the pooled quantile

    def learned_stall(self, model: str) -> float | None:
        state = self.models.get(model)
        return None if state is None else state.stall.learned

    # -- learning --------------------------------------------------------------------

    def observe_answer(self, model: str, ttft_s: float, est_tokens: int,
                       max_gap_s: float | None, now: float) -> None:
        """An attempt that answered: its first token came `ttft_s` after the request was
        sent; `max_gap_s` is its longest gap between outputs (None or 0: no gap seen)."""
        if not (math.isfinite(ttft_s) and ttft_s >= 0) or (state := self._state(model)) is None:
            return
        state.answer(ttft_s, token_band(est_tokens), now)
        if max_gap_s is not None and math.isfinite(max_gap_s) and max_gap_s > 0:
            state.stall.answer(max_gap_s, now)
        self.dirty = True

    def observe_timeout(self, model: str, kind: Literal["first_token", "stall"],
                        waited_s: float, est_tokens: int, now: float) -> None:
        """An attempt abandoned after waiting `waited_s` for its first token (kind
        "first_token") or for its next output (kind "stall"): censored, see
        LearnedDeadline."""
        if not (math.isfinite(waited_s) and waited_s >= 0) or (state := self._state(model)) is None:
            return
        if kind == "first_token":
            state.first_token_timeout(waited_s, token_band(est_tokens), now)
        elif kind == "stall":
            state.stall_timeouts += 1
            state.stall.timeout(waited_s, now)
        else:
            raise ValueError(f"observe_timeout: kind {kind!r}, expected 'first_token' or 'stall'")
        self.dirty = True

    # -- status and state file -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Per model, for /status and `failoverd status` (see README, "Deadlines")."""
        return {key: state.snapshot() for key, state in sorted(self.models.items())}

    def to_saved(self, now: float) -> dict[str, SavedModelDeadlines]:
        return {
            key: SavedModelDeadlines(
                answered=s.answered, sizes=[_saved_band(h, now) for h in s.sizes],
                first_token=_saved_band(s.first_token, now), stall=_saved_band(s.stall, now),
                first_token_timeouts=s.first_token_timeouts, stall_timeouts=s.stall_timeouts)
            for key, s in self.models.items()
        }

    @classmethod
    def from_saved(cls, saved: Mapping[str, SavedModelDeadlines], now: float) -> DeadlineLearner:
        """Restore; a model whose entry does not fit (a damaged file, another bin
        layout) starts over instead of failing the whole state file."""
        models = {}
        for key, s in list(saved.items())[:DEADLINE_MAX_MODELS]:
            state = _restored_model(s, now)
            if state is not None:
                models[key] = state
        return cls(models)


# ---------------------------------------------------------------------------
# Ledger
# The single JSONL writer: one write() per row, straight to the kernel, tolerant
# of a torn last line from a crash and of a full disk.
# ---------------------------------------------------------------------------


class Ledger:
    """Append-only JSONL. Rows are never buffered in the process: a crash loses none."""

    # Warn about a failing disk at most this often (a full disk would flood journald).
    WARN_EVERY_S = 60.0

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.dropped = 0
        self._last_warning = -math.inf
        self._encoder = msgspec.json.Encoder()
        self._buf = bytearray(1024)
        # Where a row cut short by a full disk began: the file is cut back to it before
        # the next row, so that row does not continue the torn one (one bad line and one
        # lost row). None while every line in the file is whole.
        self._torn_at: int | None = None
        # Called with every row before it is written (the metrics): one call per
        # attempt, request or breaker row, whether or not the row reaches the disk.
        self.observers: list[Callable[[LedgerRow], None]] = []
        self._observer_failed = False
        if path is not None:
            self.open()

    def open(self) -> None:
        assert self.path is not None
        make_systemd_directory(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        # A crash can leave a torn last line; start ours on a fresh one so the
        # torn line stays one bad line instead of corrupting the next row too.
        size = os.fstat(fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
        self.fd = fd

    def reopen(self) -> None:
        """After log rotation (SIGHUP): continue in a fresh file at the same path. If
        that fails, keep writing where we were: the daemon must not die of it."""
        old = self.fd
        try:
            self.open()
        except OSError as e:
            self.fd = old
            log.error("ledger %s: cannot reopen (%s); still writing to the previous file",
                      self.path, e.strerror)
            return
        if old is not None:
            self._cut_torn(old)
            self._torn_at = None  # the new file has no torn row of ours
            os.close(old)

    def _cut_torn(self, fd: int) -> bool:
        """Cut a torn row off the end of the file; False if it is still there."""
        if self._torn_at is None:
            return True
        try:
            os.ftruncate(fd, self._torn_at)
        except OSError:
            return False
        self._torn_at = None
        return True

    def _append(self, fd: int, buf: bytearray) -> None:
        """One row in one write(2). If the kernel takes only part of it (a full disk, a
        signal), the rest is tried; a row that stays torn is cut off again."""
        n = os.write(fd, buf)
        if n == len(buf):
            return
        start = os.fstat(fd).st_size - n  # O_APPEND and one writer: the row began here
        try:
            with memoryview(buf) as view:
                while n < len(buf):
                    n += os.write(fd, view[n:])
        except OSError:
            self._torn_at = start
            self._cut_torn(fd)
            raise

    def write(self, row: LedgerRow) -> None:
        self._notify(row)
        if self.fd is None:
            if self.path is not None:
                self.dropped += 1
            return
        buf = self._buf
        self._encoder.encode_into(row, buf)
        buf.extend(b"\n")
        try:
            if not self._cut_torn(self.fd):
                raise OSError(errno.ENOSPC, "a torn row could not be cut off")
            self._append(self.fd, buf)
        except OSError as e:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_warning >= self.WARN_EVERY_S:
                self._last_warning = now
                log.error(
                    "ledger %s: write failed (%s); %d row(s) dropped so far, requests are "
                    "still served; free space or fix permissions, then send SIGHUP",
                    self.path, e.strerror, self.dropped,
                )

    def _notify(self, row: LedgerRow) -> None:
        """An observer that fails costs neither the row nor the request (logged once)."""
        for observe in self.observers:
            try:
                observe(row)
            except Exception:
                if not self._observer_failed:
                    self._observer_failed = True
                    log.exception("ledger observer %r failed; rows are still written (this "
                                  "is logged once)", observe)

    def close(self) -> None:
        if self.fd is not None:
            self._cut_torn(self.fd)
            os.close(self.fd)
            self.fd = None


def _decoded(line: bytes, decoder: msgspec.json.Decoder) -> tuple[bytes, LedgerRow] | None:
    line = line.strip()
    try:
        return line, decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None  # a torn or foreign line


def read_ledger(path: str) -> Iterable[tuple[bytes, LedgerRow | None]]:
    """Each line with its decoded row, or None for a torn or foreign line."""
    decoder = msgspec.json.Decoder(LedgerRow)
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield _decoded(line, decoder) or (line.strip(), None)


# ---------------------------------------------------------------------------
# Metrics
# Prometheus families for GET /metrics: counters and histograms kept from the ledger's
# rows (one update per attempt, request or breaker row, never per chunk), and gauges
# read from the daemon when Prometheus scrapes.
# ---------------------------------------------------------------------------

# Latency buckets in seconds, out past the calling runtime's cancel cliff (~660 s): the
# field reports' hangs sit at 120 to 600 s. The configured cliff and each route's
# total_timeout_s are added as edges, so "how many came within the cliff" is exact.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
                   180.0, 240.0, 300.0, 420.0, 600.0, 660.0, 900.0)
# failoverd_breaker_state values (SPEC section 12).
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
# Set to "off" in the daemon's environment to keep no metrics (bench/run.py uses it to
# show what they cost); GET /metrics then answers 404.
METRICS_ENV = "FAILOVERD_METRICS"


def daemon_metrics(d: Daemon) -> PromMetrics | None:
    if os.environ.get(METRICS_ENV, "").lower() in ("off", "0", "no", "false"):
        return None
    return PromMetrics(d)


class PromMetrics:
    """One daemon's metrics in its own registry (never prometheus_client's global one:
    a process may hold several daemons, as the tests do). Label children are cached,
    so a row costs a few dict lookups and additions."""

    def __init__(self, d: Daemon) -> None:
        import prometheus_client as prom  # only a serving daemon pays for this import
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        prom.disable_created_metrics()  # no *_created series: half the text, no use here
        self.d = d
        self._prom = prom
        self._gauge, self._counter = GaugeMetricFamily, CounterMetricFamily
        self.registry = prom.CollectorRegistry(auto_describe=False)
        self.content_type = getattr(prom, "CONTENT_TYPE_PLAIN_0_0_4", prom.CONTENT_TYPE_LATEST)
        edges = {d.cfg.daemon.client_cliff_s, *(r.timing.total_timeout_s
                                                for r in d.routes.values())}
        buckets = sorted(set(LATENCY_BUCKETS) | edges)
        reg = self.registry
        self.requests = prom.Counter(
            "failoverd_requests", "Requests answered, by route and outcome (ok or error).",
            ["route", "outcome"], registry=reg)
        self.request_seconds = prom.Histogram(
            "failoverd_request_duration_seconds", "Time from a request's arrival to its end, "
            "for requests that reached an upstream (see failoverd_total_timeout_seconds and "
            "failoverd_client_cliff_seconds).", ["route"], buckets=buckets, registry=reg)
        self.attempts = prom.Counter(
            "failoverd_attempts", "Attempts by slot and outcome (skipped slots included).",
            ["provider", "model", "outcome"], registry=reg)
        self.attempt_seconds = prom.Counter(
            "failoverd_attempt_seconds", "Time attempts held their requests, by outcome: the "
            "time failed attempts cost.", ["provider", "model", "outcome"], registry=reg)
        self.first_token = prom.Histogram(
            "failoverd_first_token_seconds", "Time from sending an attempt to its first "
            "meaningful output (attempts that produced one).", ["provider", "model"],
            buckets=buckets, registry=reg)
        self.cost = prom.Counter(
            "failoverd_cost_usd", "Estimated billed cost, failed attempts with output included.",
            ["provider", "model"], registry=reg)
        self.deadline = prom.Gauge(
            "failoverd_deadline_seconds", "The deadlines that applied to the slot's last "
            "attempt.", ["provider", "model", "kind"], registry=reg)
        self.breaker_changes = prom.Counter(
            "failoverd_breaker_transitions", "Breaker state changes, by the state entered.",
            ["scope", "key", "to"], registry=reg)
        # Shadow calls have families of their own: a candidate that is also a live slot
        # must not mix its shadow figures into the live ones.
        self.shadow_attempts = prom.Counter(
            "failoverd_shadow_attempts", "Shadow attempts by route, shadow model and outcome "
            "(skipped ones included).", ["route", "model", "outcome"], registry=reg)
        self.shadow_cost = prom.Counter(
            "failoverd_shadow_cost_usd", "Billed cost of shadow calls.", ["route", "model"],
            registry=reg)
        self.shadow_first_token = prom.Histogram(
            "failoverd_shadow_first_token_seconds", "First-token time of shadow calls.",
            ["route", "model"], buckets=buckets, registry=reg)
        self._children: dict[tuple[Any, ...], Any] = {}
        reg.register(self)
        prom.ProcessCollector(registry=reg)
        d.ledger.observers.append(self.observe)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, row: LedgerRow) -> None:
        if isinstance(row, AttemptRow):
            self._attempt(row)
        elif isinstance(row, RequestRow):
            self._child(self.requests, row.route, row.outcome).inc()
            if row.attempts:
                self._child(self.request_seconds, row.route).observe(row.total_ms / 1000)
        else:
            self._child(self.breaker_changes, row.scope, row.key, row.to).inc()

    def _attempt(self, row: AttemptRow) -> None:
        provider, model, outcome = row.provider, row.model, row.outcome
        if row.shadow:
            return self._shadow(row)
        self._child(self.attempts, provider, model, outcome).inc()
        if outcome == "skipped":
            return
        if row.latency_ms is not None:
            self._child(self.attempt_seconds, provider, model, outcome).inc(row.latency_ms / 1000)
        if row.ttft_ms is not None:
            self._child(self.first_token, provider, model).observe(row.ttft_ms / 1000)
        self._child(self.cost, provider, model).inc(row.cost_usd or 0.0)
        if row.first_token_deadline_s is not None:
            self._child(self.deadline, provider, model, "first_token").set(
                row.first_token_deadline_s)
        if row.stall_deadline_s is not None:
            self._child(self.deadline, provider, model, "stall").set(row.stall_deadline_s)

    def _shadow(self, row: AttemptRow) -> None:
        key = f"{row.provider}/{row.model}"
        self._child(self.shadow_attempts, row.route, key, row.outcome).inc()
        if row.outcome == "skipped":
            return
        self._child(self.shadow_cost, row.route, key).inc(row.cost_usd or 0.0)
        if row.ttft_ms is not None:
            self._child(self.shadow_first_token, row.route, key).observe(row.ttft_ms / 1000)

    def describe(self) -> list[Any]:
        return []  # read at scrape time only; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        """What is state rather than events, read from the daemon as it is now."""
        d, gauge = self.d, self._gauge
        yield gauge("failoverd_in_flight_requests", "Requests under way.", value=len(d.inflight))
        yield gauge("failoverd_event_loop_lag_seconds", "How late the event loop wakes up "
                    "(smoothed; the overload signal).", value=d.loop_lag)
        yield gauge("failoverd_fallbacks_waiting", "Next attempts waiting their turn while the "
                    "loop runs late (a failover storm).", value=len(d.fallbacks))
        yield self._counter("failoverd_ledger_dropped_rows", "Ledger rows that could not be "
                            "written (disk full, unwritable).", value=d.ledger.dropped)
        yield self._counter("failoverd_shed_requests", "Requests refused with 503 while "
                            "overloaded.", value=d.shed)
        yield gauge("failoverd_client_cliff_seconds", "daemon.client_cliff_s: when the calling "
                    "runtime gives up.", value=d.cfg.daemon.client_cliff_s)
        totals = gauge("failoverd_total_timeout_seconds", "Each route's total_timeout_s.",
                       labels=["route"])
        for name, route in sorted(d.routes.items()):
            totals.add_metric([name], route.timing.total_timeout_s)
        yield totals
        states = gauge("failoverd_breaker_state", "Breaker state: 0 closed, 1 half-open, "
                       "2 open.", labels=["scope", "key"])
        now = trio.current_time()
        for (scope, key), b in sorted(d.health.breakers.items()):
            states.add_metric([scope, key], BREAKER_STATE_VALUES[breaker_state_at(b, now)[0]])
        yield states
        yield from self._budgets()

    def _budgets(self) -> Iterator[Any]:
        """Today's spend (UTC day) against the budgets, live per model and shadows per
        route, and the shadow calls under way and dropped (SPEC section 13)."""
        gauge, budgets = self._gauge, self.d.budgets()
        spent = gauge("failoverd_spend_usd_today", "Live spend today (UTC), failed attempts "
                      "with output included.", labels=["model"])
        limit = gauge("failoverd_budget_usd_per_day", "Live budgets (models.P/M."
                      "budget_usd_per_day).", labels=["model"])
        for m in budgets["models"]:
            spent.add_metric([m["model"]], m["spent_usd"])
            if m["budget_usd_per_day"] is not None:
                limit.add_metric([m["model"]], m["budget_usd_per_day"])
        shadow = gauge("failoverd_shadow_spend_usd_today", "Shadow spend today (UTC), by route "
                       "and shadow model.", labels=["route", "model"])
        for s in budgets["shadows"]:
            shadow.add_metric([s["route"], s["model"]], s["spent_usd"])
        yield from (spent, limit, shadow)
        shadows = self.d.shadows.status()
        yield gauge("failoverd_shadow_in_flight", "Shadow calls under way.",
                    value=shadows["in_flight"])
        dropped = self._counter("failoverd_shadows_dropped", "Sampled shadow calls not made, "
                                "by reason.", labels=["reason"])
        for reason, n in sorted(shadows["dropped"].items()):
            dropped.add_metric([reason], n)
        yield dropped

    def exposition(self) -> bytes:
        return self._prom.generate_latest(self.registry)


# ---------------------------------------------------------------------------
# Upstreams
# OpenAI and Anthropic adapters: build the always-streamed upstream request,
# parse SSE, decide per event whether it is meaningful output, relay or assemble.
# ---------------------------------------------------------------------------

# Sent on every upstream request; token streams are not worth compressing.
UPSTREAM_HEADERS = {"user-agent": f"failoverd/{__version__}", "accept-encoding": "identity"}
# An SSE line longer than this is not an LLM token stream (a runaway upstream).
MAX_SSE_LINE = 8 * 1024 * 1024
# Frames held before commit (role-only deltas and the like); bounded so a stream
# of empty frames cannot grow memory while the first-token deadline runs.
MAX_PENDING_FRAMES = 64


class SSEParser:
    """Server-sent events from a byte stream: yields (event name, data) per event.

    Comment lines (heartbeats) are counted, never yielded; `id:`, `retry:` and
    unknown fields are ignored as the SSE spec says. A chunk may be bytes or a
    bytearray (h11's body data); data values come out as slices of it.

    Each byte fed is searched for a line end once: a line that spans chunks is held
    as a list of pieces and joined when its end comes, so a long line costs time in
    proportion to its length (re-searching the held start on every chunk made a
    7.9 MiB line cost ~1.1 s of loop time before the cap below tripped).
    """

    __slots__ = ("_held", "_held_len", "_event", "_data", "heartbeats", "junk")

    def __init__(self) -> None:
        self._held: list[bytes] = []  # the start of a line whose end has not come yet
        self._held_len = 0
        self._event: bytes | None = None
        self._data: bytes | None = None
        self.heartbeats = 0
        self.junk = 0

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        out: list[tuple[bytes | None, bytes]] = []
        if self._held:
            end = chunk.find(b"\n")
            if end < 0:
                self._hold(chunk)
                return out
            self._held.append(chunk[:end])
            line = b"".join(self._held)
            self._held, self._held_len = [], 0
            self._lines([line], out)
            chunk = chunk[end + 1:]
        lines = chunk.split(b"\n")
        rest = lines.pop()
        self._lines(lines, out)
        if rest:
            self._hold(rest)
        return out

    def _hold(self, piece: bytes) -> None:
        self._held.append(piece)
        self._held_len += len(piece)
        if self._held_len > MAX_SSE_LINE:
            raise Failure("protocol_error", f"SSE line longer than {MAX_SSE_LINE} bytes")

    def _lines(self, lines: list[bytes], out: list[tuple[bytes | None, bytes]]) -> None:
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data is not None:
                    out.append((self._event, self._data))
                self._event = self._data = None
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self._data = value if self._data is None else self._data + b"\n" + value
            elif line[0] == 0x3A:  # ':' comment: a heartbeat
                self.heartbeats += 1
            elif line.startswith(b"event:"):
                self._event = bytes(line[6:].strip())
            elif not line.startswith((b"id:", b"retry:")):
                self.junk += 1

    def close(self) -> list[tuple[bytes | None, bytes]]:
        """At end of stream: an event whose blank line never came still counts."""
        out = self.feed(b"\n") if self._held else []
        if self._data is not None:
            out.append((self._event, self._data))
            self._event = self._data = None
        return out


class _Function(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct, gc=False):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct, gc=False):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    message: _Delta | None = None  # a non-streamed reply from a server that ignored stream
    finish_reason: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    id: str | None = None
    model: str | None = None
    created: int | None = None
    system_fingerprint: str | None = None
    choices: list[_Choice] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


class ChoiceAcc:
    """One choice of a non-streaming reply, assembled from deltas."""

    __slots__ = ("content", "reasoning", "refusal", "tool_calls", "finish_reason")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None

    def add(self, d: _Delta) -> None:
        if d.content:
            self.content.append(d.content)
        if d.reasoning_content or d.reasoning:
            self.reasoning.append(d.reasoning_content or d.reasoning or "")
        if d.refusal:
            self.refusal.append(d.refusal)
        for tc in d.tool_calls or ():
            call = self.tool_calls.setdefault(tc.index, {
                "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if tc.id:
                call["id"] = tc.id
            if tc.function is not None:
                if tc.function.name:
                    call["function"]["name"] += tc.function.name
                if tc.function.arguments:
                    call["function"]["arguments"] += tc.function.arguments

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.content or not self.tool_calls else None,
            "refusal": "".join(self.refusal) or None,
        }
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            msg["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return msg


class StreamState:
    """What one attempt has seen of its upstream stream."""

    __slots__ = (
        "progress", "done", "finish_reason", "usage", "id", "model", "created",
        "fingerprint", "choices", "want_usage", "events", "tool_index", "anthropic_usage",
        "sse", "out_chars", "record",
    )

    def __init__(self, *, assemble: bool, want_usage: bool) -> None:
        self.progress = False  # set when the last event was meaningful output
        self.done = False  # the upstream said the stream is complete
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.id: str | None = None
        self.model: str | None = None
        self.created: int | None = None
        self.fingerprint: str | None = None
        self.choices: dict[int, ChoiceAcc] | None = {} if assemble else None
        self.want_usage = want_usage
        self.events = 0
        self.tool_index = -1
        self.anthropic_usage: dict[str, int] = {}
        self.sse = SSEParser()
        self.out_chars = 0
        # A streamed answer that will be compared with its shadow is also assembled here
        # (choice 0; relaying is unchanged): what its fingerprint is taken from.
        self.record: ChoiceAcc | None = None

    def remember(self, index: int, delta: _Delta | dict[str, Any] | None) -> None:
        """Assemble choice 0 of a streamed answer that is to be compared with its shadow."""
        if self.record is None or index or delta is None:
            return
        self.record.add(delta if isinstance(delta, _Delta) else msgspec.convert(delta, _Delta))

    @property
    def complete(self) -> bool:
        """The upstream said the answer is whole ([DONE] or a finish reason) and it
        had output: a stall or reset after this loses nothing."""
        return (self.done or self.finish_reason is not None) and self.events > 0 and (
            self.out_chars > 0 or self.finish_reason is not None)

    @property
    def tokens_in(self) -> int | None:
        return _count((self.usage or {}).get("prompt_tokens"))

    @property
    def tokens_out(self) -> int | None:
        return _count((self.usage or {}).get("completion_tokens"))

    def completion(self, fallback_model: str, request_id: str) -> dict[str, Any]:
        accs = self.choices or {0: ChoiceAcc()}
        return {
            "id": self.id or f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": self.created or int(time.time()),
            "model": self.model or fallback_model,
            "choices": [
                {
                    "index": i,
                    "message": accs[i].message(),
                    "finish_reason": accs[i].finish_reason or self.finish_reason or "stop",
                    "logprobs": None,
                }
                for i in sorted(accs)
            ],
            "usage": self.usage,
            "system_fingerprint": self.fingerprint,
        }


def _count(value: Any) -> int | None:
    """A token count from upstream usage (some servers send floats, or null)."""
    return int(value) if isinstance(value, int | float) and value >= 0 else None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_json_encode = msgspec.json.Encoder().encode


def _error_event_text(error: Any) -> str:
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code") or "error"
        return f"{kind}: {error.get('message') or 'no message'}"[:300]
    return str(error)[:300]


class OpenAIAdapter:
    """Any OpenAI-compatible chat-completions API."""

    kind = "openai"

    @staticmethod
    def request(
        base_url: str, model: str, body: dict[str, Any], key: str | None, model_cfg: ModelConfig
    ) -> tuple[str, dict[str, str], bytes]:
        upstream = dict(body)
        upstream["model"] = model
        upstream["stream"] = True
        options = dict(upstream.get("stream_options") or {})
        options["include_usage"] = True
        upstream["stream_options"] = options
        headers = {"content-type": "application/json", "accept": "text/event-stream",
                   **UPSTREAM_HEADERS}
        if key:
            headers["authorization"] = f"Bearer {key}"
        return base_url.rstrip("/") + "/chat/completions", headers, _json_encode(upstream)

    @staticmethod
    def on_event(event: bytes | None, data: bytes, st: StreamState) -> bytes | None:
        """Digest one SSE event; return the frame to relay to a streaming client."""
        if data == b"[DONE]":
            st.done = True
            return None
        if event == b"error":
            text = data[:300].decode("utf-8", "replace")
            raise Failure("upstream_error_event", f"error event: {text}")
        try:
            chunk = _chunk_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            raise Failure("protocol_error", f"unparseable SSE data line: {e}") from None
        return OpenAIAdapter.digest(chunk, data, st)

    @staticmethod
    def digest(chunk: _Chunk, data: bytes, st: StreamState) -> bytes | None:
        if chunk.error is not None:
            raise Failure("upstream_error_event", _error_event_text(chunk.error))
        st.events += 1
        if st.id is None:
            st.id, st.model, st.created = chunk.id, chunk.model, chunk.created
            st.fingerprint = chunk.system_fingerprint
        relay = True
        if chunk.usage is not None:
            st.usage = chunk.usage
            st.progress = True
            relay = st.want_usage or bool(chunk.choices)
        for choice in chunk.choices or ():
            OpenAIAdapter._choice(choice, st)
        return data if relay else None

    @staticmethod
    def _choice(choice: _Choice, st: StreamState) -> None:
        """One choice of a chunk: progress, output size, and the assembled reply."""
        d = choice.delta or choice.message
        reason = choice.finish_reason
        if reason:
            if reason == "error":
                raise Failure("upstream_error_event", "finish_reason: error")
            st.finish_reason = reason
            st.progress = True
        if d is not None and (d.content or d.tool_calls or d.refusal or d.reasoning_content
                              or d.reasoning):
            st.progress = True
            st.out_chars += len(d.content or "") + len(d.reasoning_content or d.reasoning or "")
        if st.choices is not None:
            acc = st.choices.get(choice.index)
            if acc is None:
                acc = st.choices[choice.index] = ChoiceAcc()
            if d is not None:
                acc.add(d)
            if reason:
                acc.finish_reason = reason
        else:
            st.remember(choice.index, d)

    @staticmethod
    def whole_body(body: bytes, st: StreamState) -> bytes | None:
        """A 200 application/json reply from a server that ignored `stream`."""
        try:
            chunk = _chunk_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            raise Failure("protocol_error", f"200 with unparseable body: {e}", status=200) from None
        if chunk.error is not None:
            raise Failure("upstream_error_event", _error_event_text(chunk.error), status=200)
        if not chunk.choices:
            raise Failure("protocol_error", "200 without choices", status=200)
        OpenAIAdapter.digest(chunk, body, st)
        st.done = True
        # Re-shape as one streamed chunk so streaming clients get valid SSE.
        choices = [
            {"index": c.index, "delta": msgspec.to_builtins(c.message or c.delta or _Delta()),
             "finish_reason": c.finish_reason}
            for c in chunk.choices
        ]
        return _json_encode({
            "id": chunk.id, "object": "chat.completion.chunk", "created": chunk.created,
            "model": chunk.model, "choices": choices,
        })


# msgspec recurses, and on Python 3.11 its depth shares the interpreter's frame budget
# (sys.getrecursionlimit(), 1,000): a client's JSON that decoded near the limit (about
# 950 levels) could not be encoded again deeper in the stack, where the upstream request
# is built, and that failed every slot as the upstream's protocol_error. Client JSON (the
# body, a tool call's arguments) is decoded with this many frames of the budget held
# back: a body deeper than about 700 levels is the client's 400, and what decodes can be
# encoded anywhere. From Python 3.12 the limit does not depend on the Python stack.
JSON_HEADROOM_FRAMES = 256


def decode_json(raw: bytes | str) -> Any:
    """msgspec.json.decode, raising RecursionError with JSON_HEADROOM_FRAMES to spare. No
    other code runs meanwhile: msgspec holds the GIL, and the trio loop waits for it."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit - JSON_HEADROOM_FRAMES)
    try:
        return msgspec.json.decode(raw)
    finally:
        sys.setrecursionlimit(limit)


# -- the client's request, as far as failoverd reads it ----------------------------
# The front end checks every request against these Structs before any attempt (a 400
# naming the field), so building an upstream request from it cannot fail. Roles, part
# types and tool types are open sets on the wire (vLLM's video_url, custom roles): a
# value failoverd does not know is the upstream's to judge. Fields failoverd does not
# read are not checked and go to OpenAI-compatible upstreams as they are.

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]


class ImageURL(msgspec.Struct, kw_only=True):
    url: str
    detail: str | None = None


# A part of a known type must carry the field its type names.
_PART_FIELDS = {"text": "text", "image_url": "image_url", "refusal": "refusal"}


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    refusal: str | None = None

    def __post_init__(self) -> None:
        field = _PART_FIELDS.get(self.type)
        if field is not None and getattr(self, field) is None:
            raise ValueError(f"a part of type {self.type!r} needs {field!r}")


Content = str | list[ContentPart] | None


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str | None = None
    arguments: str | dict[str, Any] | None = None


class ToolCall(msgspec.Struct, kw_only=True):
    id: str | None = None
    type: str = "function"
    function: FunctionCall | None = None


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: Content = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str | None = None
    description: str | None = ""
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str = "function"
    function: FunctionDef | None = None


class ToolChoiceFunction(msgspec.Struct, kw_only=True):
    name: str | None = None


class ToolChoice(msgspec.Struct, kw_only=True):
    type: str = "function"
    function: ToolChoiceFunction | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


class ChatRequest(msgspec.Struct, kw_only=True):
    messages: list[Message]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: NonNegativeInt | None = None
    max_completion_tokens: NonNegativeInt | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Tool] | None = None
    tool_choice: str | ToolChoice | None = None


# -- OpenAI request -> Anthropic Messages request ---------------------------------

def _anthropic_part(part: ContentPart) -> dict[str, Any] | None:
    if part.type == "text":
        return {"type": "text", "text": part.text or ""}
    if part.type == "image_url" and part.image_url is not None:
        url = part.image_url.url
        m = re.match(r"data:([^;]+);base64,(.*)", url, re.S)
        source = ({"type": "base64", "media_type": m.group(1), "data": m.group(2)}
                  if m else {"type": "url", "url": url})
        return {"type": "image", "source": source}
    return None  # a part Anthropic has no counterpart for


def _anthropic_content(content: Content) -> str | list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return content or ""
    return [block for part in content if (block := _anthropic_part(part)) is not None]


def _tool_input(arguments: str | dict[str, Any] | None) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        return decode_json(arguments or "{}")
    except (msgspec.DecodeError, RecursionError):
        return {}


def _tool_use(call: ToolCall) -> dict[str, Any]:
    fn = call.function or FunctionCall()
    return {"type": "tool_use", "id": call.id, "name": fn.name, "input": _tool_input(fn.arguments)}


# Each role's message joins the translation in its own way: (message, system texts,
# Anthropic messages so far).
Translate = Callable[[Message, list[str], list[dict[str, Any]]], None]


def _system_message(m: Message, system: list[str], messages: list[dict[str, Any]]) -> None:
    c = m.content
    system.append(c if isinstance(c, str) else " ".join(p.text or "" for p in c or ()))


def _tool_message(m: Message, system: list[str], messages: list[dict[str, Any]]) -> None:
    block = {"type": "tool_result", "tool_use_id": m.tool_call_id,
             "content": _anthropic_content(m.content)}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "user" and isinstance(last["content"], list):
        last["content"].append(block)  # Anthropic wants one user turn of tool results
    else:
        messages.append({"role": "user", "content": [block]})


def _other_message(m: Message, system: list[str], messages: list[dict[str, Any]]) -> None:
    messages.append({"role": m.role, "content": _anthropic_content(m.content)})


def _assistant_message(m: Message, system: list[str], messages: list[dict[str, Any]]) -> None:
    if not m.tool_calls:
        return _other_message(m, system, messages)
    content = _anthropic_content(m.content)
    blocks = content if isinstance(content, list) else (
        [{"type": "text", "text": content}] if content else [])
    messages.append({"role": "assistant",
                     "content": [*blocks, *(_tool_use(tc) for tc in m.tool_calls)]})
    return None


_ANTHROPIC_ROLES: dict[str, Translate] = {
    "system": _system_message, "developer": _system_message, "tool": _tool_message,
    "assistant": _assistant_message,
}


def _anthropic_tool(fn: FunctionDef) -> dict[str, Any]:
    return {"name": fn.name, "description": fn.description,
            "input_schema": fn.parameters or {"type": "object"}}


def _anthropic_tool_choice(choice: str | ToolChoice | None) -> dict[str, Any] | None:
    if choice == "required":
        return {"type": "any"}
    if choice in ("auto", "none"):
        return {"type": choice}
    if isinstance(choice, ToolChoice) and choice.function is not None:
        return {"type": "tool", "name": choice.function.name}
    return None


def anthropic_body(model: str, body: dict[str, Any], model_cfg: ModelConfig) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request (streamed). Total over any
    body that passed the front end's checks (`decode_json`, `request_problem`)."""
    req = msgspec.convert(body, ChatRequest)
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for m in req.messages:
        _ANTHROPIC_ROLES.get(m.role, _other_message)(m, system, messages)
    out: dict[str, Any] = {
        "model": model, "messages": messages, "stream": True,
        "max_tokens": req.max_completion_tokens or req.max_tokens or model_cfg.max_output_tokens,
    }
    if system:
        out["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    if req.stop:
        out["stop_sequences"] = [req.stop] if isinstance(req.stop, str) else req.stop
    if req.tools:
        out["tools"] = [_anthropic_tool(t.function) for t in req.tools if t.function is not None]
    choice = _anthropic_tool_choice(req.tool_choice)
    if choice is not None:
        out["tool_choice"] = choice
    return out


# -- Anthropic Messages SSE events -> OpenAI chunks ---------------------------------
# A tagged union on `type`; an event type added later, or an `event: error` whose data
# has no known type, is told apart by a lenient second look (`_EventHead`).

# Anthropic's stop reasons in OpenAI's vocabulary.
_ANTHROPIC_FINISH = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
    "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop",
}


class _Event(msgspec.Struct, tag_field="type"):
    """An Anthropic SSE event; each kind is a subclass tagged with its `type`."""


class _StartedMessage(msgspec.Struct):
    id: str | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None


class _MessageStart(_Event, tag="message_start"):
    message: _StartedMessage | None = None


class _Block(msgspec.Struct):
    type: str | None = None
    id: str | None = None
    name: str | None = None


class _BlockStart(_Event, tag="content_block_start"):
    index: int | None = None
    content_block: _Block | None = None


class _BlockDelta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    thinking: str | None = None
    partial_json: str | None = None


class _BlockDeltaEvent(_Event, tag="content_block_delta"):
    index: int | None = None
    delta: _BlockDelta | None = None


class _StopReason(msgspec.Struct):
    stop_reason: str | None = None


class _MessageDelta(_Event, tag="message_delta"):
    delta: _StopReason | None = None
    usage: dict[str, Any] | None = None


class _MessageStop(_Event, tag="message_stop"):
    pass


class _BlockStop(_Event, tag="content_block_stop"):
    index: int | None = None


class _Ping(_Event, tag="ping"):
    pass


class _ErrorEvent(_Event, tag="error"):
    error: Any = None


class _EventHead(msgspec.Struct):
    type: str = ""
    error: Any = None


def _relay(st: StreamState, acc: ChoiceAcc | None, delta: dict[str, Any]) -> bytes | None:
    """Meaningful output: progress, then assembled or relayed as an OpenAI chunk."""
    st.progress = True
    st.out_chars += len(delta.get("content") or delta.get("reasoning_content") or "")
    st.remember(0, delta)
    if acc is not None:
        acc.add(msgspec.convert(delta, _Delta))
        return None
    return AnthropicAdapter._chunk(st, delta)


def _on_message_start(ev: _MessageStart, st: StreamState, acc: ChoiceAcc | None) -> bytes | None:
    msg = ev.message or _StartedMessage()
    st.id, st.model, st.created = msg.id, msg.model, int(time.time())
    usage = msg.usage or {}
    st.anthropic_usage["in"] = sum(_count(usage.get(k)) or 0 for k in (
        "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
    if acc is not None:
        return None
    return AnthropicAdapter._chunk(st, {"role": "assistant", "content": ""})


def _on_block_start(ev: _BlockStart, st: StreamState, acc: ChoiceAcc | None) -> bytes | None:
    block = ev.content_block
    if block is None or block.type != "tool_use":
        return None
    st.tool_index += 1
    return _relay(st, acc, {"tool_calls": [{
        "index": st.tool_index, "id": block.id, "type": "function",
        "function": {"name": block.name, "arguments": ""}}]})


def _on_block_delta(ev: _BlockDeltaEvent, st: StreamState, acc: ChoiceAcc | None) -> bytes | None:
    d = ev.delta or _BlockDelta()
    if d.type == "text_delta" and d.text:
        return _relay(st, acc, {"content": d.text})
    if d.type == "thinking_delta" and d.thinking:
        return _relay(st, acc, {"reasoning_content": d.thinking})
    if d.type == "input_json_delta" and d.partial_json:
        return _relay(st, acc, {"tool_calls": [{"index": st.tool_index,
                                                "function": {"arguments": d.partial_json}}]})
    return None  # an empty delta, or a kind that carries no output (signature_delta)


def _on_message_delta(ev: _MessageDelta, st: StreamState, acc: ChoiceAcc | None) -> bytes | None:
    out = _count((ev.usage or {}).get("output_tokens"))
    if out is not None:
        st.anthropic_usage["out"] = out
    reason = ev.delta.stop_reason if ev.delta is not None else None
    if not reason:
        return None
    st.finish_reason = _ANTHROPIC_FINISH.get(reason, "stop")
    st.progress = True
    if acc is not None:
        acc.finish_reason = st.finish_reason
        return None
    return AnthropicAdapter._chunk(st, {}, st.finish_reason)


def _on_message_stop(ev: _MessageStop, st: StreamState, acc: ChoiceAcc | None) -> bytes | None:
    tin, tout = st.anthropic_usage.get("in", 0), st.anthropic_usage.get("out", 0)
    st.usage = {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}
    st.done = True
    st.progress = True
    if acc is not None or not st.want_usage:
        return None
    return AnthropicAdapter._chunk(st, None, usage=st.usage)


def _on_error(ev: _ErrorEvent, st: StreamState, acc: ChoiceAcc | None) -> bytes | None:
    raise Failure("upstream_error_event", _error_event_text(ev.error))


def _no_output(ev: Any, st: StreamState, acc: ChoiceAcc | None) -> bytes | None:
    return None  # ping (a heartbeat), content_block_stop


_ANTHROPIC_EVENTS: dict[type, Callable[[Any, StreamState, ChoiceAcc | None], bytes | None]] = {
    _MessageStart: _on_message_start, _BlockStart: _on_block_start,
    _BlockDeltaEvent: _on_block_delta, _MessageDelta: _on_message_delta,
    _MessageStop: _on_message_stop, _ErrorEvent: _on_error, _Ping: _no_output,
    _BlockStop: _no_output,
}

AnthropicEvent = (_MessageStart | _BlockStart | _BlockDeltaEvent | _MessageDelta | _MessageStop
                  | _BlockStop | _Ping | _ErrorEvent)
_anthropic_decoder = msgspec.json.Decoder(AnthropicEvent)
_event_head_decoder = msgspec.json.Decoder(_EventHead)
_ANTHROPIC_EVENT_TYPES = frozenset(t.__struct_config__.tag for t in _ANTHROPIC_EVENTS)


def _anthropic_event(event: bytes | None, data: bytes) -> AnthropicEvent | None:
    """The event, or None for one of a type failoverd does not know (ignored)."""
    try:
        return _anthropic_decoder.decode(data)
    except msgspec.ValidationError as e:  # before DecodeError, its base class
        invalid = e
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise Failure("protocol_error", f"unparseable SSE data line: {e}") from None
    try:
        head = _event_head_decoder.decode(data)
    except msgspec.ValidationError:
        head = None
    if head is None or head.type in _ANTHROPIC_EVENT_TYPES:
        raise Failure("protocol_error", f"unparseable SSE data line: {invalid}") from None
    if event == b"error":
        raise Failure("upstream_error_event", _error_event_text(head.error))
    return None


class AnthropicAdapter:
    """Anthropic Messages API, translated to and from OpenAI chunks."""

    kind = "anthropic"

    @staticmethod
    def request(
        base_url: str, model: str, body: dict[str, Any], key: str | None, model_cfg: ModelConfig
    ) -> tuple[str, dict[str, str], bytes]:
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            "anthropic-version": "2023-06-01",
            **UPSTREAM_HEADERS,
        }
        if key:
            headers["x-api-key"] = key
        payload = _json_encode(anthropic_body(model, body, model_cfg))
        return base_url.rstrip("/") + "/messages", headers, payload

    @staticmethod
    def _chunk(st: StreamState, delta: dict[str, Any] | None, finish: str | None = None,
               usage: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": st.id, "object": "chat.completion.chunk", "created": st.created,
            "model": st.model,
            "choices": [] if delta is None else
            [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            chunk["usage"] = usage
        return _json_encode(chunk)

    @staticmethod
    def on_event(event: bytes | None, data: bytes, st: StreamState) -> bytes | None:
        ev = _anthropic_event(event, data)
        acc = None
        if st.choices is not None:  # assembling a reply: choice 0, made once
            acc = st.choices.get(0)
            if acc is None:
                acc = st.choices[0] = ChoiceAcc()
        return None if ev is None else _ANTHROPIC_EVENTS[type(ev)](ev, st, acc)

    @staticmethod
    def whole_body(body: bytes, st: StreamState) -> bytes | None:
        raise Failure("protocol_error", "200 with a JSON body to a streamed request", status=200)


ADAPTERS: dict[str, type[OpenAIAdapter] | type[AnthropicAdapter]] = {
    "openai": OpenAIAdapter,
    "anthropic": AnthropicAdapter,
}


# -- continuing an answer that broke after commit (SPEC section 11) --------------
# The engine feeds every frame it relays to a streaming client to a Relayed; when a
# committed stream breaks and continue_blocker() allows it, continue_body() turns the
# next slot's request into the conversation plus that partial answer, and a Seam
# passes the continuation's frames on as the rest of the same answer.


def _request_blocker(body: Mapping[str, Any]) -> str | None:
    """What in the request itself rules continuing its answer out."""
    n = body.get("n")
    if n is not None and n != 1:
        return f"the client asked for n = {n} choices"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        # A grammar (structured output) starts again from its first state after the
        # prefill: the continuation would begin a new JSON document inside the old one.
        return f"structured output (response_format {fmt.get('type')}) cannot be resumed"
    return None


class Relayed:
    """What a streaming client has been sent of the answer: choice 0's content and
    reasoning, the first chunk's id and created time, and what rules continuing out."""

    __slots__ = ("_content", "_reasoning", "id", "created", "blocker")

    def __init__(self, body: Mapping[str, Any]) -> None:
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self.id: str | None = None
        self.created: int | None = None
        self.blocker = _request_blocker(body)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    def add(self, frame: bytes) -> None:
        """One frame as relayed (an OpenAI chunk, as both adapters produce them)."""
        try:
            chunk = _chunk_decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            self.blocker = self.blocker or "a relayed frame could not be read back"
            return
        if self.id is None:
            self.id, self.created = chunk.id, chunk.created
        for choice in chunk.choices or ():
            d = choice.delta or choice.message
            if d is None:
                continue
            if choice.index != 0:
                self.blocker = self.blocker or "the answer has several choices"
            if d.tool_calls:
                # Arguments cut at an arbitrary byte and call ids cannot be resumed, and a
                # continuation could call other tools than the half-relayed one.
                self.blocker = self.blocker or "a tool-call delta was relayed"
            if d.refusal:
                self.blocker = self.blocker or "a refusal was relayed"
            if d.content:
                self._content.append(d.content)
            if d.reasoning_content or d.reasoning:
                self._reasoning.append(d.reasoning_content or d.reasoning or "")


class Prefill(msgspec.Struct, frozen=True, kw_only=True):
    """The partial answer as a continuation sends it, and the seam it leaves.

    Trailing whitespace is never sent: Anthropic refuses a final assistant message that
    ends in it, and elsewhere it splits a token (BPE tokenizers attach the space to the
    next word, so a model continuing after one doubles or drops it). The model writes
    that whitespace again; the Seam drops it, since the client has it (`cut`).
    """

    content: str = ""  # what the final assistant message holds (a client's own prefill too)
    reasoning: str = ""  # relayed reasoning, where the wire carries it
    cut: str = ""  # whitespace stripped from the end of `content`
    reasoning_cut: str = ""
    thinking: bool = False  # the answer broke inside its (carried) reasoning
    index: int | None = None  # the prefill's place in messages; None: no prefill sent


def _own_text(content: Any) -> str | None:
    """The text of a conversation's own final assistant message, if it is text only."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text") or "") for p in content)
    return None


def _with_prefill(
    messages: list[Any], content: str, reasoning: str, extra: dict[str, Any],
) -> tuple[list[Any], Prefill]:
    """`messages` ending in one assistant message holding `content` (and `reasoning`):
    a final assistant message of the conversation's own (a client's prefill) is
    extended rather than followed by a second one. Nothing is added when there is
    nothing to send."""
    head, base = messages, {}
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant" and not last.get(
            "tool_calls") and (own := _own_text(last.get("content"))) is not None:
        head, base, content = messages[:-1], last, own + content
    thinking = bool(reasoning) and not content
    kept = content.rstrip()
    kept_reasoning = reasoning.rstrip() if thinking else reasoning
    prefill = Prefill(content=kept, reasoning=kept_reasoning, cut=content[len(kept):],
                      reasoning_cut=reasoning[len(kept_reasoning):], thinking=thinking)
    if not kept and not kept_reasoning:
        return messages, prefill
    message = {**base, "role": "assistant", "content": kept, **extra}
    if kept_reasoning:
        message["reasoning_content"] = kept_reasoning
    return [*head, message], msgspec.structs.replace(prefill, index=len(head))


def _spent(body: dict[str, Any], keys: tuple[str, ...], used: int | None) -> None:
    """The continuation may write only what the client's output limit has left."""
    for key in keys:
        limit = body.get(key)
        if used and isinstance(limit, int) and not isinstance(limit, bool):
            body[key] = max(1, limit - used)


def continue_body(
    kind: str, mode: str, body: dict[str, Any], relayed: Relayed, *,
    used_tokens: int | None = None,
) -> tuple[dict[str, Any], Prefill]:
    """An upstream request body (as the adapter of `kind` built it) turned into the
    continuation of the relayed answer, for a model whose prefill is `mode`.

    openai + trailing: the partial answer as a final assistant message; + prefix: that
    message with "prefix": true and, for a reasoning model, its reasoning_content
    (DeepSeek); + vllm: continue_final_message, add_generation_prompt false. anthropic:
    the Messages API's own prefill, a final assistant message (reasoning is not sent:
    a thinking block needs the signature only a whole one has). `used_tokens`: output
    already spent, taken off max_tokens / max_completion_tokens.
    """
    if mode == "none" or (kind == "anthropic" and mode != "trailing"):
        raise ValueError(f"a {kind} model with prefill = {mode!r} cannot continue an answer")
    out = dict(body)
    reasoning = relayed.reasoning if kind == "openai" and mode == "prefix" else ""
    extra: dict[str, Any] = {"prefix": True} if kind == "openai" and mode == "prefix" else {}
    messages, prefill = _with_prefill(
        list(out.get("messages") or ()), relayed.content, reasoning, extra)
    out["messages"] = messages
    if kind == "openai" and mode == "vllm" and prefill.index is not None:
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
    keys = ("max_tokens",) if kind == "anthropic" else ("max_tokens", "max_completion_tokens")
    _spent(out, keys, used_tokens)
    return out, prefill


def continue_payload(
    kind: str, mode: str, payload: bytes, relayed: Relayed, *, used_tokens: int | None = None,
) -> tuple[bytes, Prefill]:
    """continue_body() on the encoded body an adapter's request() returned."""
    body, prefill = continue_body(kind, mode, msgspec.json.decode(payload), relayed,
                                  used_tokens=used_tokens)
    return _json_encode(body), prefill


def add_usage(usage: Mapping[str, Any], prior: Mapping[str, int]) -> dict[str, Any]:
    """A continuation's usage with the broken attempt's tokens added: the client is
    told what both attempts cost."""
    out = dict(usage)
    for key, n in prior.items():
        if isinstance(out.get(key), int | float) or key not in out:
            out[key] = (out.get(key) or 0) + n
    return out


def model_fingerprint(model: ModelConfig, provider: ProviderConfig) -> str:
    """What a 'cannot continue' mark is valid for: the model's and provider's config."""
    return hashlib.sha256(msgspec.json.encode((model, provider))).hexdigest()[:16]


def _empty_choice(choice: Any) -> bool:
    if not isinstance(choice, dict) or choice.get("finish_reason"):
        return False
    delta = choice.get("delta")
    return not isinstance(delta, dict) or all(k == "role" or not v for k, v in delta.items())


class Seam:
    """Passes a continuation's frames on as the rest of the answer the client has.

    Each frame of the continuing attempt (an OpenAI chunk, as the adapters relay them)
    loses the leading characters that write again the whitespace the prefill was cut
    of (matched character by character, across deltas, up to the first that differs),
    and any reasoning unless the answer broke inside its reasoning; a frame left with
    nothing in it (the continuation's role delta) is dropped; every frame gets the id
    and created time of the answer's first chunk, so the client sees one stream.
    """

    __slots__ = ("_pending", "_keep_reasoning", "id", "created", "prior")

    def __init__(self, prefill: Prefill, relayed: Relayed,
                 prior: Mapping[str, int] | None = None) -> None:
        self._pending = {"content": prefill.cut, "reasoning": prefill.reasoning_cut}
        self._keep_reasoning = prefill.thinking
        self.id, self.created = relayed.id, relayed.created
        self.prior = dict(prior or {})  # the broken attempt's usage, added to the usage chunk

    def _trimmed(self, channel: str, text: str) -> str:
        pending = self._pending[channel]
        if not pending or not text:
            return text
        n = 0
        while n < len(text) and n < len(pending) and text[n] == pending[n]:
            n += 1
        # Settled at the first character that differs, or once all of it came again.
        self._pending[channel] = pending[n:] if n == len(text) else ""
        return text[n:]

    def _delta(self, delta: dict[str, Any]) -> None:
        for key in ("reasoning_content", "reasoning"):
            if key in delta and not self._keep_reasoning:
                del delta[key]
            elif isinstance(delta.get(key), str):
                delta[key] = self._trimmed("reasoning", delta[key])
        if isinstance(delta.get("content"), str):
            delta["content"] = self._trimmed("content", delta["content"])

    def frame(self, frame: bytes) -> bytes | None:
        """The frame to relay instead of `frame`, or None to relay nothing."""
        try:
            chunk = msgspec.json.decode(frame)
        except msgspec.DecodeError:
            return frame  # not ours to judge: the adapter parsed it
        if not isinstance(chunk, dict):
            return frame
        if self.id is not None and "id" in chunk:
            chunk["id"] = self.id
        if self.created is not None and "created" in chunk:
            chunk["created"] = self.created
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            chunk["usage"] = add_usage(usage, self.prior)
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices:
            for choice in choices:
                if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
                    self._delta(choice["delta"])
            if not chunk.get("usage") and all(_empty_choice(c) for c in choices):
                return None
        return _json_encode(chunk)


class _BoundedStream:
    """httpcore2's network stream interface (read, write, aclose, start_tls,
    get_extra_info: duck-typed, httpcore2 only calls them), its read and write bounded
    by a timeout scope only when httpcore2 gives a timeout; subclasses implement the
    unbounded `_read` and `_write`."""

    __slots__ = ()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 (httpcore's interface)
        if timeout is None:
            return await self._read(max_bytes)
        with trio.move_on_after(timeout):
            return await self._read(max_bytes)
        raise httpcore2.ReadTimeout(f"no data within {timeout:g} s")

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 (httpcore's interface)
        if timeout is None:
            return await self._write(buffer)
        with trio.move_on_after(timeout):
            return await self._write(buffer)
        raise httpcore2.WriteTimeout(f"could not send within {timeout:g} s")

    async def _read(self, max_bytes: int) -> bytes:
        raise NotImplementedError

    async def _write(self, buffer: bytes) -> None:
        raise NotImplementedError


class NetStream(_BoundedStream):
    """httpcore's byte stream over one upstream socket, lean on the per-token path.

    httpcore's own trio stream enters a `fail_after` scope and an exception-mapping
    context manager on every read, and trio's socket read adds an async context
    manager, a first `recv` that fails with EAGAIN, and a checkpoint after it. One read
    per relayed token made that about a third of the daemon's CPU per chunk. Here a
    read waits for the socket, then reads once: a token is rarely there before it is
    waited for. Every read is still a checkpoint. The attempt's cancel scope owns the
    deadlines; a timeout scope is entered only where httpcore is given one (connect).
    """

    __slots__ = ("_stream", "_more")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._more = False  # the last read filled its buffer: more is likely waiting

    async def _read(self, max_bytes: int) -> bytes:
        # The descriptor is looked up after every wait: it is -1 once the socket is
        # closed (EBADF), so a number reused by a newer socket is never read.
        sock = self._stream.socket
        try:
            if self._more:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data = os.read(sock.fileno(), max_bytes)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
        except (OSError, ValueError, trio.ClosedResourceError) as e:
            raise httpcore2.ReadError(f"{type(e).__name__}: {e}") from None
        self._more = len(data) == max_bytes
        return data

    async def _write(self, buffer: bytes) -> None:
        sock = self._stream.socket
        view = memoryview(buffer)
        try:
            while view:
                try:
                    view = view[os.write(sock.fileno(), view):]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
        except (OSError, ValueError, trio.ClosedResourceError) as e:
            raise httpcore2.WriteError(f"{type(e).__name__}: {e}") from None

    async def aclose(self) -> None:
        # No checkpoint: httpcore closes under a shield when an attempt is abandoned,
        # and a yield there would hold the failover back by a whole scheduling round
        # (the ledger row, the next attempt) when hundreds of deadlines fire at once.
        self._stream.socket.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:  # noqa: ASYNC109 (httpcore's interface)
        tls = trio.SSLStream(self._stream, ssl_context, server_hostname=server_hostname,
                             https_compatible=True)
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            await self.aclose()
            raise httpcore2.ConnectTimeout(f"TLS handshake took over {timeout:g} s") from None
        except (trio.BrokenResourceError, OSError) as e:
            await self.aclose()
            why = e.__cause__ or e  # trio's error wraps ssl's, which says what failed
            hint = (" (the upstream's certificate is checked against the system's CA store; "
                    "for a private CA, set SSL_CERT_FILE to its bundle)"
                    if isinstance(why, ssl.SSLCertVerificationError) else "")
            raise httpcore2.ConnectError(f"TLS handshake failed: {why or type(why).__name__}"
                                         f"{hint}") from None
        return TLSStream(tls, self._stream)

    def get_extra_info(self, info: str) -> Any:
        return _socket_info(self._stream, info)


class TLSStream(_BoundedStream):
    """The TLS counterpart of NetStream: trio's SSLStream, without a timeout scope
    and a mapping context manager entered on every read."""

    __slots__ = ("_tls", "_raw")

    def __init__(self, tls: trio.SSLStream[trio.SocketStream], raw: trio.SocketStream) -> None:
        self._tls = tls
        self._raw = raw

    async def _read(self, max_bytes: int) -> bytes:
        try:
            return await self._tls.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise httpcore2.ReadError(f"{type(e).__name__}: {e}") from None

    async def _write(self, buffer: bytes) -> None:
        try:
            await self._tls.send_all(buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise httpcore2.WriteError(f"{type(e).__name__}: {e}") from None

    async def aclose(self) -> None:
        await self._tls.aclose()

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._tls  # forwards selected_alpn_protocol(), getpeercert(), ...
        return _socket_info(self._raw, info)


def _socket_info(stream: trio.SocketStream, info: str) -> Any:
    if info == "socket":
        return stream.socket
    if info == "is_readable":  # httpcore's check that an idle connection is still open
        return stream.socket.is_readable()
    if info == "client_addr":
        return stream.socket.getsockname()
    if info == "server_addr":
        return stream.socket.getpeername()
    return None


class NetBackend:
    """httpcore2's connection pools connect through this (see NetStream): its network
    backend interface, duck-typed like _BoundedStream's."""

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[tuple[int, int, int | bytes | None]] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        except trio.TooSlowError:
            raise httpcore2.ConnectTimeout(f"timed out after {timeout:g} s") from None
        except OSError as e:
            raise httpcore2.ConnectError(str(e) or type(e).__name__) from None
        for option in socket_options or ():
            stream.setsockopt(*option)
        return NetStream(stream)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


@functools.cache
def _httpx_errors() -> dict[type[Exception], type[httpx2.TransportError]]:
    """httpcore2's exceptions as the httpx2 ones the engine catches (httpx2's own table
    is in a private module). Base classes are listed so that nothing maps to a vaguer
    type. Built on first use, like everything that touches the network libraries."""
    return {
        httpcore2.ConnectTimeout: httpx2.ConnectTimeout,
        httpcore2.ReadTimeout: httpx2.ReadTimeout,
        httpcore2.WriteTimeout: httpx2.WriteTimeout, httpcore2.PoolTimeout: httpx2.PoolTimeout,
        httpcore2.TimeoutException: httpx2.TimeoutException,
        httpcore2.ConnectError: httpx2.ConnectError, httpcore2.ReadError: httpx2.ReadError,
        httpcore2.WriteError: httpx2.WriteError, httpcore2.NetworkError: httpx2.NetworkError,
        httpcore2.RemoteProtocolError: httpx2.RemoteProtocolError,
        httpcore2.LocalProtocolError: httpx2.LocalProtocolError,
        httpcore2.ProtocolError: httpx2.ProtocolError,
        httpcore2.UnsupportedProtocol: httpx2.UnsupportedProtocol,
        httpcore2.ProxyError: httpx2.ProxyError,
    }


def _httpx_error(e: Exception) -> httpx2.TransportError:
    return _httpx_errors().get(type(e), httpx2.TransportError)(str(e) or type(e).__name__)


class UpstreamTransport:
    """One httpcore2 connection pool, connecting through NetBackend, behind httpx2's
    transport interface (handle_async_request and aclose, duck-typed): an httpx2.Request
    in, an httpx2.Response out, httpcore2's errors as httpx2's. httpcore2 does the rest:
    connections, TLS, keep-alive, the request, the response head, and bodies other than
    streamed replies (H11Body)."""

    __slots__ = ("pool",)

    def __init__(self, ssl_context: ssl.SSLContext, keepalive: int,
                 backend: httpcore2.AsyncNetworkBackend | None = None) -> None:
        self.pool = httpcore2.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=None, max_keepalive_connections=keepalive,
            keepalive_expiry=5.0, http1=True, http2=False, retries=0,
            network_backend=backend or NetBackend())

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        core = httpcore2.Request(
            request.method, httpcore2.URL(scheme=url.raw_scheme, host=url.raw_host,
                                          port=url.port, target=url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        try:
            resp = await self.pool.handle_async_request(core)
        except tuple(_httpx_errors()) as e:
            raise _httpx_error(e) from None
        return httpx2.Response(resp.status, headers=resp.headers,
                               stream=pool_stream_type()(resp.stream),
                               extensions=resp.extensions)

    async def aclose(self) -> None:
        await self.pool.aclose()


@functools.cache
def pool_stream_type() -> type:
    """PoolStream: httpx2 reads a body only from an httpx2.AsyncByteStream subclass, so
    the class is made on first use (see _library)."""

    class PoolStream(httpx2.AsyncByteStream):
        """A response body from an UpstreamTransport: httpcore2's stream, its errors as
        httpx2's; closing it gives the connection back to the pool (or closes it)."""

        __slots__ = ("core",)

        def __init__(self, core: Any) -> None:
            self.core = core  # httpcore2's PoolByteStream

        async def __aiter__(self) -> AsyncIterator[bytes]:
            try:
                async for part in self.core:
                    yield part
            except tuple(_httpx_errors()) as e:
                raise _httpx_error(e) from None

        async def aclose(self) -> None:
            await self.core.aclose()

    return PoolStream


def h11_body(core: Any, *, chunked: bool) -> H11Body | None:
    """The body of a PoolStream's httpcore2 stream read straight from the HTTP/1.1
    connection that received the head, or None if it did not come over one (its
    layout below is httpcore2's; anything unexpected there keeps httpcore2's reader)."""
    conn = getattr(getattr(core, "_stream", None), "_connection", None)
    if not isinstance(conn, httpcore2.AsyncHTTP11Connection):
        return None
    state = getattr(conn, "_h11_state", None)
    net = getattr(conn, "_network_stream", None)
    if (isinstance(state, h11.Connection) and isinstance(net, _BoundedStream)
            and state.their_state is h11.SEND_BODY):
        return H11Body(state, net, chunked=chunked)
    return None


# As httpcore2 reads: one read(2) of up to 64 KiB.
UPSTREAM_READ = 64 * 1024
# What h11 may still hold right after a chunk of a chunked body when nothing more can
# be parsed without new bytes: nothing, or the chunk's closing CRLF (a chunk header
# must come next). Then the next call reads at once instead of asking h11 first.
_CHUNK_GAP = (b"", b"\r", b"\r\n")


class H11Body:
    """A streamed reply's body, read by driving the h11 state machine of the httpcore2
    connection that sent the request and received the head. Per chunk: one read(2),
    one h11 event; no layers of async generators in between.

    It ends (StopAsyncIteration) when h11 has the whole body: the connection is then
    in h11's DONE state, and closing the response returns it to its pool. It raises
    httpx2.RemoteProtocolError when the connection ends before the body does (a cut
    chunk, or no terminating chunk: the engine's `truncated`), httpx2.DecodingError
    when the bytes break HTTP/1.1 framing (bad chunk sizes, an endless chunk header:
    `protocol_error`), and httpx2.ReadError when the socket fails.
    """

    __slots__ = ("_h11", "_net", "_chunked", "_gap", "_eof")

    def __init__(self, state: h11.Connection, net: _BoundedStream, *, chunked: bool) -> None:
        self._h11 = state
        self._net = net
        self._chunked = chunked
        self._gap = False  # the last event was a chunk: check for _CHUNK_GAP
        self._eof = False

    def __aiter__(self) -> H11Body:
        return self

    async def __anext__(self) -> bytes:
        h = self._h11
        # trailing_data copies h11's whole buffer: look at it only when it is this short
        # (h11's buffer length is private; without it, always look).
        held = getattr(h, "_receive_buffer", None)
        read = self._gap and (held is None or len(held) <= 2) \
            and h.trailing_data[0] in _CHUNK_GAP
        while True:
            if not read:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError as e:
                    raise self._broken(e) from None
                if type(event) is h11.Data:
                    self._gap = self._chunked
                    return event.data
                if event is not h11.NEED_DATA or h.their_state is not h11.SEND_BODY:
                    raise StopAsyncIteration  # EndOfMessage: the whole body is in
            read = False
            try:
                data = await self._net._read(UPSTREAM_READ)
            except httpcore2.ReadError as e:
                raise httpx2.ReadError(str(e)) from None
            self._eof = not data
            h.receive_data(data)

    def _broken(self, e: h11.RemoteProtocolError) -> httpx2.HTTPError:
        if self._eof:
            return httpx2.RemoteProtocolError(
                f"the upstream closed the connection before the body ended: {e}")
        return httpx2.DecodingError(f"the upstream broke HTTP/1.1 framing: {e}")


def upstream_body(resp: httpx2.Response) -> AsyncIterator[bytes] | httpx2.AsyncByteStream:
    """The body of a streamed 200: H11Body when it came over an HTTP/1.1 connection
    of failoverd's pools; else the transport's stream (test transports), or httpx2's
    decoding iterator if the server compressed it although we asked it not to."""
    if "content-encoding" in resp.headers:
        return resp.aiter_bytes()
    stream = resp.stream
    # h11 frames a body by chunks exactly when the head names a transfer-encoding.
    chunked = "transfer-encoding" in resp.headers
    body = h11_body(stream.core, chunked=chunked) if isinstance(
        stream, pool_stream_type()) else None
    return stream if body is None else body


# ---------------------------------------------------------------------------
# Attempts
# The daemon's state and slot health, and one request raced down its chain: each
# attempt an object with its own cancel scope, started by a happy-eyeballs launch loop.
# ---------------------------------------------------------------------------

# Bound on closing an upstream response from a cancelled attempt (shielded).
CLOSE_TIMEOUT_S = 1.0
# After [DONE], how long the rest of the body may take before the connection is
# dropped instead of reused (the terminating chunk normally shares [DONE]'s packet).
DRAIN_S = 0.5
# nginx's code for "client closed request"; used in the ledger only.
STATUS_CLIENT_CLOSED = 499
# A request cut off when the shutdown grace ran out.
STATUS_SHUTDOWN = 503


class ClientGone(Exception):
    """Sending to the client failed: it disconnected or stopped reading."""


_CLIENT_GONE = "client went away or stopped reading mid-stream"


# How often the event loop's lag is probed (and the shed share adjusted) while
# requests are in flight, and while none are (an idle daemon stays idle).
LAG_PROBE_S = 0.01
LAG_PROBE_IDLE_S = 0.25
# Shedding: the share of new requests refused moves by this much per probe, up to this.
SHED_STEP = 0.1
SHED_MAX = 0.95
# A new stream is refused only when the loop is this many times later than
# daemon.shed_lag_s: a stream's client waits seconds for the model's first token
# anyway, and a burst of new streams costs the loop once, on the way in.
STREAM_SHED_FACTOR = 10
# Failover storms. When hundreds of attempts time out together (a provider died under
# load), starting every fallback at once puts ~1 ms of work each on the loop in one
# go: the loop then runs a hundred milliseconds behind, so the deadlines still to come
# fire that late and the streams already flowing stall. While the last lag probe woke
# more than FALLBACK_LAG_S late, a request's next attempt waits its turn instead, and
# each probe lets a number start (next_release). Timeouts are then acted on and
# recorded when they fire (500 at once: p99 47 ms late, was 90), at a price: the
# slowest of those fallbacks answered ~10% later (p99 632 ms after the deadline, was
# ~580). Waiting counts against total_timeout_s; a client that hangs up leaves.
FALLBACK_LAG_S = 0.005
FALLBACK_RELEASE_MIN = 2
FALLBACK_RELEASE_MAX = 32
# Learned divisors are saved this often (breaker transitions are saved at once).
STATE_SAVE_EVERY_S = 60.0
# At most this many alert commands run at once; more are dropped (and logged).
MAX_ALERTS_IN_FLIGHT = 4
# A budgeted model's spend is saved at most this often as it grows (and at once when its
# budget runs out): a crash forgets at most this much of the day's spend.
SPEND_SAVE_EVERY_S = 10.0
# Marks an upstream call made for a shadow (or for a request that came so marked): a
# failoverd that receives it never shadows it, so a chain through failoverd itself
# cannot make a shadow spawn shadows.
SHADOW_HEADER = "x-failoverd-shadow"


class SavedBreaker(msgspec.Struct, kw_only=True):
    scope: str
    key: str
    state: str
    opens: int
    open_until: float  # Unix time
    reason: str
    skip: str = "breaker_open"
    hold: bool = False


class SavedSpend(msgspec.Struct, kw_only=True):
    day: str = ""  # UTC date, 2025-06-01
    spent: dict[str, float] = {}


class SavedState(msgspec.Struct, kw_only=True):
    """The state file: what must survive a restart during an outage."""

    version: int = 1
    saved_at: str = ""
    breakers: list[SavedBreaker] = []
    divisors: dict[str, float] = {}
    # Models that rejected a continuation's prefill, with the config they had then
    # (model_fingerprint): unable to continue until that config changes.
    prefill_unable: dict[str, str] = {}
    # Spend today (SPEC section 13): live per model, shadows per route.
    spend: SavedSpend = msgspec.field(default_factory=lambda: SavedSpend())
    shadow_spend: SavedSpend = msgspec.field(default_factory=lambda: SavedSpend())
    deadlines: dict[str, SavedModelDeadlines] = {}


def read_learned_deadlines(path: str) -> tuple[DeadlineLearner | None, str]:
    """For `check`: the deadlines a state file holds, and a line saying where they came
    from (or why there are none)."""
    if not path:
        return None, "learned deadlines: none (daemon.state_file is off)"
    try:
        with open(path, "rb") as f:
            state = msgspec.json.decode(f.read(), type=SavedState)
    except FileNotFoundError:
        return None, f"learned deadlines: none yet (no state file at {path})"
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        return None, f"learned deadlines: none (state file {path} is unreadable: {e})"
    learned = DeadlineLearner.from_saved(state.deadlines, 0.0)
    return learned, f"learned deadlines: {len(learned.models)} model(s) from {path}"


BreakerKey = tuple[str, str]  # (scope, key): ("provider", "a"), ("model", "a/m1"), ...


def credential_key(provider: str, key: str | None) -> str:
    """A credential is a provider and its key: a new key is a new credential."""
    if not key:
        return provider
    return f"{provider}:{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def breaker_keys(slot: Slot, credential: str) -> tuple[BreakerKey, ...]:
    return (("credential", credential), ("provider", slot.provider), ("model", slot.key))


def alert_environment(d: Daemon, environ: Mapping[str, str]) -> dict[str, str]:
    """All the alert command gets besides the event on stdin: PATH and LANG, and facts
    about the daemon. Never its environment, where provider keys live (api_key_env)."""
    return {
        "PATH": environ.get("PATH") or os.defpath,
        "LANG": environ.get("LANG") or "C.UTF-8",
        "FAILOVERD_VERSION": __version__,
        "FAILOVERD_PID": str(os.getpid()),
        "FAILOVERD_SOCKET": d.cfg.daemon.socket,
        "FAILOVERD_LEDGER": d.ledger.path or "",
    }


class Health:
    """The breakers per credential, provider and model, and their I/O: a ledger row,
    a warning on stderr, the alert command and the state file for every transition.
    The rules are Breaker's and BREAKER_EFFECTS'; this class only applies them."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.breakers: dict[BreakerKey, Breaker] = {}
        self.alerts_in_flight = 0
        self.alerts_idle = trio.Event()  # set while no alert command runs
        self.alerts_idle.set()

    def gate(self, slot: Slot, credential: str) -> Gate:
        """Let time pass for the slot's breakers (a row for each that half-opens), then
        say whether they let it through now."""
        now = trio.current_time()
        found = []
        for key in breaker_keys(slot, credential):
            b = self.breakers.get(key)
            if b is not None:
                self._apply(key, b.poll(now))
                found.append(b)
        return gate(found, now)

    def claim(self, slot: Slot, credential: str) -> tuple[BreakerKey, ...]:
        """Claim the probe of each half-open breaker of the slot (see Gate.probe)."""
        return tuple(key for key in breaker_keys(slot, credential)
                     if (b := self.breakers.get(key)) is not None and b.claim_probe())

    def release(self, claim: tuple[BreakerKey, ...]) -> None:
        for key in claim:
            b = self.breakers.get(key)
            if b is not None:
                b.release_probe()

    def force(self, slot: Slot, credential: str, route: str) -> tuple[BreakerKey, ...]:
        """Never blank: every slot is out, so this one is probed regardless."""
        reason = f"every slot of route {route!r} is out; probing the one closest to recovery"
        claim = []
        for key in breaker_keys(slot, credential):
            b = self.breakers.get(key)
            if b is None or b.state == "closed":
                continue
            if b.state == "half_open" and b.probing:
                continue  # another request's probe is in flight: it keeps the verdict
            self._apply(key, b.force_probe(reason))
            claim.append(key)
        return tuple(claim)

    def blocked_until(self, slot: Slot, credential: str | None = None) -> float:
        """When the slot's breakers let it through again, without claiming a probe."""
        until = 0.0
        if credential is None:
            credential = self.d.snap.credential(slot.provider)
        for key in breaker_keys(slot, credential):
            b = self.breakers.get(key)
            if b is not None and b.blocks():
                until = max(until, b.open_until if b.state == "open" else math.inf)
        return until

    def record(self, slot: Slot, credential: str, failure: Failure | None, ttft: float | None,
               *, probe: tuple[BreakerKey, ...] = ()) -> None:
        """Account one attempt's verdict on the slot (BREAKER_EFFECTS)."""
        cfg = self.d.cfg.breakers
        effect = breaker_effect("ok" if failure is None else failure.outcome)
        if failure is not None and effect == "hold":
            self._trip(("model", slot.key), rate_limit_hold(failure.retry_after, cfg),
                       failure.error, skip="rate_limited", hold=True)
        elif failure is not None and effect == "isolate_credential":
            self._trip(("credential", credential), cfg.auth_isolation_s,
                       f"credential isolated: {failure.error}")
        elif failure is not None and effect == "isolate_model":
            self._trip(("model", slot.key), cfg.not_found_isolation_s,
                       f"model isolated: {failure.error}")
        elif effect in ("success", "failure"):
            self._count(slot, credential, effect == "failure",
                        ttft is not None and ttft > cfg.slow_call_s, probe)

    def _count(self, slot: Slot, credential: str, failed: bool, slow: bool,
               probe: tuple[BreakerKey, ...]) -> None:
        now = trio.current_time()
        cfg = self.d.cfg.breakers
        # One jitter draw for the whole slot: breakers opened by the same failures
        # half-open together, so neither holds back the other's probe.
        jitter = self.d.rng.random()
        keys: list[BreakerKey] = [("provider", slot.provider), ("model", slot.key)]
        if not failed and ("credential", credential) in self.breakers:
            keys.append(("credential", credential))  # a working call proves the key
        for key in keys:
            b = self.breakers.setdefault(key, Breaker())
            self._apply(key, b.result(now, failed, slow, cfg, jitter, probe=key in probe))

    def _trip(self, key: BreakerKey, seconds: float, reason: str, *,
              skip: str = "breaker_open", hold: bool = False) -> None:
        b = self.breakers.setdefault(key, Breaker())
        self._apply(key, b.trip(trio.current_time(), seconds, reason, skip=skip, hold=hold))

    def _apply(self, key: BreakerKey, transition: Transition | None) -> None:
        if transition is None:
            return
        old, new, reason, until = transition
        scope, name = key
        reason = scrub(reason, self.d.secrets)
        open_until = None if until is None else utc_timestamp(self.d.wall_time(until))
        row = BreakerRow(ts=utc_timestamp(), scope=scope, key=name, from_=old, to=new,  # type: ignore[arg-type]
                         reason=reason, open_until=open_until)
        self.d.ledger.write(row)
        log.warning("breaker %s %s: %s -> %s (%s)%s", scope, name, old, new, reason,
                    f", open until {open_until}" if open_until else "")
        self.alert(msgspec.json.encode(row))
        self.d.save_state()

    def alert(self, event: bytes) -> None:
        """Run the alert command in the background; never block a request on it."""
        cmd = self.d.cfg.breakers.alert_command
        if not cmd or self.d.background is None:
            return
        if self.alerts_in_flight >= MAX_ALERTS_IN_FLIGHT:
            log.error("alert_command: %d alerts already running; dropped %s",
                      self.alerts_in_flight, event[:200].decode())
            return
        if not self.alerts_in_flight:
            self.alerts_idle = trio.Event()
        self.alerts_in_flight += 1
        self.d.background.start_soon(self._run_alert, cmd, event)

    async def _run_alert(self, cmd: list[str], event: bytes) -> None:
        timeout = self.d.cfg.breakers.alert_timeout_s
        try:
            with trio.move_on_after(timeout) as scope:
                done = await trio.run_process(cmd, stdin=event, capture_stdout=True,
                                              capture_stderr=True, check=False,
                                              env=alert_environment(self.d, os.environ))
            if scope.cancelled_caught:
                log.error("alert_command %s did not finish within %g s and was killed",
                          cmd[0], timeout)
            elif done.returncode:
                log.error("alert_command %s exited %d: %s", cmd[0], done.returncode,
                          scrubbed_prefix(done.stderr.decode("utf-8", "replace"), 300,
                                          self.d.secrets).strip())
        except OSError as e:
            log.error("alert_command %s could not run: %s", cmd[0], e.strerror or e)
        finally:
            self.alerts_in_flight -= 1
            if not self.alerts_in_flight:
                self.alerts_idle.set()

    def snapshot(self) -> list[dict[str, Any]]:
        """The breakers as `GET /status` shows them: a read, with no side effects
        (a cooldown that has ended shows as half_open until a request polls it)."""
        now = trio.current_time()
        window_s = self.d.cfg.breakers.window_s
        out = []
        for (scope, key), b in sorted(self.breakers.items()):
            state = b.view(now)
            recent = [c for c in b.window if c[0] > now - window_s]
            out.append({
                "scope": scope, "key": key, "state": state,
                "failures_in_window": sum(1 for c in recent if c[1]),
                "calls_in_window": len(recent), "consecutive_failures": b.consecutive,
                "open_until": utc_timestamp(self.d.wall_time(b.open_until))
                if state == "open" else None,
                "probing": b.probing,
                "last_reason": b.reason or None,
            })
        return out

    # -- persistence -----------------------------------------------------------

    def saved(self) -> list[SavedBreaker]:
        return [
            SavedBreaker(scope=scope, key=key, state=b.state, opens=b.opens,
                         open_until=self.d.wall_time(b.open_until), reason=b.reason,
                         skip=b.skip, hold=b.hold)
            for (scope, key), b in self.breakers.items() if b.state != "closed" or b.opens
        ]

    def restore(self, saved: list[SavedBreaker]) -> int:
        """Reopen what was open when the daemon stopped; returns how many."""
        now, wall = trio.current_time(), time.time()
        restored = 0
        for sb in saved:
            b = self.breakers.setdefault((sb.scope, sb.key), Breaker())
            # A half-open breaker reopens at once so the next request probes.
            still_open = sb.state in ("open", "half_open")
            b.restore(opens=sb.opens, reason=sb.reason, skip=sb.skip, hold=sb.hold,
                      open_until=now + max(0.0, sb.open_until - wall) if still_open else None)
            restored += still_open
        return restored

    # -- shadows (SPEC section 13) -----------------------------------------------
    # A shadow counts on one breaker of its own, scope "shadow" keyed by its model: a
    # broken candidate stops being called, and no shadow verdict reaches the provider,
    # model or credential breakers of the live chain (another scope: no key can clash).

    def shadow_gate(self, slot: Slot) -> Gate:
        key: BreakerKey = ("shadow", slot.key)
        b = self.breakers.get(key)
        if b is None:
            return Gate()
        now = trio.current_time()
        self._apply(key, b.poll(now))
        return gate([b], now)

    def shadow_claim(self, slot: Slot) -> tuple[BreakerKey, ...]:
        key: BreakerKey = ("shadow", slot.key)
        b = self.breakers.get(key)
        return (key,) if b is not None and b.claim_probe() else ()

    def record_shadow(self, slot: Slot, failure: Failure | None, ttft: float | None, *,
                      probe: tuple[BreakerKey, ...] = ()) -> None:
        """A shadow's verdict, on its own breaker (BREAKER_EFFECTS, as for live slots)."""
        key: BreakerKey = ("shadow", slot.key)
        cfg = self.d.cfg.breakers
        effect = breaker_effect("ok" if failure is None else failure.outcome)
        if failure is not None and effect == "hold":
            self._trip(key, rate_limit_hold(failure.retry_after, cfg), failure.error,
                       skip="rate_limited", hold=True)
        elif failure is not None and effect.startswith("isolate_"):
            seconds = cfg.auth_isolation_s if effect == "isolate_credential" \
                else cfg.not_found_isolation_s
            self._trip(key, seconds, f"shadow isolated: {failure.error}")
        elif effect in ("success", "failure"):
            b = self.breakers.setdefault(key, Breaker())
            self._apply(key, b.result(trio.current_time(), effect == "failure",
                                      ttft is not None and ttft > cfg.slow_call_s, cfg,
                                      self.d.rng.random(), probe=key in probe))


# httpcore2's pool goes through its connections on every request and every response
# close, and asks each idle one whether the server closed it: one poll(2) per idle
# connection per event (httpcore 1.x also scanned in O(n^2); httpcore2 does not).
# Smaller pools divide that: with 1000 streams open on one provider, 64 pools hold ~16
# connections each; at 8 concurrent requests, one or two. Measured on httpcore2 in
# bursts of 500 requests with idle connections kept between them (bench/RESULTS.md,
# session 4): 1 pool 2.4-3.2 ms of CPU per request, 4 pools ~2.0, 16 ~1.8, 64 1.35-1.9
# (16 and 64 alike within the noise), so 64 stays. Each keeps up to 4 idle for 5 s.
POOL_SHARDS = 64
POOL_KEEPALIVE = 4


class PoolShards:
    """A provider's connection pools, taken in turn among twice as many as there are
    requests under way: light traffic stays on the first pool, so its idle connection
    is reused within its keep-alive; under load each pool holds one or two, and the
    pool whose turn it is has likely an idle one."""

    __slots__ = ("pools", "active", "_turn")

    def __init__(self, pools: list[httpx2.AsyncBaseTransport]) -> None:
        self.pools = pools
        self.active = 0  # requests under way on this provider
        self._turn = 0

    @contextlib.contextmanager
    def lease(self) -> Iterator[httpx2.AsyncBaseTransport]:
        self._turn = (self._turn + 1) % min(len(self.pools), 2 * self.active + 1)
        self.active += 1
        try:
            yield self.pools[self._turn]
        finally:
            self.active -= 1

    async def aclose(self) -> None:
        for transport in self.pools:
            await transport.aclose()


class Snapshot:
    """One generation of the config, as requests use it: routes, providers, keys and
    connection pools. A request keeps the snapshot it started with until it ends, so a
    reload never changes or breaks a request in flight; a retired snapshot's pools are
    closed after its last request (those the newer generation still uses are kept)."""

    __slots__ = ("cfg", "keys", "secrets", "routes", "pools", "users", "credentials")

    def __init__(self, cfg: Config, keys: Mapping[str, str | None],
                 pools: dict[str, PoolShards]) -> None:
        self.cfg = cfg
        self.keys = dict(keys)
        self.secrets = [k for k in self.keys.values() if k]
        self.routes = {name: resolve_route(cfg, name, rc) for name, rc in cfg.routes.items()}
        self.pools = pools
        self.users = 0  # requests under way on this snapshot
        self.credentials: dict[str, str] = {}  # provider -> credential_key, filled on use

    def route_for(self, model: str) -> Route | None:
        route = self.routes.get(model)
        if route is None:
            slot = parse_slot(model)
            if slot is not None and slot.provider in self.cfg.providers:
                route = Route(model, (slot,), self.cfg.defaults)
        return route

    def model_cfg(self, slot: Slot) -> ModelConfig:
        return self.cfg.models.get(slot.key, NO_MODEL)

    def credential(self, provider: str) -> str:
        """The breaker key of a provider's credential, hashed once per generation."""
        cred = self.credentials.get(provider)
        if cred is None:
            cred = self.credentials[provider] = credential_key(provider, self.keys.get(provider))
        return cred


# [daemon] keys a reload cannot apply: the listeners are opened once, at start.
RESTART_KEYS = ("socket", "socket_mode", "tcp")


async def in_background(work: Callable[[], Awaitable[None]], what: str) -> None:
    """Work in the daemon's own nursery (probes that outlive their request, shadows,
    alerts): an exception there would stop the daemon, so it is logged and ends only
    this piece of work."""
    try:
        await work()
    except Exception:
        log.exception("%s failed; the daemon goes on", what)


def trio_time() -> float:
    """trio's clock; outside trio.run (a tool, a test saving state), the monotonic clock
    it is based on."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


class Daemon:
    """Everything the daemon knows, passed down; there is no module-level state."""

    def __init__(
        self,
        cfg: Config,
        *,
        ledger: Ledger,
        keys: Mapping[str, str | None] | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.ledger = ledger
        self.rng = rng or random.Random()
        self.transport = transport
        self._tls: ssl.SSLContext | None = None  # one verified context, built on first use
        self.snap = Snapshot(cfg, keys or {}, {n: self._pools(p) for n, p in
                                               cfg.providers.items()})
        self.retired: list[Snapshot] = []  # older generations still in use
        self.health = Health(self)
        self.estimator = Estimator()
        self.deadlines = DeadlineLearner()  # SPEC section 10
        self.throttle = Throttle()
        self.hedges: dict[str, HedgeWindow] = collections.defaultdict(HedgeWindow)
        self.prefill_unable: dict[str, str] = {}  # see SavedState.prefill_unable
        self.inflight: dict[str, Request] = {}
        self.no_inflight = trio.Event()
        self.no_inflight.set()
        self.shutdown = trio.Event()
        self.idle_scopes: set[trio.CancelScope] = set()
        self.first_waits: set[trio.CancelScope] = set()  # new connections, no request yet
        self.connections = 0  # open client connections (admit_connection); a drain waits
        self.no_connections = trio.Event()
        self.no_connections.set()
        # daemon.max_connections when unset (read at start: the limit is raised before)
        self.fd_cap = connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.refusals: dict[int | None, tuple[float, int]] = {}  # uid: (last logged, since)
        self.draining = False
        self.loop_lag = 0.0  # seconds the event loop runs late (see watch_lag)
        self.shed = 0  # requests refused while overloaded
        self.shed_share = 0.0  # the share of new requests being refused (see next_shed_share)
        self.shed_share_streams = 0.0  # the same for streaming requests
        self.idle_probe: trio.CancelScope | None = None  # the lag probe's idle sleep
        self.late = 0.0  # how late the last lag probe woke
        self.fallbacks = trio.lowlevel.ParkingLot()  # next attempts waiting their turn
        self.fallback_release = FALLBACK_RELEASE_MAX  # how many the next probe lets start
        self.started_at = time.time()
        self.urls: dict[str, httpx2.URL] = {}  # upstream URLs, parsed once
        # Where alert commands and probes run; serve() sets it to a nursery that
        # outlives requests.
        self.background: trio.Nursery | None = None
        # Spend budgets and shadows (SPEC section 13). Budget days are UTC days of
        # wall_clock (Unix time), which tests replace to cross a midnight.
        self.wall_clock: Callable[[], float] = time.time
        self.spend = Spend()  # live, per model
        self.shadow_spend = Spend()  # shadows, per route
        self.spend_saved_at = -math.inf
        self.shadows = Shadows(self)
        self.answer_key = os.urandom(32)  # keys answer digests; never leaves this process
        self.state_path = self._state_path(cfg)
        self._state_warned = False
        self.metrics = daemon_metrics(self)  # before any row: they all count
        self.load_state()

    # The current generation of the config; a request uses its own (Request.snap).
    @property
    def cfg(self) -> Config:
        return self.snap.cfg

    @property
    def max_connections(self) -> int:
        """The cap on client connections: a reload that sets it applies at once."""
        return self.cfg.daemon.max_connections or self.fd_cap

    @property
    def routes(self) -> dict[str, Route]:
        return self.snap.routes

    @property
    def keys(self) -> dict[str, str | None]:
        return self.snap.keys

    @property
    def secrets(self) -> list[str]:
        """Every key a request in flight may use: what scrub() removes."""
        if not self.retired:
            return self.snap.secrets
        return list({k for s in (self.snap, *self.retired) for k in s.secrets})

    def wall_time(self, t: float) -> float:
        """A trio clock time as Unix time (for the ledger and the state file)."""
        return time.time() + (t - trio.current_time())

    def _state_path(self, cfg: Config) -> str:
        path = cfg.daemon.state_file
        if path is None:
            path = os.path.join(os.path.dirname(self.ledger.path), "state.json") \
                if self.ledger.path else ""
        return path

    def load_state(self) -> None:
        if not self.state_path:
            return
        try:
            with open(self.state_path, "rb") as f:
                state = msgspec.json.decode(f.read(), type=SavedState)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            log.error("state file %s is unreadable (%s); starting with all breakers closed",
                      self.state_path, e)
            return
        restored = self.health.restore(state.breakers)
        if restored:
            log.warning("restored %d open breaker(s) from %s", restored, self.state_path)
        self.restore_divisors(state.divisors)
        self.deadlines = DeadlineLearner.from_saved(state.deadlines, trio.current_time())
        self.prefill_unable = dict(state.prefill_unable)
        self.spend = Spend(state.spend.day, state.spend.spent)
        self.shadow_spend = Spend(state.shadow_spend.day, state.shadow_spend.spent)

    def restore_divisors(self, divisors: dict[str, float]) -> None:
        self.estimator = Estimator(divisors)

    def divisors(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.estimator.divisors.items())}

    async def autosave(self) -> None:
        """Persist learned divisors and deadlines once a minute when they changed."""
        while True:
            await trio.sleep(STATE_SAVE_EVERY_S)
            if self.estimator.dirty or self.deadlines.dirty or self.spend.dirty \
                    or self.shadow_spend.dirty:
                self.estimator.dirty = self.deadlines.dirty = False
                self.save_state()

    def save_state(self) -> None:
        """Atomically replace the state file; rare (breaker transitions, shutdown)."""
        if not self.state_path:
            return
        state = SavedState(saved_at=utc_timestamp(), breakers=self.health.saved(),
                           divisors=self.divisors(), prefill_unable=self.prefill_unable,
                           deadlines=self.deadlines.to_saved(trio_time()),
                           spend=SavedSpend(day=self.spend.day, spent=self.spend.spent),
                           shadow_spend=SavedSpend(day=self.shadow_spend.day,
                                                   spent=self.shadow_spend.spent))
        self.spend.dirty = self.shadow_spend.dirty = False
        tmp = self.state_path + ".tmp"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # one left by a crash keeps its mode: make a fresh one
            # Open breakers and their reasons are the ledger's business: 0640 like it.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            with open(fd, "wb") as f:
                f.write(msgspec.json.encode(state))
            os.replace(tmp, self.state_path)
        except OSError as e:
            if not self._state_warned:
                self._state_warned = True
                log.error("cannot write state file %s (%s); breakers will not survive a "
                          "restart until this is fixed", self.state_path, e.strerror)

    # -- spend budgets (SPEC section 13) ------------------------------------------

    def charge(self, model: str, usd: float | None, budget: float | None) -> None:
        """A live attempt's billed cost (failed attempts' too), on its model's day."""
        if not usd:
            return
        now = self.wall_clock()
        was_over = self.spend.over(model, now, budget)
        self.spend.add(model, now, usd)
        if budget is None:
            return  # saved with the divisors (autosave), and at shutdown
        if not was_over and self.spend.over(model, now, budget):
            self._budget_spent(model, budget, now)
        elif trio.current_time() - self.spend_saved_at >= SPEND_SAVE_EVERY_S:
            self.spend_saved_at = trio.current_time()
            self.save_state()

    def _budget_spent(self, model: str, budget: float, now: float) -> None:
        resets = utc_timestamp(next_utc_midnight(now))
        spent = round(self.spend.today(model, now), 6)
        log.warning("model %s has spent its budget_usd_per_day = %g ($%.4f today): its slots "
                    "are skipped until %s (UTC midnight); raise the budget and reload to "
                    "serve it sooner", model, budget, spent, resets)
        self.health.alert(msgspec.json.encode({
            "kind": "alert", "ts": utc_timestamp(now), "type": "budget_exhausted",
            "model": model, "budget_usd_per_day": budget, "spent_usd": spent,
            "resets_at": resets}))
        self.save_state()

    def budgets(self) -> dict[str, Any]:
        """Spend today against the budgets, as `GET /status` shows it (and what metrics
        read): live per model, shadows per route. A read, with no side effects."""
        now = self.wall_clock()
        spent, shadow_spent = self.spend.totals(now), self.shadow_spend.totals(now)
        budgets = {k: m.budget_usd_per_day for k, m in self.cfg.models.items()
                   if m.budget_usd_per_day is not None}

        def line(usd: float, budget: float | None) -> dict[str, Any]:
            return {"spent_usd": round(usd, 6), "budget_usd_per_day": budget,
                    "left_usd": None if budget is None else round(max(0.0, budget - usd), 6),
                    "exhausted": budget is not None and usd >= budget}

        return {
            "day": utc_day(now), "resets_at": utc_timestamp(next_utc_midnight(now)),
            "models": [{"model": k, **line(spent.get(k, 0.0), budgets.get(k))}
                       for k in sorted(set(spent) | set(budgets))],
            "shadows": [{"route": name, "model": r.shadow.model, "sample": r.shadow.sample,
                         **line(shadow_spent.get(name, 0.0), r.shadow.budget_usd_per_day)}
                        for name, r in sorted(self.routes.items()) if r.shadow is not None],
        }

    def _pools(self, provider: ProviderConfig) -> PoolShards:
        """Connection pools for one provider. failoverd uses httpx2's transport layer
        directly: no redirects, cookies or auth flows to pay for on every request."""
        if self.transport is not None:
            return PoolShards([self.transport])
        if provider.base_url.startswith("https://"):
            if self._tls is None:  # loading the CA bundle costs ~100 ms and ~5 MB: once
                self._tls = httpx2.create_ssl_context()
            tls = self._tls
        else:  # plain HTTP never uses it (redirects are not followed)
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        return PoolShards([UpstreamTransport(tls, POOL_KEEPALIVE) for _ in range(POOL_SHARDS)])

    async def aclose(self) -> None:
        for snap in (self.snap, *self.retired):
            for shards in snap.pools.values():
                await shards.aclose()

    # -- config generations ----------------------------------------------------

    def acquire(self) -> Snapshot:
        snap = self.snap
        snap.users += 1
        return snap

    def release(self, snap: Snapshot) -> None:
        snap.users -= 1
        if snap is not self.snap and not snap.users and snap in self.retired:
            self.retired.remove(snap)
            self._close_unused(snap)

    def _close_unused(self, old: Snapshot) -> None:
        """Close the pools of a retired generation that no live one uses."""
        live = {id(p) for s in (self.snap, *self.retired) for p in s.pools.values()}
        unused = [p for p in old.pools.values() if id(p) not in live]
        if unused and self.background is not None:
            self.background.start_soon(_close_pools, unused)

    def reload(self, config_path: str) -> str | None:
        """SIGHUP: take a new config and keys; keep the old ones if the new are bad.
        Returns None once the new config serves, else why it was rejected."""
        try:
            cfg = load_config(config_path)
            keys = resolve_keys(cfg, os.environ)
        except ConfigError as e:
            return str(e)  # reload_and_tell logs it and puts it in systemd's STATUS=
        old = self.snap
        changed = [n for n, p in cfg.providers.items()
                   if old.cfg.providers.get(n) != p or old.keys.get(n) != keys.get(n)]
        pools = {n: old.pools[n] if n in old.pools and n not in changed else self._pools(p)
                 for n, p in cfg.providers.items()}
        self.snap = Snapshot(cfg, keys, pools)
        if old.users:
            self.retired.append(old)
        else:
            self._close_unused(old)
        self._apply_daemon_keys(old.cfg.daemon, cfg.daemon)
        log.warning("config reloaded from %s: %d route(s), %d provider(s) changed",
                    config_path, len(self.snap.routes), len(changed))
        return None

    def _apply_daemon_keys(self, old: DaemonConfig, new: DaemonConfig) -> None:
        """Most [daemon] keys are read where they are used; the ledger and the state
        file move now; the listeners only at the next start (said in the log)."""
        if new.ledger != old.ledger:
            self.ledger.path = new.ledger
            self.ledger.reopen()
        self.state_path = self._state_path(self.cfg)
        pending = [f"daemon.{k}" for k in RESTART_KEYS if getattr(old, k) != getattr(new, k)]
        if pending:
            log.warning("config reload: %s changed; the listeners stay as they are until "
                        "failoverd restarts (systemctl restart failoverd)", ", ".join(pending))

    def route_for(self, model: str) -> Route | None:
        return self.snap.route_for(model)

    def can_continue(self, snap: Snapshot, slot: Slot) -> bool:
        """False once the model rejected a prefill, until its config changes."""
        mark = self.prefill_unable.get(slot.key)
        return mark is None or mark != model_fingerprint(
            snap.model_cfg(slot), snap.cfg.providers[slot.provider])

    def cannot_continue(self, snap: Snapshot, slot: Slot, why: str) -> None:
        self.prefill_unable[slot.key] = model_fingerprint(
            snap.model_cfg(slot), snap.cfg.providers[slot.provider])
        log.warning("%s rejected a continuation's prefill (%s); it is not asked to continue "
                    "an answer again until its config changes (models.%r.prefill)",
                    slot.key, why, slot.key)
        self.save_state()

    def model_cfg(self, slot: Slot) -> ModelConfig:
        return self.snap.model_cfg(slot)

    # -- load ------------------------------------------------------------------

    @property
    def overloaded(self) -> bool:
        return self.shed_share > 0

    def should_shed(self, stream: bool) -> bool:
        share = self.shed_share_streams if stream else self.shed_share
        return share > 0 and self.rng.random() < share

    async def watch_lag(self) -> None:
        """Probe how late the event loop wakes up, the measure of overload, and set the
        share of new requests to refuse from it."""
        while True:
            busy = self.inflight or self.shed_share or self.shed_share_streams
            interval = LAG_PROBE_S if busy else LAG_PROBE_IDLE_S
            before = trio.current_time()
            with trio.CancelScope(deadline=before + interval) as probe:
                self.idle_probe = None if busy else probe
                await trio.sleep_forever()
            self.idle_probe = None
            if trio.current_time() < before + interval:
                continue  # a request began: probe at the busy pace from now on
            late = trio.current_time() - before - interval
            self.release_fallbacks(late)
            self.loop_lag = smoothed_lag(self.loop_lag, late)
            limit = self.cfg.daemon.shed_lag_s
            self.shed_share = next_shed_share(self.shed_share, late, limit)
            self.shed_share_streams = next_shed_share(self.shed_share_streams, late,
                                                      limit * STREAM_SHED_FACTOR)

    def release_fallbacks(self, late: float) -> None:
        """At each lag probe: let waiting fallbacks start (see FALLBACK_LAG_S)."""
        self.late = late
        self.fallback_release = next_release(self.fallback_release, late)
        if self.fallbacks:
            self.fallbacks.unpark(count=self.fallback_release)

    def begin(self, req: Request) -> None:
        if self.idle_probe is not None:  # overload can start with the first request
            self.idle_probe.cancel()
        self.inflight[req.request_id] = req
        self.no_inflight = trio.Event() if self.no_inflight.is_set() else self.no_inflight

    def end(self, req: Request) -> None:
        self.inflight.pop(req.request_id, None)
        if not self.inflight:
            self.no_inflight.set()

    def connection_opened(self) -> None:
        if not self.connections:
            self.no_connections = trio.Event()
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1
        if not self.connections:
            self.no_connections.set()

    def status(self) -> dict[str, Any]:
        """What `GET /status` shows; a read with no side effects."""
        now = trio.current_time()
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "draining": self.draining,
            "loop_lag_ms": round(self.loop_lag * 1000, 3), "overloaded": self.overloaded,
            "shed_requests": self.shed,
            "shed_share": round(self.shed_share, 3),
            "shed_share_streams": round(self.shed_share_streams, 3),
            "fallbacks_waiting": len(self.fallbacks),
            "connections": {"open": self.connections, "max": self.max_connections},
            "config_generations": 1 + len(self.retired),
            "in_flight": [req.describe(now) for req in self.inflight.values()],
            "breakers": self.health.snapshot(),
            "routes": route_view(self, now), "time": utc_timestamp(),
            "token_divisors": self.divisors(),
            "deadlines": self.deadlines.snapshot(),
            "budgets": self.budgets(),
            "shadow": self.shadows.status(),
            "ledger": {"path": self.ledger.path, "dropped_rows": self.ledger.dropped},
            "gc": {"frozen_objects": gc.get_freeze_count(), "threshold": list(gc.get_threshold()),
                   "collections": [g["collections"] for g in gc.get_stats()]},
        }


async def _close_pools(pools: list[PoolShards]) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        for shards in pools:
            await shards.aclose()


def _slot_view(d: Daemon, slot: Slot, now: float) -> dict[str, Any]:
    """A slot's breakers as they stand at `now`, read without moving them; a model whose
    day's budget is spent is out until UTC midnight whatever they say."""
    budget = d.snap.model_cfg(slot).budget_usd_per_day
    wall = d.wall_clock()
    if budget is not None and d.spend.over(slot.key, wall, budget):
        return {"slot": slot.key, "state": "budget",
                "left_s": round(next_utc_midnight(wall) - wall, 3), "breaker": None,
                "reason": f"budget_usd_per_day = {budget:g} spent"}
    worst: tuple[float, str, str, str] = (0.0, "closed", "", "")  # (until, state, by, reason)
    probe = False
    for scope, key in breaker_keys(slot, d.snap.credential(slot.provider)):
        b = d.health.breakers.get((scope, key))
        if b is None:
            continue
        state, until = breaker_state_at(b, now)
        probe = probe or state == "half_open"
        if until > worst[0]:
            worst = (until, state, f"{scope} {key}", b.reason)
    until, state, by, reason = worst
    if until:  # out: open, or half-open with its probe in flight
        return {"slot": slot.key, "state": "probing" if state == "half_open" else "open",
                "left_s": None if until == math.inf else round(until - now, 3),
                "breaker": by, "reason": reason}
    return {"slot": slot.key, "state": "probe" if probe else "ok", "left_s": None,
            "breaker": None, "reason": None}


def route_view(d: Daemon, now: float) -> list[dict[str, Any]]:
    """Which slot would answer each route now, from the breakers alone and without
    side effects (no probe claimed, no transition written): the first slot no breaker
    holds out; when every slot is out, the one closest to recovery is probed (never
    blank); a slot out of its day's budget never answers. What only a request knows (its
    size against context windows, its TPM share, a provider that timed out earlier in
    it) is not part of the view."""
    out = []
    for name, route in sorted(d.routes.items()):
        slots = [_slot_view(d, slot, now) for slot in route.slots]
        free = [s for s in slots if s["state"] in ("ok", "probe")]
        blocked = [s for s in slots if s["state"] != "budget"]
        if free:
            answers, how = free[0]["slot"], "probe" if free[0]["state"] == "probe" else "ok"
        elif blocked:
            answers = min(blocked, key=lambda s: math.inf if s["left_s"] is None
                          else s["left_s"])["slot"]
            how = "forced probe"
        else:
            answers, how = None, "budget_exhausted"  # the route answers 429
        out.append({"route": name, "answers": answers, "how": how, "slots": slots})
    return out


class Reply:
    """The client side of one request; the front end implements it over h11."""

    async def start(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                    *, final: bool = False) -> None:
        raise NotImplementedError

    async def send(self, frame: bytes) -> None:
        """Relay one SSE event's data (`frame`) as a `data:` event."""
        raise NotImplementedError

    def relay_now(self, frame: bytes) -> bytes | None:
        """Relay an event's data without waiting, if the socket takes it: b"" when all
        of it went out, else the framed rest for `send_raw`; None when there is no such
        path."""
        return None

    async def send_raw(self, framed: bytes) -> None:
        raise NotImplementedError

    async def finish(self, data: bytes, settle: Callable[[bool], None]) -> None:
        """The last bytes of a started reply, and its end. `settle(delivered)` is called
        once, in the same step as the last byte reaches the kernel (no checkpoint in
        between), or with False when the client is gone: a reply the client saw
        complete always has its request row."""
        raise NotImplementedError

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      settle: Callable[[bool], None]) -> None:
        """A whole reply in one go, settled like `finish`."""
        raise NotImplementedError

    def abort(self) -> None:
        """A write was cut short: the framing is broken, nothing more may be sent."""
        raise NotImplementedError


def error_body(
    message: str, *, type_: str, code: str | None = None, param: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "code": code,
                                      "param": param}}
    if extra:
        body["failoverd"] = extra
    return body


class Timings:
    """When one attempt began, saw its first and last meaningful output, and the longest
    gap between two, in trio clock seconds."""

    __slots__ = ("began", "first", "last", "max_gap")

    def __init__(self, began: float) -> None:
        self.began = began
        self.first: float | None = None
        self.last = began
        self.max_gap = 0.0

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.began


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# Why an attempt was cancelled on purpose (Attempt.cancel_reason), for its row.
CANCEL_TEXT = {
    "hedge_lost": "another attempt answered first",
    "client_disconnected": "client went away",
    "shutdown": "failoverd was shutting down and the grace period ran out",
}


class Attempt:
    """One try of one slot, raced by its Request.

    It owns its cancel scope and the name of the deadline armed in it (first_token,
    then stall after each meaningful output; client_write while the client takes a
    write; drain after [DONE]; total when the request's deadline is nearer; connecting
    is bounded by httpx's own connect timeout inside the first-token window), the
    half-open probes it holds (released in its own `finally` on every path), its stream
    state, and its one ledger row. Expected failures are caught here and kept as data
    (`failure`); the request learns the outcome from `Request.attempt_ended`.
    """

    def __init__(self, req: Request, slot: Slot, *, claim: tuple[BreakerKey, ...],
                 hedge: bool, retry: bool, continues: tuple[Attempt, Failure] | None = None,
                 ) -> None:
        self.req = req
        self.slot = slot
        self.index = req.next_index()
        self.claim = claim  # half-open probes held
        self.probe = bool(claim)
        self.hedge = hedge  # started beside a running attempt (a hedge or a probe's race)
        self.raced = False  # a probe that has had the next slot started beside it
        self.retried = retry  # the slot's one retry (SPEC section 5)
        # The committed attempt that broke, and how, when this one continues its answer.
        self.continues = continues
        self.prefill: Prefill | None = None
        self.seam: Seam | None = None
        self.tokens: tuple[int | None, int | None] = (None, None)  # in, out (see _row)
        self.credential = req.snap.credential(slot.provider)
        self.model_cfg = req.snap.model_cfg(slot)
        self.scope = trio.CancelScope()
        self.armed = "first_token"
        self.cancel_reason: str | None = None  # set by whoever cancels it on purpose
        self.detached = False  # a probe that lost the race, running on to its verdict
        self.st = StreamState(assemble=not req.stream, want_usage=req.want_usage)
        if req.stream and req.compares:
            self.st.record = ChoiceAcc()
        self.t = Timings(trio.current_time())
        self.failure: Failure | None = None
        self.ended = False
        self.writing = False  # a write to the client is under way
        self.pending: list[bytes] = []  # frames held until commit
        d = req.d
        self.reserve = output_reserve(req.body, self.model_cfg)
        self.estimate = d.estimator.estimate(slot.key, req.body_size)
        # This slot's deadlines (SPEC section 10): the model's pin, else learned from its
        # history within the bounds, else the route's; arm() clips them by the total.
        sd = slot_deadlines(req.route.timing, self.model_cfg)
        self.configured = (sd.first_token_s, sd.stall_s)
        self.first_token_s = d.deadlines.first_token_deadline(
            slot.key, self.estimate, sd.first_token_s, sd.first_token, math.inf)
        self.stall_s = d.deadlines.stall_deadline(slot.key, sd.stall_s, sd.stall, math.inf)
        d.throttle.add(slot.key, self.t.began, self.estimate + self.reserve, self.model_cfg)
        window = self.model_cfg.context_window
        # A model that truncates silently may only be trusted once its usage is in:
        # hold the commit when the prompt could, at worst, reach its truncation zone.
        self.holding = req.stream and self.model_cfg.truncates_silently and bool(window) \
            and Estimator.worst_case(req.body_size) >= (window or 0) - self.reserve

    # -- the attempt's task ----------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except trio.Cancelled:  # the request is torn down around it (client gone, shutdown)
            if self.writing:
                self.req.reply.abort()
            # A loser stays a loser; a detached probe outlived its request's reason.
            reason = self.cancel_reason or ("shutdown" if self.req.d.draining
                                            else self.req.cancel_reason)
            self.failure = Failure(reason, CANCEL_TEXT[reason])
            raise
        finally:
            self._end()
            self.req.d.health.release(self.claim)
            if self.detached:
                self.req.d.release(self.req.snap)

    async def _run(self) -> None:
        self.arm(self.t.began + self.first_token_s, "first_token")
        with self.scope:
            try:
                await self._exchange()
            except Failure as f:
                self.failure = f
            except Exception as e:  # a bug or an upstream reply we did not foresee
                log.exception("request %s: %s: unexpected error handling the upstream reply; "
                              "treated as a protocol error", self.req.request_id, self.slot.key)
                self.failure = Failure("protocol_error", f"failoverd could not handle the "
                                                         f"reply: {type(e).__name__}: {e}")
        if self.scope.cancelled_caught and not self.st.complete:
            self.failure = self._cancelled()

    def arm(self, deadline: float, kind: str) -> None:
        """Set the attempt's deadline, clipped by the request's total deadline (a
        detached probe answers to its own deadlines only)."""
        if deadline < self.req.deadline or self.detached:
            self.scope.deadline = deadline
            self.armed = kind
        else:
            self.scope.deadline = self.req.deadline
            self.armed = "total"

    def lose(self) -> None:
        """Another attempt answered first: stop at once."""
        self.cancel_reason = "hedge_lost"
        self.scope.cancel(reason=CANCEL_TEXT["hedge_lost"])

    def detach(self) -> None:
        """A probe that lost the race runs on, away from the client, until its first
        token proves the slot or its first-token deadline fails it: a probe that hangs
        keeps the slot out, one that is only slower than the fallback brings it back."""
        self.detached = True
        self.req.snap.users += 1  # its pools stay open until it ends (see run)
        self.arm(self.t.began + self.first_token_s, "first_token")

    def stop(self, reason: str) -> None:
        """The request ended (the client went away, shutdown): stop now, unless this is
        a probe that lost the race and runs on to its verdict."""
        if self.detached or self.cancel_reason is not None:  # detached, or already stopped
            return
        self.cancel_reason = reason
        self.scope.cancel(reason=CANCEL_TEXT[reason])

    def _cancelled(self) -> Failure:
        """Why the scope was cancelled: on purpose, or the armed deadline."""
        if self.cancel_reason is not None:
            return Failure(self.cancel_reason, CANCEL_TEXT[self.cancel_reason])
        if self.writing:  # cut mid-write: the framing is broken
            self.req.reply.abort()
        if self.armed == "client_write":
            return Failure("client_disconnected", "client stopped reading for "
                           f"{self.req.d.cfg.daemon.client_write_timeout_s:g} s")
        return Failure(f"{self.armed}_timeout", self._timeout_text())

    def _timeout_text(self) -> str:
        st = self.st
        ft, stall = self.configured
        if self.armed == "first_token":
            text = (f"no output within first_token_timeout_s = {ft:g} s"
                    if self.first_token_s == ft else
                    f"no output within {self.first_token_s:g} s, the first-token deadline "
                    "learned for this model")
        elif self.armed == "stall":
            text = (f"no output for stall_timeout_s = {stall:g} s after output began"
                    if self.stall_s == stall else
                    f"no output for {self.stall_s:g} s after output began, the stall deadline "
                    "learned for this model")
        else:
            text = f"total_timeout_s = {self.req.route.timing.total_timeout_s:g} s ran out"
        # Before the first token every decoded frame was empty; after it, only comments count.
        ignored = st.sse.heartbeats + (st.events if self.armed == "first_token" else 0)
        return text + (f"; {ignored} heartbeat(s) or empty frame(s) ignored" if ignored else "")

    def _end(self) -> None:
        """Once, on every path: settle the outcome, write the row, teach the deadlines,
        tell the breakers and the request."""
        if self.ended:
            return
        self.ended = True
        req = self.req
        self.failure = f = self._settle()
        self._row()
        self._learn_deadlines(f)
        # A probe's verdict closes or reopens its breakers; one that proved nothing is
        # released in run()'s finally.
        req.record(self, f)
        if f is not None and f.outcome not in ("client_disconnected", "hedge_lost"):
            log.info("request %s: %s %s (%s)", req.request_id, self.slot.key, f.outcome, f.error)
        if not self.detached:
            req.attempt_ended(self)

    def _settle(self) -> Failure | None:
        """The attempt's final outcome, and what it teaches the token estimator: an
        answer's reported prompt size, or an overflow; a truncation the tripwire suspects
        or a refused prefill turns into its own outcome. Errors leave here scrubbed."""
        req, d, f = self.req, self.req.d, self.failure
        if f is None:
            f = self._tripwire()
            if f is None and self.st.tokens_in:
                d.estimator.observe(self.slot.key, req.body_size, self.st.tokens_in)
        elif self.continues is not None and f.outcome == "bad_request" and prefill_rejected(
                f.status, f.body, self.prefill.index if self.prefill else None):
            f.outcome = "prefill_rejected"  # never shown to the client (see Request._in_band)
            d.cannot_continue(req.snap, self.slot, f.error)
        elif f.outcome == "context_overflow":
            reported = reported_prompt_tokens(f.error)
            window = self.model_cfg.context_window
            d.estimator.overflowed(self.slot.key, req.body_size, window, reported)
            req.min_window = max(req.min_window, window or reported or self.estimate)
        if f is not None:
            f.error = scrub(f.error, req.snap.secrets)
        return f

    def _learn_deadlines(self, f: Failure | None) -> None:
        """Teach the model's deadlines: answers are observations, its own timeouts are
        censored ones (a deadline is never pulled down by them; see LearnedDeadline)."""
        learner, t, now = self.req.d.deadlines, self.t, trio.current_time()
        key = self.slot.key
        if f is None and t.ttft is not None:
            learner.observe_answer(key, t.ttft, self.estimate, t.max_gap or None, now)
        elif f is not None and f.outcome == "first_token_timeout":
            learner.observe_timeout(key, "first_token", now - t.began, self.estimate, now)
        elif f is not None and f.outcome == "stall_timeout":
            learner.observe_timeout(key, "stall", self.stall_s, self.estimate, now)

    def _tripwire(self) -> Failure | None:
        """A silently truncating model that reports a prompt filling its window has
        most likely dropped part of it: never pass that answer off as good."""
        cfg, st, req = self.model_cfg, self.st, self.req
        if not cfg.truncates_silently or not truncation_suspected(
                st.tokens_in, cfg.context_window, self.reserve):
            return None
        window = cfg.context_window or 0
        req.tripped = True
        req.min_window = max(req.min_window, window)
        error = (f"suspected silent truncation: {self.slot.key} reported {st.tokens_in} prompt "
                 f"tokens, at or above its context_window {window} minus {self.reserve} "
                 "reserved for output")
        log.warning("request %s: %s", req.request_id, error)
        req.d.health.alert(msgspec.json.encode({
            "kind": "alert", "ts": utc_timestamp(), "type": "silent_truncation",
            "request_id": req.request_id, "route": req.route.name, "slot": self.slot.key,
            "prompt_tokens": st.tokens_in, "context_window": window}))
        return Failure("context_overflow", error, status=200)

    def _row(self) -> None:
        st, t, f = self.st, self.t, self.failure
        tokens_in, tokens_out = st.tokens_in, st.tokens_out
        estimated = False
        if tokens_in is None:
            tokens_in, estimated = self.estimate, True
        if tokens_out is None and st.out_chars:
            tokens_out, estimated = math.ceil(st.out_chars / OUTPUT_CHARS_PER_TOKEN), True
        self.tokens = (tokens_in, tokens_out)
        # A call that produced output may be billed; one that produced none is not.
        cost = cost_usd(self.model_cfg, tokens_in, tokens_out) if t.first is not None else None
        self.req.charge(self, cost)
        self.req.row(
            self.slot, self.index, f.outcome if f else "ok",
            status=f.status if f else 200, error=f.error if f else None,
            ttft_ms=_ms(t.ttft), latency_ms=_ms(trio.current_time() - t.began),
            max_gap_ms=_ms(t.max_gap) if t.first is not None else None,
            committed=self.req.committed and self.req.winner is self,
            tokens_in=tokens_in, tokens_out=tokens_out, tokens_estimated=estimated,
            cost_usd=cost,
            first_token_deadline_s=self.first_token_s, stall_deadline_s=self.stall_s,
            hedge=self.hedge, probe=self.probe, continued=self.continues is not None,
            **self.req.answer_fields(self))

    # -- talking to the upstream -----------------------------------------------

    async def _exchange(self) -> None:
        req, slot = self.req, self.slot
        snap = req.snap
        provider = snap.cfg.providers[slot.provider]
        adapter = ADAPTERS[provider.kind]
        try:
            url, headers, payload = adapter.request(
                provider.base_url, slot.model, req.body, snap.keys.get(slot.provider),
                self.model_cfg)
            if self.continues is not None:
                payload = self._continuation(provider.kind, payload)
        except Exception as e:  # the request could not be translated: not the upstream's fault
            raise Failure("bad_request", f"failoverd cannot send this request to {slot.key}: "
                                         f"{type(e).__name__}: {e}", status=400) from None
        if provider.headers:
            headers = {**provider.headers, **headers}
        if req.marked:
            headers[SHADOW_HEADER] = "1"
        # Only the connect timeout is httpx's; the attempt's cancel scope owns the rest
        # (httpx's default 5 s read timeout would fight it).
        timeout = {"connect": provider.connect_timeout_s, "read": None, "write": None,
                   "pool": None}
        urls = req.d.urls
        parsed = urls.get(url)
        if parsed is None:
            parsed = urls[url] = httpx2.URL(url)
        request = httpx2.Request("POST", parsed, headers=headers, content=payload,
                                extensions={"timeout": timeout})
        with snap.pools[slot.provider].lease() as pool:
            await self._call(pool, request, adapter, provider)

    def _continuation(self, kind: str, payload: bytes) -> bytes:
        """The request as a continuation of what the client has (SPEC section 11)."""
        assert self.continues is not None
        assert self.req.relayed is not None
        broken, relayed = self.continues[0], self.req.relayed
        tokens_in, tokens_out = broken.tokens
        payload, self.prefill = continue_payload(kind, self.model_cfg.prefill, payload, relayed,
                                                 used_tokens=tokens_out)
        self.seam = Seam(self.prefill, relayed, prior={
            "prompt_tokens": tokens_in or 0, "completion_tokens": tokens_out or 0,
            "total_tokens": (tokens_in or 0) + (tokens_out or 0)})
        return payload

    async def _call(self, pool: httpx2.AsyncBaseTransport, request: httpx2.Request, adapter: Any,
                    provider: ProviderConfig) -> None:
        try:
            resp = await pool.handle_async_request(request)
        except httpx2.TimeoutException:
            raise Failure("connect_error", f"connect timed out after "
                                           f"{provider.connect_timeout_s:g} s",
                          timeout=True) from None
        except httpx2.HTTPError as e:
            raise Failure("connect_error", f"{type(e).__name__}: {e}") from None
        st = self.st
        try:
            await self._consume(adapter, resp)
        except httpx2.HTTPError as e:
            if st.complete:
                return  # the answer was whole; only the connection's end was untidy
            outcome = ("protocol_error" if isinstance(e, httpx2.DecodingError)
                       else "truncated" if self.t.first is not None else "connect_error")
            raise Failure(outcome, f"{type(e).__name__} after {st.events} event(s): {e}") from None
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await resp.aclose()

    async def _consume(self, adapter: Any, resp: httpx2.Response) -> None:
        st = self.st
        status = resp.status_code
        if status != 200:
            body = await _read_limited(resp, ERROR_BODY_LIMIT)
            outcome, error = classify_status(status, body, self.req.snap.secrets)
            retry_after = (parse_retry_after(resp.headers, time.time())
                           if outcome == "rate_limited" else None)
            raise Failure(outcome, error, status=status, body=body, retry_after=retry_after)
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            if "json" not in ctype:
                raise Failure("protocol_error", f"200 with content-type {ctype!r}, expected "
                                                "text/event-stream", status=200)
            body = await _read_limited(resp, WHOLE_BODY_LIMIT, over="200 JSON body")
            await self._digested(adapter.whole_body(body, st))
            return
        sse = st.sse
        on_event = adapter.on_event
        body = upstream_body(resp)
        async for chunk in body:
            if st.done:
                continue  # drain to the end, so the connection goes back to the pool
            for event, data in sse.feed(chunk):
                await self._digested(on_event(event, data, st))
                if st.done:
                    # Well-behaved servers end the body right after [DONE]; one
                    # that does not is left after a short grace, not waited on.
                    drain_at = trio.current_time() + DRAIN_S
                    if drain_at < self.scope.deadline:
                        self.scope.deadline, self.armed = drain_at, "drain"
                    break
        for event, data in () if st.done else sse.close():
            await self._digested(on_event(event, data, st))
        if st.done or st.finish_reason:
            if self.t.first is None:
                raise Failure("protocol_error", "stream completed without any output", status=200)
            return
        if sse.junk and not st.events:
            raise Failure("protocol_error", f"{sse.junk} line(s) that are not SSE, no data",
                          status=200)
        raise Failure("truncated", f"stream ended without [DONE] or finish_reason after "
                                   f"{st.events} event(s)", status=200)

    # -- relaying --------------------------------------------------------------

    def _first_output(self) -> None:
        """The first meaningful output: a probe has proved its slot; then the attempt
        wins the race, or stops if another already has."""
        if self.claim:
            self.req.record(self, None)
            self.claim = ()
        if self.detached:
            raise Failure("hedge_lost", "answered after another slot had won the race; it "
                                        "proved its slot and was stopped")
        if not self.req.claim_win(self):
            raise Failure("hedge_lost", CANCEL_TEXT["hedge_lost"])

    async def _digested(self, frame: bytes | None) -> None:
        """After an event: move the deadline on progress, commit, relay.

        No output is dropped: if the deadline fired before this event could be handled
        (a late event loop), the attempt ends as that timeout, so the client gets a
        failover or an in-band error, never an answer with a hole in it. (Before commit,
        frames with no output past MAX_PENDING_FRAMES are not kept: they carry nothing.)
        """
        st, t, req = self.st, self.t, self.req
        if frame is not None and self.seam is not None:
            frame = self.seam.frame(frame)  # only what follows the text the client has
        if st.progress:
            st.progress = False
            now = trio.current_time()
            if t.first is None:
                t.first = now
                self._first_output()
            elif now - t.last > t.max_gap:
                t.max_gap = now - t.last
            t.last = now
            stall_at = now + self.stall_s
            if req.stream and not self.holding:
                if self.scope.cancel_called:
                    raise self._cancelled()
                if not req.committed:
                    if frame is not None:
                        self.pending.append(frame)
                    await self._write(None, stall_at, "stall")
                elif frame is not None:
                    await self._write(frame, stall_at, "stall")
                else:
                    self.arm(stall_at, "stall")
                return
            self.arm(stall_at, "stall")
        if frame is not None and req.stream:
            if req.committed:
                if self.scope.cancel_called:
                    raise self._cancelled()
                await self._write(frame, self.scope.deadline, self.armed)
            elif self.holding or len(self.pending) < MAX_PENDING_FRAMES:
                self.pending.append(frame)

    async def _write(self, frame: bytes | None, upstream_deadline: float, kind: str) -> None:
        """Commit (frame None) or relay one frame under the client's own deadline, then
        give the upstream its deadline back, extended by the time the write took: a
        client slow to read is never an upstream stall, and one that stops reading is
        dropped after client_write_timeout_s. A client that is reading takes the
        frame at once, in one write(2) and without a checkpoint (the upstream's deadline
        is simply set to the one this output earned)."""
        reply = self.req.reply
        rest = None
        if frame is not None:
            if self.req.relayed is not None and self.continues is None:
                self.req.relayed.add(frame)
            try:
                rest = reply.relay_now(frame)
            except ClientGone:
                raise Failure("client_disconnected", _CLIENT_GONE) from None
            if rest == b"":
                self.arm(upstream_deadline, kind)
                return
        before = trio.current_time()
        self.arm(before + self.req.d.cfg.daemon.client_write_timeout_s, "client_write")
        self.writing = True
        if frame is None:
            await self.req.commit(self)
        else:
            try:
                await (reply.send(frame) if rest is None else reply.send_raw(rest))
            except ClientGone:
                raise Failure("client_disconnected", _CLIENT_GONE) from None
        self.writing = False
        waited = trio.current_time() - before
        self.arm(upstream_deadline + waited, kind)
        self.t.last += waited  # gaps are the upstream's own: not time spent on the client


class Request:
    """One client request raced down its route's chain.

    The chain is a launch loop in the shape of trio's happy-eyeballs code (`race`):
    start an attempt, then wait for it to fail or for its hedge delay; a failure
    starts the next slot at once, a hedge delay starts the next one beside it. The
    first attempt with meaningful output wins (`claim_win`) and stops the others.
    Sequential failover is the case without a hedge. The request row is written in
    one place, `finish`, as the reply's last byte leaves.
    """

    def __init__(
        self, d: Daemon, snap: Snapshot, route: Route, body: dict[str, Any], *, stream: bool,
        peer: Peer, reply: Reply, request_id: str, body_size: int, marked: bool = False,
    ) -> None:
        self.d = d
        self.snap = snap
        self.route = route
        self.body = body
        self.stream = stream
        self.peer = peer
        self.reply = reply
        self.request_id = request_id
        self.body_size = body_size
        self.want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.started = trio.current_time()
        self.deadline = self.started + route.timing.total_timeout_s
        self.cancel_reason = "client_disconnected"
        self.nursery: trio.Nursery | None = None
        self.racing = False  # the race's nursery is open: attempts may still start
        self.changed = trio.Event()  # set (and replaced) whenever an attempt ends or wins
        self.running: list[Attempt] = []
        self.rows = 0  # attempt rows (tries and skips) so far: the next attempt's index
        self.cursor = 0  # the next chain position to consider
        self.retry_due: tuple[Slot, float] | None = None  # (slot, wait) after a failure
        self.failed_over = False  # a failure the launch loop has not acted on yet
        self.extra_used = False  # the one hedge of this request (probes are raced apart)
        self.winner: Attempt | None = None
        self.answer: Attempt | None = None  # the winner, once its answer is complete
        self.verdict: tuple[Attempt, Failure] | None = None  # a failure that ends the request
        self.committed = False  # bytes of a streamed answer went to the client
        self.failures: list[tuple[Slot, Failure]] = []
        self.timed_out: set[str] = set()
        self.blocked: list[tuple[float, int, Slot]] = []  # out on a breaker, until when
        self.min_window = 0  # after a context overflow: only larger windows
        self.tripped = False  # the silent-truncation tripwire fired
        self.redispatched = False
        self.context_skips: list[tuple[Slot, int, int]] = []  # (slot, needed, window)
        self.other_skips = 0  # slots skipped for a reason other than their window
        self.served_by: Slot | None = None
        self.client_ttft: float | None = None
        self.status = 200
        self.row_written = False
        self.keep_alive = True  # False: the client pipelined more than we keep
        # What a streaming client has of the answer, where it may be continued.
        self.relayed = Relayed(body) if stream and route.timing.continuation else None
        self.continued = False
        self.budget_skips: list[Slot] = []  # slots out of their day's budget
        # A shadow, or a request that came marked as serving one (SHADOW_HEADER): never
        # sampled, so no shadow ever has a shadow; it marks its own upstream calls.
        self.marked = marked
        self.sampled = not marked and d.shadows.sample(snap, route)
        self.compares = self.sampled  # its answer's fingerprint goes in its row
        if route.timing.hedge_after_s is not None or route.timing.hedge_quantile is not None:
            d.hedges[route.name].request(self.started)

    @property
    def settled(self) -> bool:
        return self.answer is not None or self.verdict is not None

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def next_index(self) -> int:
        self.rows += 1
        return self.rows - 1

    # -- the race --------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        """Race the chain, then deliver the reply. Attempts that run beside another (a
        hedge, a probe's racing partner, a continuation) are started in `nursery`, which
        the caller keeps open until this returns; probes run in the daemon's nursery
        (they may outlive the request); the sequential case spawns nothing."""
        self.d.begin(self)
        try:
            self.nursery, self.racing = nursery, True
            try:
                await self.race()
            finally:
                self.racing = False
            self.stop_others(None)  # settled: nothing else may answer
            await self.deliver()
        except Exception:
            self.status = 500
            raise
        finally:
            for a in list(self.running):  # probes run in the daemon's nursery
                a.stop(self.cancel_reason)
            if not self.row_written and self.status == 200:  # cancelled: no reply went out
                self.status = STATUS_SHUTDOWN if self.cancel_reason == "shutdown" \
                    else STATUS_CLIENT_CLOSED
            self.finish()
            self.d.release(self.snap)
            self.d.end(self)
            self.d.shadows.after(self)  # the reply is complete: its shadow may start

    async def race(self) -> None:
        newest = await self.go(await self.start_next())
        while (self.running or self.failed_over) and not self.settled:
            if self.failed_over:
                self.failed_over = False
                if self.winner is None:
                    newest = await self.go(await self.start_next()) or newest
                continue
            changed = self.changed
            with trio.move_on_at(self.hedge_at(newest)) as timer:
                await changed.wait()
            # A timer that fired as `newest` failed starts no hedge: the failover does.
            if timer.cancelled_caught and not newest.ended and not self.failed_over:
                newest = await self.hedge(newest) or newest

    async def go(self, a: Attempt | None) -> Attempt | None:
        """Start `a`. When nothing may run beside it (no other attempt, no hedge, not a
        probe: the sequential case) it runs in the request's own task, which saves a
        task and two scheduling rounds per request; otherwise in the nursery."""
        if a is not None:
            if len(self.running) == 1 and math.isinf(self.hedge_at(a)):
                await a.run()
            else:
                self.spawn(a)
        return a

    def spawn(self, a: Attempt) -> None:
        # A probe may outlive its request (see Attempt.detach): it runs in the daemon's
        # nursery, everything else in the request's.
        if a.probe and self.d.background is not None:
            self.d.background.start_soon(in_background, a.run, f"the probe of {a.slot.key}")
            return
        assert self.nursery is not None
        self.nursery.start_soon(a.run)

    def hedge_at(self, newest: Attempt | None) -> float:
        """When to start an attempt beside `newest`, if it is still silent: every probe is
        raced after probe_hedge_after_s (a hung probe costs its client no more); any other
        attempt, alone, after the route's hedge delay, once per request. Never after a
        winner."""
        if newest is None or newest.ended or self.winner is not None:
            return math.inf
        t = self.route.timing
        if newest.probe:
            return math.inf if newest.raced else newest.t.began + t.probe_hedge_after_s
        if self.extra_used or len(self.running) != 1:
            return math.inf
        delay = self.hedge_delay(newest)
        return math.inf if delay is None else newest.t.began + delay

    def hedge_delay(self, a: Attempt) -> float | None:
        """hedge_quantile: the model's learned first-token quantile for this prompt's
        size, never below hedge_min_s; until it is learned, hedge_after_s (if set)."""
        t = self.route.timing
        if t.hedge_quantile is not None:
            q = self.d.deadlines.first_token_quantile(a.slot.key, a.estimate, t.hedge_quantile)
            if q is not None:
                return max(t.hedge_min_s, q)
        return t.hedge_after_s

    async def hedge(self, newest: Attempt) -> Attempt | None:
        if newest.probe:
            newest.raced = True
            a = await self.start_next(hedge=True)
            if a is not None:
                self.spawn(a)
            return a
        self.extra_used = True
        window = self.d.hedges[self.route.name]
        now = trio.current_time()
        if not window.may_hedge(now, self.route.timing.hedge_max_share):
            return None
        a = await self.start_next(hedge=True)
        if a is not None:
            window.hedge(now)
            self.spawn(a)
        return a

    def claim_win(self, a: Attempt) -> bool:
        """The first attempt with meaningful output wins and stops the others (a probe
        among them runs on, detached, to its verdict)."""
        if self.winner is not None:
            return self.winner is a
        self.winner = a
        self.retry_due = None  # a loser's retry is moot now
        self.stop_others(a)
        self.notify()
        return True

    def stop_others(self, keep: Attempt | None) -> None:
        for other in list(self.running):
            if other is keep:
                continue
            if other.probe:
                other.detach()
                self.running.remove(other)  # no longer this request's
            else:
                other.lose()

    async def start_next(self, *, hedge: bool = False) -> Attempt | None:
        """Start the next attempt: the slot that just failed once more where the retry
        rules allow, else the next eligible slot of the chain, else (never blank) the
        slot closest to recovery. None when nothing may start."""
        retry, self.retry_due = self.retry_due, None
        if retry is not None:
            slot, wait = retry
            if await self.pause(wait) and await self.wait_turn() and self.may_launch():
                gate_ = self.d.health.gate(slot, self.snap.credential(slot.provider))
                if gate_.skip is None:
                    return self.launch(slot, hedge=hedge, probe=gate_.probe, retry=True)
        elif self.failures and not await self.wait_turn():
            return None
        while self.may_launch() and self.cursor < len(self.route.slots):
            if self.tripped and self.redispatched:
                return None  # one re-dispatch after a suspected truncation, no more
            i, self.cursor = self.cursor, self.cursor + 1
            a = self.try_slot(self.route.slots[i], i, hedge)
            if a is not None:
                return a
        if self.blocked and not self.failures and not self.running and self.may_launch():
            slot = soonest(self.blocked)
            assert slot is not None
            self.blocked = []
            claim = self.d.health.force(slot, self.snap.credential(slot.provider),
                                        self.route.name)
            return self.launch(slot, hedge=hedge, claim=claim)
        return None

    def may_launch(self) -> bool:
        return not self.settled and self.winner is None and not self.committed \
            and trio.current_time() < self.deadline

    def try_slot(self, slot: Slot, position: int, hedge: bool,
                 continues: tuple[Attempt, Failure] | None = None) -> Attempt | None:
        """Start `slot` now, or write its skip row (skip_reason decides)."""
        d = self.d
        model_cfg = self.snap.model_cfg(slot)
        needed = d.estimator.estimate(slot.key, self.body_size) + output_reserve(self.body,
                                                                                 model_cfg)
        throttled = d.throttle.over(slot.key, trio.current_time(), needed, model_cfg)
        budget = model_cfg.budget_usd_per_day
        over_budget = budget is not None and d.spend.over(slot.key, d.wall_clock(), budget)
        # The breakers last: polling them may half-open one (a ledger row).
        gate_ = Gate() if slot.provider in self.timed_out or over_budget else d.health.gate(
            slot, self.snap.credential(slot.provider))
        reason = skip_reason(SlotFacts(
            provider_timed_out=slot.provider in self.timed_out, needed_tokens=needed,
            context_window=model_cfg.context_window, min_window=self.min_window,
            throttled=throttled, gate=gate_, over_budget=over_budget))
        if reason is None:
            return self.launch(slot, hedge=hedge, probe=gate_.probe, continues=continues)
        if reason == "context_window":
            self.context_skips.append((slot, needed, model_cfg.context_window or 0))
        else:
            self.other_skips += 1
        if reason == "budget":
            self.budget_skips.append(slot)
        elif reason == "rate_limited" and throttled is not None:
            log.info("request %s: %s skipped: %s", self.request_id, slot.key, throttled)
        elif reason == gate_.skip:
            self.blocked.append((gate_.until, position, slot))
        self.row(slot, self.next_index(), "skipped", skip_reason=reason)
        return None

    def launch(self, slot: Slot, *, hedge: bool, probe: bool = False, retry: bool = False,
               claim: tuple[BreakerKey, ...] = (),
               continues: tuple[Attempt, Failure] | None = None) -> Attempt:
        """Claim the slot's half-open probe (if trying it is one) and make the attempt in
        the same step; the caller starts it (go, spawn) before any checkpoint, and the
        attempt's own `finally` releases what it holds."""
        a = Attempt(self, slot, claim=claim, hedge=hedge, retry=retry, continues=continues)
        if probe:
            a.claim = self.d.health.claim(slot, self.snap.credential(slot.provider))
            a.probe = bool(a.claim)
        self.running.append(a)
        self.redispatched = self.tripped
        return a

    async def pause(self, seconds: float) -> bool:
        """Wait before a retry; False if an attempt won, the request settled or its
        total deadline passed meanwhile."""
        with trio.move_on_after(seconds):
            while self.winner is None and not self.settled:
                await self.changed.wait()
        return self.may_launch()

    async def wait_turn(self) -> bool:
        """A next attempt waits while the loop runs late (see FALLBACK_LAG_S); False
        when the request's total deadline passed meanwhile. On time it still yields
        once: when many deadlines fire together, every expired attempt is abandoned
        and recorded before any of them starts its next, heavier one."""
        d = self.d
        if d.late <= FALLBACK_LAG_S and not d.fallbacks:
            await trio.lowlevel.checkpoint()
            return True
        with trio.move_on_at(self.deadline):
            await d.fallbacks.park()
            return True
        return False

    def attempt_ended(self, a: Attempt) -> None:
        """An attempt's outcome, as the chain sees it (the breakers have it already)."""
        self.running.remove(a)
        f = a.failure
        if f is None:
            self.answer = a
        elif f.outcome != "hedge_lost":
            self._failed(a, f)
        self.notify()

    def _failed(self, a: Attempt, f: Failure) -> None:
        self.failures.append((a.slot, f))
        if self.winner is not None and a is not self.winner and a.continues is None:
            return  # it failed as it lost the race: the winner decides the request
        if self.committed:  # only the answer being streamed (or its continuation) decides
            if a is self.winner or a.continues is not None:
                self.winner = None
                if a.continues is None and self._continue(a, f):
                    return
                self.verdict = (a, f)
            return
        if f.outcome == "client_disconnected" or f.outcome == "bad_request":
            self.verdict = (a, f)
            return
        if self.winner is a:
            self.winner = None  # it failed before anything reached the client
        if is_timeout(f):
            self.timed_out.add(a.slot.provider)
        if any(o.index > a.index and o.cancel_reason is None for o in self.running):
            return  # its hedge, started after it, is already the next slot
        self.failed_over = True
        now = trio.current_time()
        wait = None if a.retried else retry_wait(
            f, elapsed=now - a.t.began, remaining=self.deadline - now,
            timing=self.route.timing, jitter=self.d.rng.random())
        # An open breaker means no retry (the failure may just have opened it),
        # unless it is a 429 hold that ends within the wait.
        credential = self.snap.credential(a.slot.provider)
        if wait is not None and self.d.health.blocked_until(a.slot, credential) <= now + wait:
            self.retry_due = (a.slot, wait)

    def _continue(self, a: Attempt, f: Failure) -> bool:
        """A streamed answer broke after commit: finish it on the next slot that can
        continue it (SPEC section 11), under that attempt's own deadlines and within
        what is left of the total. At most once per request."""
        if not self.racing:  # a probe's task, ending after its request did
            return False
        blocker = continue_blocker(enabled=self.route.timing.continuation, outcome=f.outcome,
                                   committed=True, relayed=self.relayed,
                                   continued=self.continued)
        if blocker is not None:
            log.info("request %s: not continued: %s", self.request_id, blocker)
            return False
        if is_timeout(f):
            self.timed_out.add(a.slot.provider)
        slots = self.route.slots
        start = slots.index(a.slot) + 1 if a.slot in slots else 0
        for i in range(start, len(slots)):
            slot = slots[i]
            if slot == a.slot or trio.current_time() >= self.deadline or slot_blocker(
                    prefill=self.snap.model_cfg(slot).prefill,
                    unable=not self.d.can_continue(self.snap, slot)) is not None:
                continue
            if (a2 := self.try_slot(slot, i, hedge=False, continues=(a, f))) is not None:
                self.spawn(a2)
                self.continued = True
                log.info("request %s: %s broke after commit (%s); continuing the answer on %s",
                         self.request_id, a.slot.key, f.outcome, slot.key)
                return True
        return False

    # -- the reply -------------------------------------------------------------

    def headers(self, slot: Slot | None) -> list[tuple[str, str]]:
        headers = [("x-failoverd-request-id", self.request_id),
                   ("x-failoverd-attempts", str(self.rows))]
        if slot is not None:
            headers.append(("x-failoverd-served-by", slot.key))
        return headers

    async def commit(self, a: Attempt) -> None:
        """The streamed reply's head and the frames held so far: from here on a failure
        can only be reported in-band."""
        pending, a.pending = a.pending, []
        self.committed = True
        self.client_ttft = trio.current_time() - self.started
        headers = [*self.headers(a.slot), ("content-type", "text/event-stream"),
                   ("cache-control", "no-cache")]
        first = b"".join(b"data: " + f + b"\n\n" for f in pending)
        if self.relayed is not None:
            for frame in pending:
                self.relayed.add(frame)
        try:
            await self.reply.start(200, headers, first)
        except ClientGone:
            raise Failure("client_disconnected", "client went away before the first byte") from None

    async def deliver(self) -> None:
        """The reply the race settled on, or the error when every slot failed."""
        if self.answer is not None:
            await self._deliver_answer(self.answer)
        elif self.verdict is not None:
            a, f = self.verdict
            if f.outcome == "client_disconnected":
                self.status = STATUS_CLIENT_CLOSED
            elif f.outcome == "bad_request" and not self.committed:
                await self._pass_through(a, f)
            else:
                await self._in_band(a, f)
        else:
            await self._all_failed()

    async def _deliver_answer(self, a: Attempt) -> None:
        self.served_by = a.slot
        self.status = 200
        if self.stream:
            if not self.committed:  # held until usage was in, and it passed
                try:
                    await self.commit(a)
                except Failure:
                    self.status = STATUS_CLIENT_CLOSED
                    return
            await self.reply.finish(b"data: [DONE]\n\n", self.finish)
            return
        body = _json_encode(a.st.completion(a.slot.model, self.request_id))
        self.client_ttft = trio.current_time() - self.started
        await self.reply.respond(200, [*self.headers(a.slot), ("content-type", "application/json")],
                                 body, self.finish)

    async def _in_band(self, a: Attempt, f: Failure) -> None:
        """After commit: one error event, no [DONE], so OpenAI clients raise. It names
        the failure that broke the answer, also when its continuation failed too."""
        broken, why = a.continues or (a, f)
        self.status = failure_status(why)
        self.served_by = broken.slot
        message = f"upstream {broken.slot.key} failed mid-stream: {why.outcome} ({why.error})"
        if a.continues is not None:
            message += f"; continuing the answer on {a.slot.key} failed too: {f.outcome}"
        body = self.error(message, why)
        await self.reply.finish(b"data: " + _json_encode(body) + b"\n\n", self.finish)

    async def _pass_through(self, a: Attempt, f: Failure) -> None:
        """A client error the upstream reported would fail everywhere: return it as is."""
        self.status = f.status or 400
        body = f.body or _json_encode(self.error(f.error, f))
        # Some upstreams echo the key, or the part of it that their 64 KiB cut left:
        # agents never see any of it. Keys are ASCII, so latin-1 maps bytes one to one.
        body = scrub(body.decode("latin-1"), self.snap.secrets).encode("latin-1")
        self.client_ttft = trio.current_time() - self.started
        await self.reply.respond(self.status, [*self.headers(a.slot),
                                               ("content-type", "application/json")],
                                 body, self.finish)

    async def _all_failed(self) -> None:
        if self.budget_skips and not self.failures and len(self.budget_skips) == self.rows:
            return await self._budget_exhausted()
        if not self.other_skips and (self.failures or self.context_skips) and all(
                f.outcome == "context_overflow" for _, f in self.failures):
            return await self._too_large()
        last = self.failures[-1] if self.failures else None
        self.status = failure_status(last[1] if last else None)
        if last is None:
            message = (f"route {self.route.name!r}: no slot could be tried "
                       f"({self.rows} skipped); see x-failoverd-request-id in the ledger")
        else:
            message = (f"route {self.route.name!r}: all {len(self.failures)} attempt(s) "
                       f"failed; last: {last[0].key} {last[1].outcome} ({last[1].error})")
        code = "upstream_timeout" if self.status == 504 else "upstream_failed"
        await self._respond_error(error_body(message, type_="failoverd_error", code=code,
                                             extra=self.extra()))

    async def _too_large(self) -> None:
        """No slot can hold the prompt: say so the way OpenAI does, so agents compact."""
        self.status = 400
        windows = [(w, s) for s, _, w in self.context_skips]
        windows += [(self.snap.model_cfg(s).context_window or 0, s) for s, _ in self.failures]
        largest, where = max(windows, key=lambda w: w[0])
        if self.failures:
            message = (f"the prompt does not fit any slot of route {self.route.name!r}: "
                       f"{self.failures[-1][1].error}")
        else:
            _, needed, _ = max(self.context_skips, key=lambda c: c[2])
            message = (f"the prompt does not fit any slot of route {self.route.name!r}: about "
                       f"{needed} tokens needed (estimated prompt plus output reserve), the "
                       f"largest context window is {largest} ({where.key}); no upstream was "
                       "called")
        await self._respond_error(error_body(
            message, type_="invalid_request_error", code="context_length_exceeded",
            param="messages", extra=self.extra()))

    async def _budget_exhausted(self) -> None:
        """Every slot is out of its day's budget: 429 with when the budgets reset, so a
        runaway agent is stopped and a well-behaved one knows when to come back."""
        self.status = 429
        now = self.d.wall_clock()
        reset = next_utc_midnight(now)
        resets_at = utc_timestamp(reset)
        budgets = []
        for key in dict.fromkeys(s.key for s in self.budget_skips):
            budget = self.snap.cfg.models[key].budget_usd_per_day
            budgets.append({"model": key, "budget_usd_per_day": budget,
                            "spent_usd": round(self.d.spend.today(key, now), 6),
                            "resets_at": resets_at})
        spent = ", ".join(f"{b['model']} ${b['spent_usd']:.4f} of ${b['budget_usd_per_day']:g}"
                          for b in budgets)
        message = (f"route {self.route.name!r}: every slot has spent its daily budget "
                   f"({spent}); the budgets reset at {resets_at} (UTC midnight)")
        await self._respond_error(
            error_body(message, type_="failoverd_error", code="budget_exhausted",
                       extra={**self.extra(), "budgets": budgets}),
            [("retry-after", str(max(1, math.ceil(reset - now))))])

    async def _respond_error(self, body: dict[str, Any],
                             headers: Iterable[tuple[str, str]] = ()) -> None:
        self.client_ttft = trio.current_time() - self.started
        await self.reply.respond(self.status, [*self.headers(None),
                                               ("content-type", "application/json"), *headers],
                                 _json_encode(body), self.finish)

    def extra(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "attempts": [
                {"provider": s.provider, "model": s.model, "outcome": f.outcome,
                 "status": f.status, "error": f.error}
                for s, f in self.failures
            ],
        }

    def error(self, message: str, failure: Failure) -> dict[str, Any]:
        return error_body(message, type_="failoverd_error", code=failure.outcome,
                          extra=self.extra())

    # -- ledger ----------------------------------------------------------------

    def row(self, slot: Slot, index: int, outcome: str, **fields: Any) -> None:
        """One attempt row (a try or a skip) of this request."""
        self.d.ledger.write(AttemptRow(
            ts=utc_timestamp(), request_id=self.request_id, route=self.route.name,
            attempt=index, provider=slot.provider, model=slot.model, outcome=outcome,
            stream=self.stream, client_pid=self.peer.pid, client_uid=self.peer.uid, **fields))

    def record(self, a: Attempt, failure: Failure | None) -> None:
        """An attempt's verdict on its slot's breakers (a probe's claim decides them)."""
        self.d.health.record(a.slot, a.credential, failure, a.t.ttft, probe=a.claim)

    def charge(self, a: Attempt, usd: float | None) -> None:
        """An attempt's billed cost, counted on its model's day (SPEC section 13)."""
        self.d.charge(a.slot.key, usd, a.model_cfg.budget_usd_per_day)

    def answer_fields(self, a: Attempt) -> dict[str, Any]:
        """The fingerprint of an answer to be compared with its shadow, for its row (not
        of a continuation: it holds only the end of the answer the client got)."""
        if not self.compares or a.failure is not None or a.continues is not None:
            return {}
        st = a.st
        return answer_fingerprint(st.record if st.record is not None
                                  else (st.choices or {}).get(0), self.d.answer_key)

    def finish(self, delivered: bool = True) -> None:
        """The request row, once: called as the reply's last byte reaches the kernel
        (Reply.finish / respond), or when the request ends without a reply."""
        if self.row_written:
            return
        self.row_written = True
        if not delivered:
            self.status = STATUS_CLIENT_CLOSED
        timing = self.route.timing
        served = self.served_by.key if self.served_by and self.status == 200 else None
        self.d.ledger.write(RequestRow(
            ts=utc_timestamp(), request_id=self.request_id, route=self.route.name,
            outcome="ok" if self.status == 200 else "error", served_by=served,
            attempts=self.rows, total_ms=_ms(trio.current_time() - self.started) or 0.0,
            ttft_ms=_ms(self.client_ttft), status=self.status, stream=self.stream,
            client_pid=self.peer.pid, client_uid=self.peer.uid,
            total_timeout_s=timing.total_timeout_s,
            client_cliff_s=self.snap.cfg.daemon.client_cliff_s, continued=self.continued,
        ))

    def describe(self, now: float) -> dict[str, Any]:
        running = [a.slot.key for a in self.running]
        return {
            "request_id": self.request_id, "route": self.route.name,
            "slot": running[0] if running else None, "racing": running,
            "attempts": self.rows, "committed": self.committed,
            "age_s": round(now - self.started, 3), "left_s": round(self.deadline - now, 3),
            "stream": self.stream,
        }


class DiscardReply(Reply):
    """A shadow's client: nothing it is given goes anywhere."""

    async def start(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                    *, final: bool = False) -> None:
        pass

    async def send(self, frame: bytes) -> None:
        pass

    def relay_now(self, frame: bytes) -> bytes | None:
        return b""

    async def send_raw(self, framed: bytes) -> None:
        pass

    async def finish(self, data: bytes, settle: Callable[[bool], None]) -> None:
        settle(True)

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      settle: Callable[[bool], None]) -> None:
        settle(True)

    def abort(self) -> None:
        pass


class ShadowRequest(Request):
    """One shadow call (SPEC section 13): the body of a live request whose reply is
    complete, sent to the route's shadow model as a one-slot run under the route's
    deadlines, without retry or hedge, so it never fails over; the reply discards
    everything. Its one row says `shadow = true` and names the live request. It is no
    request in flight (a drain does not wait for it, it has no request row), is never
    sampled itself, and marks its upstream call (SHADOW_HEADER). Its estimated cost is
    reserved on the route's shadow budget before it starts, and replaced by the real
    cost when it ends; its verdict goes to its own breaker only (Health.record_shadow)."""

    def __init__(self, d: Daemon, snap: Snapshot, route: Route, live: Request) -> None:
        shadow = route.shadow
        assert shadow is not None  # Shadows.after saw to it
        slot = parse_slot(shadow.model)
        assert slot is not None  # config_errors saw to it
        timing = msgspec.structs.replace(route.timing, retry_same=0, hedge_after_s=None,
                                         hedge_quantile=None)
        super().__init__(d, snap, Route(route.name, (slot,), timing), live.body, stream=False,
                         peer=live.peer, reply=DiscardReply(), request_id=_secrets.token_hex(8),
                         body_size=live.body_size, marked=True)
        self.shadow = shadow
        self.compares = True
        self.cancel_reason = "shutdown"  # the only thing that cancels a shadow
        self.scope = trio.CancelScope()
        self.live_id = live.request_id
        # The live answer's output tokens, reported or estimated (its row has them).
        self.live_tokens_out = live.answer.tokens[1] if live.answer is not None else None
        self.reserved, self.reserved_day = 0.0, ""

    async def run(self, nursery: trio.Nursery) -> None:
        """The race alone: no request in flight, no reply, no request row."""
        self.nursery, self.racing = nursery, True
        try:
            await self.race()
        finally:
            self.racing = False
            for a in list(self.running):  # a probe runs in the daemon's nursery
                a.stop(self.cancel_reason)

    async def start_next(self, *, hedge: bool = False) -> Attempt | None:
        """Its one slot, once: no retry, no failover, no forced probe, and no place in
        the queue of live fallbacks waiting their turn (Request.wait_turn)."""
        if self.cursor:
            return None
        self.cursor = 1
        return self.try_slot(self.route.slots[0], 0, hedge)

    def try_slot(self, slot: Slot, position: int, hedge: bool,
                 continues: tuple[Attempt, Failure] | None = None) -> Attempt | None:
        """Start the shadow, or write its skip row: the estimated cost must fit what is
        left of the budget today, and the shadow's own breaker must let it through."""
        d = self.d
        model_cfg = self.snap.model_cfg(slot)
        prompt = d.estimator.estimate(slot.key, self.body_size)
        estimate = shadow_estimate(model_cfg, prompt, self.live_tokens_out, self.body)
        now, budget = d.wall_clock(), self.shadow.budget_usd_per_day
        fits = d.shadow_spend.fits(self.route.name, now, budget, estimate)
        gate_ = d.health.shadow_gate(slot) if fits else Gate()
        needed = prompt + output_reserve(self.body, model_cfg)
        reason = skip_reason(SlotFacts(
            provider_timed_out=False, needed_tokens=needed,
            context_window=model_cfg.context_window, min_window=0,
            throttled=d.throttle.over(slot.key, trio.current_time(), needed, model_cfg),
            gate=gate_, over_budget=not fits))
        if reason is not None:
            if reason == "budget":
                log.info("shadow of request %s skipped: its estimated $%.6f does not fit "
                         "what is left of routes.%s.shadow.budget_usd_per_day = %g today "
                         "($%.6f spent)", self.live_id, estimate, self.route.name, budget,
                         d.shadow_spend.today(self.route.name, now))
            self.row(slot, self.next_index(), "skipped", skip_reason=reason)
            return None
        self.reserved, self.reserved_day = estimate, d.shadow_spend.add(self.route.name, now,
                                                                        estimate)
        return self.launch(slot, hedge=hedge,
                           claim=d.health.shadow_claim(slot) if gate_.probe else ())

    def record(self, a: Attempt, failure: Failure | None) -> None:
        self.d.health.record_shadow(a.slot, failure, a.t.ttft, probe=a.claim)

    def charge(self, a: Attempt, usd: float | None) -> None:
        """Settle: the real cost replaces the reservation."""
        self.d.shadow_spend.settle(self.route.name, self.d.wall_clock(), self.reserved_day,
                                   self.reserved, usd or 0.0)
        self.reserved = 0.0

    def row(self, slot: Slot, index: int, outcome: str, **fields: Any) -> None:
        super().row(slot, index, outcome, shadow=True, shadow_of=self.live_id, **fields)


class Shadows:
    """The daemon's shadow calls (SPEC section 13): sampled when a request starts,
    started in the daemon's own nursery once its reply is complete, at most
    [shadow] max_in_flight at once, dropped first under load, cancelled at shutdown
    without anyone waiting for them. A drop is counted (GET /status), not logged."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.running: set[ShadowRequest] = set()
        self.started = 0
        self.dropped: collections.Counter[str] = collections.Counter()

    def sample(self, snap: Snapshot, route: Route) -> bool:
        """Is a new request to be shadowed? One draw of d.rng per request of a shadowed
        route while shadows are on (in the request's config generation)."""
        shadow = route.shadow
        if shadow is None or not shadow.sample or not snap.cfg.shadow.enabled:
            return False
        return self.d.rng.random() < shadow.sample

    def loaded(self) -> bool:
        """Shadows go first: none starts while live requests are being shed, nor while
        the loop runs half as late as the point where shedding begins."""
        d = self.d
        limit = d.cfg.daemon.shed_lag_s
        return d.overloaded or (bool(limit) and d.loop_lag >= limit / 2)

    def drop_reason(self) -> str | None:
        d = self.d
        if d.background is None:
            return "not_serving"
        if d.draining:
            return "shutdown"
        if self.loaded():
            return "load"
        if len(self.running) >= d.cfg.shadow.max_in_flight:
            return "max_in_flight"
        return None

    def after(self, live: Request) -> None:
        """A request's reply is complete: start its shadow if it was sampled and
        answered (a shadow needs an answer to compare with), or count why not."""
        if not live.sampled or live.status != 200 or live.answer is None:
            return
        d = self.d
        route = d.routes.get(live.route.name)  # the config now: a reload may have
        if route is None or route.shadow is None or not d.cfg.shadow.enabled:  # turned it off
            self.dropped["disabled"] += 1
            return
        reason = self.drop_reason()
        if reason is not None:
            self.dropped[reason] += 1
            return
        sreq = ShadowRequest(d, d.acquire(), route, live)
        self.running.add(sreq)
        self.started += 1
        assert d.background is not None
        d.background.start_soon(in_background, functools.partial(self._run, sreq),
                                f"the shadow call of request {live.request_id}")

    async def _run(self, sreq: ShadowRequest) -> None:
        try:
            with sreq.scope:
                async with trio.open_nursery() as nursery:
                    await sreq.run(nursery)
        finally:
            self.running.discard(sreq)
            self.d.release(sreq.snap)

    def cancel(self) -> None:
        """Shutdown: stop every shadow now (their rows say `shutdown`)."""
        for sreq in self.running:
            sreq.scope.cancel(reason="failoverd is shutting down")

    def status(self) -> dict[str, Any]:
        cfg = self.d.cfg.shadow
        return {"enabled": cfg.enabled, "max_in_flight": cfg.max_in_flight,
                "in_flight": len(self.running), "started": self.started,
                "dropped": dict(sorted(self.dropped.items()))}


def _bounded_decoder(encoding: str) -> Callable[[bytes, int], bytes]:
    """(raw bytes, room) -> at most `room` decoded bytes. A compressed body is inflated
    a piece at a time: 64 KiB of gzip can inflate to 64 MiB in one call."""
    if encoding.strip().lower() not in ("gzip", "x-gzip", "deflate"):
        return lambda raw, room: raw  # identity (asked for), or one we cannot read: as is
    inflate = zlib.decompressobj(wbits=47)  # 32 + 15: gzip or zlib, told by the header

    def decode(raw: bytes, room: int) -> bytes:
        try:
            return inflate.decompress(raw, room)
        except zlib.error as e:
            raise Failure("protocol_error", f"undecodable {encoding} body: {e}") from None

    return decode


async def _read_limited(resp: httpx2.Response, limit: int, *, over: str | None = None) -> bytes:
    """At most `limit` bytes of the body, never holding more: the rest is not read (the
    connection is closed, not reused). With `over`, a longer body fails the attempt as a
    protocol_error instead of being cut."""
    decode = _bounded_decoder(resp.headers.get("content-encoding", ""))
    buf = bytearray()
    async for raw in resp.stream:  # the transport's bytes, as the SSE path reads them
        buf += decode(raw, limit + 1 - len(buf))
        if len(buf) > limit:
            if over is not None:
                raise Failure("protocol_error", f"{over} is longer than {limit} bytes; the rest "
                                                "was not read", status=resp.status_code)
            del buf[limit:]
            break
    return bytes(buf)


# ---------------------------------------------------------------------------
# Front end
# The h11 connection loop: keep-alive, head/body deadlines, size limits, routing
# to the OpenAI endpoints, and the Reply the engine writes through.
# ---------------------------------------------------------------------------

# Request heads are small (an SDK's is well under 2 KiB); 64 KiB, four times h11's
# default, leaves room for long tokens in headers. A longer head gets 431.
MAX_HEAD_BYTES = 64 * 1024
RECV_SIZE = 64 * 1024
SERVER_HEADER = ("server", f"failoverd/{__version__}")


class H11Reply(Reply):
    """h11 writes the head and the end; a chunked body's chunks are framed here, on
    the per-token hot path, without building an h11 event for each."""

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream,
                 write_timeout: float) -> None:
        self.conn = conn
        self.stream = stream
        self.write_timeout = write_timeout
        self.chunked = False
        sock = getattr(stream, "socket", None)
        self.sock = sock if isinstance(sock, trio.socket.SocketType) else None

    async def start(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                    *, final: bool = False) -> None:
        headers = [SERVER_HEADER, *headers]
        self.chunked = False
        if final:
            headers.append(("content-length", str(len(body))))
        elif self.conn.their_http_version == b"1.1":
            headers.append(("transfer-encoding", "chunked"))
            self.chunked = True
        events: list[Any] = [h11.Response(status_code=status, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        if final:
            events.append(h11.EndOfMessage())
        await self._write(events)

    async def send(self, frame: bytes) -> None:
        """No deadline of its own: the attempt bounds it."""
        if not self.chunked:
            await self._write([h11.Data(data=b"data: %b\n\n" % frame)])
            return
        await self.send_raw(b"%x\r\ndata: %b\n\n\r\n" % (len(frame) + 8, frame))

    def relay_now(self, frame: bytes) -> bytes | None:
        """The per-token hot path: one write(2) and no checkpoint. A client that is
        reading takes a token at once; only a full socket buffer takes the slow path.
        The event and its HTTP chunk are framed in one formatting: one copy."""
        if not self.chunked or self.sock is None:
            return None
        if self.conn.our_state is h11.ERROR:
            raise ClientGone
        framed = b"%x\r\ndata: %b\n\n\r\n" % (len(frame) + 8, frame)
        try:
            sent = os.write(self.sock.fileno(), framed)  # a closed socket: -1, EBADF
        except BlockingIOError:
            return framed
        except OSError:
            self.conn.send_failed()
            raise ClientGone from None
        return framed[sent:]

    async def send_raw(self, framed: bytes) -> None:
        if self.conn.our_state is h11.ERROR:
            raise ClientGone
        try:
            await self.stream.send_all(framed)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.conn.send_failed()
            raise ClientGone from None

    def abort(self) -> None:
        self.conn.send_failed()

    async def finish(self, data: bytes, settle: Callable[[bool], None]) -> None:
        await self._final([h11.Data(data=data), h11.EndOfMessage()], settle)

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      settle: Callable[[bool], None]) -> None:
        headers = [SERVER_HEADER, *headers, ("content-length", str(len(body)))]
        events: list[Any] = [h11.Response(status_code=status, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self._final(events, settle)

    async def _final(self, events: list[Any], settle: Callable[[bool], None]) -> None:
        """The reply's last bytes, with `settle` called in the same step as the last of
        them reaches the kernel: a reply the client has seen complete has its request
        row, even if the daemon is killed right after (see Reply.finish)."""
        try:
            data = b"".join(self.conn.send(e) or b"" for e in events)
            if self.sock is None:  # not a socket (tests' memory streams)
                await self._send_all(data)
            else:
                await self._write_all(data, settle)
                return
        except (ClientGone, h11.LocalProtocolError):
            self.conn.send_failed()
            settle(False)
            return
        settle(True)

    async def _write_all(self, data: bytes, settle: Callable[[bool], None]) -> None:
        assert self.sock is not None
        if self.conn.our_state is h11.ERROR:
            raise ClientGone
        view = memoryview(data)
        with trio.move_on_after(self.write_timeout):
            while True:
                try:
                    view = view[os.write(self.sock.fileno(), view):]  # closed: -1, EBADF
                except BlockingIOError:
                    pass
                except OSError:
                    break
                if not view:
                    settle(True)  # no checkpoint between the last byte and the row
                    return
                try:
                    await trio.lowlevel.wait_writable(self.sock)
                except (OSError, trio.ClosedResourceError):
                    break
        raise ClientGone

    async def _write(self, events: list[Any]) -> None:
        try:
            data = b"".join(self.conn.send(e) or b"" for e in events)
        except h11.LocalProtocolError:
            self.conn.send_failed()
            raise ClientGone from None
        await self._send_all(data)

    async def _send_all(self, data: bytes) -> None:
        """Write to the client under its own deadline: a client that stops reading is
        dropped. A write cut short leaves broken framing, so the connection is done."""
        if self.conn.our_state is h11.ERROR:
            raise ClientGone
        with trio.move_on_after(self.write_timeout):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.conn.send_failed()
                raise ClientGone from None
            return
        self.conn.send_failed()
        raise ClientGone


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream,
                      buffered: int | None = None) -> Any:
    """The next h11 event, reading as needed. While a request head is read, `buffered`
    counts its bytes so far and no read takes more than MAX_HEAD_BYTES of them: h11
    checks its size limit only on a head still incomplete, so a head that one read
    both completed and took past the limit would pass (up to ~128 KiB)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        size = RECV_SIZE if buffered is None else max(1, min(RECV_SIZE,
                                                              MAX_HEAD_BYTES - buffered))
        try:
            data = await stream.receive_some(size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if buffered is not None:
            buffered += len(data)
        conn.receive_data(data)


async def _simple(reply: H11Reply, status: int, body: dict[str, Any] | bytes,
                  headers: Iterable[tuple[str, str]] = ()) -> None:
    payload = body if isinstance(body, bytes) else _json_encode(body)
    with contextlib.suppress(ClientGone):
        await reply.start(status, [("content-type", "application/json"), *headers], payload,
                          final=True)


async def _client_error(reply: H11Reply, status: int, message: str, *, code: str,
                        param: str | None = None, close: bool = False) -> None:
    headers = [("connection", "close")] if close else []
    await _simple(reply, status, error_body(message, type_="invalid_request_error", code=code,
                                            param=param), headers)


async def handle_connection(d: Daemon, stream: trio.abc.Stream, peer: Peer, *,
                            admitted: bool = True) -> None:
    """Serve HTTP/1.1 requests on one client connection until it closes. A connection
    over daemon.max_connections (`admitted` False) gets one answer: /healthz, or 503."""
    # A head of MAX_HEAD_BYTES is whole or refused at that size: h11 refuses a head
    # still incomplete with more than this buffered, and _next_event reads no further.
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES - 1)
    dc = d.cfg.daemon
    reply = H11Reply(conn, stream, dc.client_write_timeout_s)
    first = True
    try:
        while True:
            buffered = len(conn.trailing_data[0])
            if not buffered:
                # Keep-alive idle: wait for the next request's first byte.
                idle_until = trio.current_time() + dc.keepalive_timeout_s
                waits = d.first_waits if first else d.idle_scopes
                with trio.CancelScope(deadline=idle_until) as idle:
                    waits.add(idle)
                    if d.draining:
                        end_wait(idle, first)
                    try:
                        data = await stream.receive_some(min(RECV_SIZE, MAX_HEAD_BYTES))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    conn.receive_data(data)
                    buffered = len(data)
                waits.discard(idle)
                if idle.cancelled_caught:
                    return
            with trio.move_on_after(dc.head_timeout_s) as head_scope:
                try:
                    event = await _next_event(conn, stream, buffered)
                except h11.RemoteProtocolError as e:
                    await _client_error(reply, e.error_status_hint,
                                        f"malformed HTTP request: {e}", code="bad_http",
                                        close=True)
                    return
            if head_scope.cancelled_caught:
                await _client_error(reply, 408, f"request head not received within "
                                    f"daemon.head_timeout_s = {dc.head_timeout_s:g} s",
                                    code="request_timeout", close=True)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed, or the client closed between requests
            if not admitted:
                await _over_the_cap(d, reply, event)
                return
            await _handle_request(d, conn, stream, reply, event, peer)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # MUST_CLOSE, an error, or a reply cut short: not reusable
            conn.start_next_cycle()
            first = False
    except Exception:
        log.exception("connection handler failed; the connection is closed, the daemon goes on")
        if conn.our_state is h11.SEND_RESPONSE:
            await _simple(reply, 500, error_body("internal error in failoverd; see its log",
                                                 type_="failoverd_error", code="internal"))
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await stream.aclose()


# While draining, a connection accepted before the listener closed still has its first
# request served: its client sent it without knowing of the restart, and sends it right
# after connecting. A new connection that sends nothing within this is closed.
DRAIN_FIRST_REQUEST_S = 1.0


def end_wait(scope: trio.CancelScope, first: bool) -> None:
    """Draining: close a keep-alive connection now; give a new one its first request."""
    if first:
        scope.deadline = min(scope.deadline, trio.current_time() + DRAIN_FIRST_REQUEST_S)
    else:
        scope.cancel()


async def _over_the_cap(d: Daemon, reply: H11Reply, request: h11.Request) -> None:
    """A connection past daemon.max_connections with no idle one to close: health checks
    are still answered, anything else is told to come back."""
    if request.method == b"GET" and request.target.split(b"?", 1)[0] == b"/healthz":
        await _simple(reply, 503 if d.draining else 200,
                      {"status": "draining" if d.draining else "ok"}, [("connection", "close")])
        return
    error = error_body(f"failoverd has daemon.max_connections = {d.max_connections} client "
                       "connections open, none of them idle; retry shortly",
                       type_="failoverd_error", code="too_many_connections")
    await _simple(reply, 503, error, [("retry-after", "1"), ("connection", "close")])


async def _read_body(
    d: Daemon, conn: h11.Connection, stream: trio.abc.Stream, reply: H11Reply,
    request: h11.Request,
) -> bytes | None:
    """The request body, or None after answering an error (the connection will close)."""
    dc = d.cfg.daemon
    limit = dc.max_body_bytes
    length = dict(request.headers).get(b"content-length")
    if length is not None and int(length) > limit:
        await _client_error(reply, 413, f"request body of {int(length)} bytes is over "
                            f"daemon.max_body_bytes = {limit}", code="body_too_large", close=True)
        return None
    if conn.they_are_waiting_for_100_continue:
        try:
            await reply._write([h11.InformationalResponse(status_code=100, headers=[])])
        except ClientGone:
            return None  # it left before the body: nothing to answer
    parts, size = [], 0
    with trio.move_on_after(dc.body_timeout_s) as scope:
        while True:
            event = await _next_event(conn, stream)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    await _client_error(reply, 413, f"request body is over daemon.max_body_bytes"
                                        f" = {limit}", code="body_too_large", close=True)
                    return None
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                return None  # the client hung up mid-body
    assert scope.cancelled_caught
    await _client_error(reply, 408, f"request body not received within daemon.body_timeout_s = "
                        f"{dc.body_timeout_s:g} s", code="request_timeout", close=True)
    return None


# The TCP listener has no peer identity: any local process can connect, and so can a
# web page in a local browser, with a "simple" cross-origin POST (text/plain or a form,
# no preflight) that the page cannot read the answer of but that still spends the keys.
# Browsers always say where such a request comes from (Origin); local clients never do.
_LOOPBACK_ORIGIN = re.compile(rb"https?://(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?",
                              re.IGNORECASE)


def _over_tcp(stream: trio.abc.Stream) -> bool:
    sock = getattr(stream, "socket", None)
    return sock is not None and sock.family in (_socket.AF_INET, _socket.AF_INET6)


def _is_json(content_type: bytes | None) -> bool:
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def request_refusal(request: h11.Request, *, tcp: bool) -> tuple[int, str, str] | None:
    """(status, code, message) for a request refused before its body is read."""
    fields = dict(request.headers)
    if b"content-length" in fields and b"transfer-encoding" in fields:
        return 400, "bad_http", ("a request with both Content-Length and Transfer-Encoding is "
                                 "refused (RFC 9112 section 6.3); send one of them")
    if not tcp:
        return None
    origin = fields.get(b"origin")
    if origin is not None and not _LOOPBACK_ORIGIN.fullmatch(origin):
        return 403, "cross_origin", (
            f"daemon.tcp refuses requests from web pages (Origin: "
            f"{origin.decode('latin-1')!r} is not a loopback origin); local clients send no "
            "Origin header")
    if request.method == b"POST" and not _is_json(fields.get(b"content-type")):
        ctype = fields.get(b"content-type", b"none").decode("latin-1")
        return 415, "unsupported_media_type", (
            f"daemon.tcp takes only JSON request bodies (content-type: application/json); "
            f"got content-type {ctype!r}")
    return None


async def _handle_request(
    d: Daemon, conn: h11.Connection, stream: trio.abc.Stream, reply: H11Reply,
    request: h11.Request, peer: Peer,
) -> None:
    if not peer_allowed(d.cfg.daemon, peer):
        await _refuse_peer(d, reply, peer)
        return  # the body is never read; the connection closes
    path = request.target.split(b"?", 1)[0]
    method = request.method
    refusal = request_refusal(request, tcp=_over_tcp(stream))
    if refusal is not None:
        status, code, message = refusal
        await _client_error(reply, status, message, code=code, close=True)
        return
    try:
        body = await _read_body(d, conn, stream, reply, request)
    except h11.RemoteProtocolError as e:
        await _client_error(reply, e.error_status_hint, f"malformed HTTP request body: {e}",
                            code="bad_http", close=True)
        return
    if body is None:
        return
    if path == b"/v1/chat/completions" and method == b"POST":
        marked = any(k == SHADOW_HEADER.encode() for k, _ in request.headers)
        await _chat(d, conn, stream, reply, body, peer, marked=marked)
    elif path == b"/v1/models" and method == b"GET":
        await _simple(reply, 200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "failoverd"}
            for name in d.routes]})
    elif path == b"/healthz" and method == b"GET":
        await _simple(reply, 503 if d.draining else 200,
                      {"status": "draining" if d.draining else "ok"})
    elif path == b"/status" and method == b"GET":
        await _simple(reply, 200, d.status())
    elif path == b"/metrics" and method == b"GET":
        await _metrics(d, reply)
    elif path in (b"/v1/chat/completions", b"/v1/models", b"/healthz", b"/status", b"/metrics"):
        await _client_error(reply, 405, f"{method.decode()} is not allowed on {path.decode()}",
                            code="method_not_allowed")
    else:
        await _client_error(reply, 404, f"no such endpoint {path.decode('latin-1')}; failoverd "
                            "serves POST /v1/chat/completions, GET /v1/models, /healthz, /status, "
                            "/metrics", code="not_found")


async def _metrics(d: Daemon, reply: H11Reply) -> None:
    """Prometheus text exposition (format 0.0.4)."""
    if d.metrics is None:
        await _client_error(reply, 404, f"metrics are off in this daemon ({METRICS_ENV}=off in "
                            "its environment)", code="not_found")
        return
    with contextlib.suppress(ClientGone):
        await reply.start(200, [("content-type", d.metrics.content_type)],
                          d.metrics.exposition(), final=True)


# A refused peer is logged at most this often per uid (a loop of refusals would flood
# journald); every refusal has its ledger row.
REFUSAL_LOG_EVERY_S = 60.0


async def _refuse_peer(d: Daemon, reply: H11Reply, peer: Peer) -> None:
    """A peer outside daemon.allow_uids / allow_gids: 403, one ledger row that says who
    (never what it asked), a log line; nothing reaches an upstream."""
    d.ledger.write(RequestRow(
        ts=utc_timestamp(), request_id=_secrets.token_hex(8), route="", outcome="error",
        served_by=None, attempts=0, total_ms=0.0, ttft_ms=None, status=403,
        client_pid=peer.pid, client_uid=peer.uid))
    now = time.monotonic()
    last, count = d.refusals.get(peer.uid, (-math.inf, 0))
    if now - last >= REFUSAL_LOG_EVERY_S:
        log.warning("refused a request from pid %s uid %s gid %s: not in daemon.allow_uids / "
                    "allow_gids (%d more from this uid since the last such line)",
                    peer.pid, peer.uid, peer.gid, count)
        last, count = now, -1
    d.refusals[peer.uid] = (last, count + 1)
    who = f"uid {peer.uid}, gid {peer.gid}" if peer.uid is not None else "an unknown peer"
    await _simple(reply, 403, error_body(
        f"{who} may not call this failoverd: its daemon.allow_uids / allow_gids do not "
        "include it; ask the operator of this host", type_="permission_error",
        code="peer_not_allowed"), [("connection", "close")])


_TOO_DEEP = ("request body nests JSON too deeply to be decoded with room to spare; a few "
             "hundred levels is the most failoverd accepts")
# Where a msgspec validation error points: "... - at `$.messages[2].content`".
_ERROR_PATH = re.compile(r" - at `\$\.?(.*)`$")


def request_problem(body: dict[str, Any]) -> tuple[str, str | None] | None:
    """What makes a chat request (decoded by `decode_json`) unusable, as (message, OpenAI's
    `param` naming the field), or None. A request that passes cannot make building an
    upstream request fail."""
    try:
        msgspec.convert(body, ChatRequest)
    except msgspec.ValidationError as e:
        text = str(e)
        at = _ERROR_PATH.search(text)
        if at is None or not at.group(1):
            return f"invalid request: {text}", None
        return f"invalid request: '{at.group(1)}': {text[:at.start()]}", at.group(1)
    return None


async def _chat(
    d: Daemon, conn: h11.Connection, stream: trio.abc.Stream, reply: H11Reply, raw: bytes,
    peer: Peer, *, marked: bool = False,
) -> None:
    try:
        body = decode_json(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        await _client_error(reply, 400, f"request body is not valid JSON: {e}", code="invalid_json")
        return
    except RecursionError:
        await _client_error(reply, 400, _TOO_DEEP, code="json_too_deep")
        return
    if not isinstance(body, dict):
        await _client_error(reply, 400, "request body must be a JSON object", code="invalid_json")
        return
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        await _client_error(reply, 400, "'messages' must be a non-empty array of messages",
                            code="missing_messages", param="messages")
        return
    problem = request_problem(body)
    if problem is not None:
        message, param = problem
        await _client_error(reply, 400, message, code="invalid_value", param=param)
        return
    model = body.get("model")
    route = d.route_for(model) if isinstance(model, str) else None
    if route is None:
        await _client_error(
            reply, 404 if isinstance(model, str) else 400,
            f"unknown model {model!r}: failoverd serves the routes "
            f"{', '.join(sorted(d.routes)) or '(none)'}, or PROVIDER/MODEL with a declared "
            f"provider ({', '.join(sorted(d.cfg.providers)) or 'none'})",
            code="model_not_found", param="model")
        return
    if d.should_shed(body.get("stream") is True):
        await _shed(d, reply, route, body, peer)
        return
    snap = d.acquire()
    req = Request(d, snap, route, body, stream=body.get("stream") is True, peer=peer,
                  reply=reply, request_id=_secrets.token_hex(8), body_size=len(raw),
                  marked=marked)
    with trio.CancelScope() as req_scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_client, conn, stream, req, req_scope)
            await req.run(nursery)
            nursery.cancel_scope.cancel()
    if not req.keep_alive:
        reply.abort()  # pipelined bytes were dropped: this connection cannot go on


async def _shed(d: Daemon, reply: H11Reply, route: Route, body: dict[str, Any],
                peer: Peer) -> None:
    """Overloaded: refuse at once, cheaply, so accepted requests stay fast."""
    d.shed += 1
    d.ledger.write(RequestRow(
        ts=utc_timestamp(), request_id=_secrets.token_hex(8), route=route.name, outcome="error",
        served_by=None, attempts=0, total_ms=0.0, ttft_ms=None, status=503,
        stream=body.get("stream") is True, client_pid=peer.pid, client_uid=peer.uid,
        total_timeout_s=route.timing.total_timeout_s, client_cliff_s=d.cfg.daemon.client_cliff_s))
    error = error_body(f"failoverd is overloaded (event loop {d.loop_lag * 1000:.0f} ms late, "
                       f"limit daemon.shed_lag_s = {d.cfg.daemon.shed_lag_s:g} s); retry shortly",
                       type_="failoverd_error", code="overloaded")
    await _simple(reply, 503, error, [("retry-after", "1")])


async def _watch_client(
    conn: h11.Connection, stream: trio.abc.Stream, req: Request, req_scope: trio.CancelScope
) -> None:
    """Cancel the request the moment the client hangs up; keep pipelined bytes.

    A client that closes only its sending side (a half-close) still gets its reply: on
    a Unix socket the kernel tells a half-close (the peer can still read) from a close
    (POLLHUP); TCP cannot tell them apart, so there a disconnect is noticed at the first
    write. Pipelined bytes beyond MAX_HEAD_BYTES are not kept: the reply then ends the
    connection, and the watch goes on reading so that a hang-up is still seen.
    """
    buffered = 0
    while True:
        try:
            data = await stream.receive_some(RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = None
        if not data:
            if data is None or _hung_up(stream):
                req.cancel_reason = "client_disconnected"
                req_scope.cancel(reason="the client went away")
            return
        buffered += len(data)
        if buffered <= MAX_HEAD_BYTES:
            conn.receive_data(data)
        else:
            req.keep_alive = False


def _hung_up(stream: trio.abc.Stream) -> bool:
    """After end-of-file from the client: did it close (True) or only half-close?"""
    sock = getattr(stream, "socket", None)
    if not isinstance(sock, trio.socket.SocketType) or sock.family != _socket.AF_UNIX:
        return not isinstance(sock, trio.socket.SocketType)  # memory streams: a close
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(mask & select.POLLHUP for _, mask in poller.poll(0))


# ---------------------------------------------------------------------------
# Lifecycle
# Listeners (Unix socket, loopback TCP, systemd socket activation), signals,
# graceful drain, config reload and sd_notify.
# ---------------------------------------------------------------------------


class StartupError(Exception):
    """The daemon cannot start; the message says what to do."""


# Python's cycle collector walks live objects, and a collection of the oldest
# generation walks all of them: with 500 streams in flight one took ~75 ms, a pause
# every stream feels and every deadline fires late by. What exists once the daemon
# has started (modules, config, TLS context: ~45,000 objects) is never garbage, so
# it is frozen out of every walk. Requests in flight hold thousands of objects that
# die by reference count, not by collection; a first generation of 20,000 instead of
# 700 walks them 30 times less often. On 500 simultaneous failovers in one process
# (medians of 7 runs), CPU per failover went 1.6 -> 1.1 ms and lateness p50 84 -> 39 ms.
GC_THRESHOLD = (20_000, 10, 10)


def tune_gc() -> None:
    """Freeze what start-up built and collect less often (see GC_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


# glibc hands a freed block back to the kernel when more than twice the size of the
# last large free sits unused at the top of the heap, and maps blocks above ~128 KiB
# afresh. A 10 MB request body passes through ~4 buffers of its size (the body, the
# decoded prompt, the upstream request, h11's write), so every such request faulted
# ~7,300 pages (~29 MB) back in: ~20 ms of kernel time, a third of its CPU, and the
# reason a 10 MB body cost 10-17x a 1 MB one. With these bounds, buffers up to 32 MiB
# (twice max_body_bytes' default) come from the heap, and up to 64 MiB of freed heap is
# kept for the next one (RSS stays that much higher after a large request).
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> None:
    """Fixed glibc malloc thresholds (see MALLOC_TRIM_THRESHOLD); elsewhere, nothing."""
    import ctypes  # only here: the daemon's one use of it

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their own defaults
        return
    mallopt(ctypes.c_int(-1), ctypes.c_int(MALLOC_TRIM_THRESHOLD))  # M_TRIM_THRESHOLD
    mallopt(ctypes.c_int(-3), ctypes.c_int(MALLOC_MMAP_THRESHOLD))  # M_MMAP_THRESHOLD


def peer_credentials(stream: trio.abc.Stream, groups: bool = False) -> Peer:
    """The peer's pid, uid and gid; with `groups`, its supplementary groups too."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family != _socket.AF_UNIX:
        return Peer()
    try:
        raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return Peer()
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, peer_groups(sock) if groups else ())


# SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups as of connect(2), an array
# of gid_t. Python does not name it; the value is the same on every Linux architecture.
SO_PEERGROUPS = getattr(_socket, "SO_PEERGROUPS", 59)
NGROUPS_MAX = 65536


def peer_groups(sock: trio.socket.SocketType) -> tuple[int, ...]:
    size = 64  # enough for nearly everyone; ERANGE means more: ask again with room for all
    while True:
        try:
            raw = sock.getsockopt(_socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as e:
            if e.errno == errno.ERANGE and size < NGROUPS_MAX:
                size = NGROUPS_MAX
                continue
            return ()  # an older kernel: primary groups only
        return struct.unpack(f"{len(raw) // 4}I", raw)


def _clear_socket_path(path: str) -> None:
    """Replace a stale socket file; refuse a live socket or anything that is not one."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise StartupError(f"daemon.socket = {path} exists and is not a socket; refusing to "
                               "replace it: remove it or choose another path")
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: left by a daemon that died
        else:
            raise StartupError(f"another process is already listening on {path}; stop it or "
                               "set daemon.socket to another path")
        finally:
            probe.close()
    make_systemd_directory(os.path.dirname(path))


async def open_unix_listener(path: str, mode: str) -> trio.SocketListener:
    _clear_socket_path(path)
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # never world-accessible, even for an instant
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, int(mode, 8))
    sock.listen(_socket.SOMAXCONN)
    return trio.SocketListener(sock)


def activated_listeners() -> list[trio.SocketListener]:
    """Sockets passed by systemd socket activation (LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    # SD_LISTEN_FDS_START: systemd passes sockets from fd 3 on.
    return [trio.SocketListener(trio.socket.from_stdlib_socket(_socket.socket(fileno=3 + i)))
            for i in range(count)]


async def open_listeners(cfg: Config, inherited: list[trio.SocketListener] | None = None
                         ) -> list[trio.SocketListener]:
    listeners = activated_listeners() if inherited is None else list(inherited)
    if not listeners:
        try:
            listeners.append(await open_unix_listener(cfg.daemon.socket, cfg.daemon.socket_mode))
        except OSError as e:
            raise StartupError(f"cannot listen on daemon.socket = {cfg.daemon.socket}: "
                               f"{e.strerror or e}") from None
    if cfg.daemon.tcp:
        host, _, port = cfg.daemon.tcp.rpartition(":")
        try:
            listeners += await trio.open_tcp_listeners(int(port), host=host.strip("[]"))
        except OSError as e:
            raise StartupError(f"cannot listen on daemon.tcp = {cfg.daemon.tcp}: "
                               f"{e.strerror}") from None
    return listeners


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)


# Descriptors kept for what is not a client connection: listeners, the ledger, the
# state file, alert commands' pipes, idle upstream connections, and the connections
# over the cap that are answered 503 (at most SPARE_CONNECTIONS at once).
FD_RESERVE = 128
SPARE_CONNECTIONS = 32


def connection_cap(open_files: int) -> int:
    """daemon.max_connections when unset: a client connection with a request in flight
    holds a second descriptor upstream, so half of what the reserve leaves."""
    return max(16, (open_files - FD_RESERVE) // 2)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's default soft limit is
    1,024); (soft limit before, soft limit now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= soft:
        return soft, soft  # the kernel's own cap (fs.nr_open) applies instead
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
        return soft, soft
    return soft, hard


def admit_connection(d: Daemon) -> bool:
    """Count a new client connection: True if it fits under daemon.max_connections,
    where an idle keep-alive connection is closed to make room when there is one."""
    d.connection_opened()
    if d.connections <= d.max_connections:
        return True
    # Keep-alive connections between requests first, then new ones that have sent
    # nothing yet: neither has a request that closing it would cut.
    for waiting in (d.idle_scopes, d.first_waits):
        while waiting:
            idle = waiting.pop()
            if not idle.cancel_called:
                idle.cancel()  # it closes at its next checkpoint, and the count goes down
                return True
    return False


async def serve(
    d: Daemon, listeners: list[trio.abc.Listener[Any]], *,
    task_status: trio.TaskStatus[None] = TASK_STATUS_IGNORED,
) -> None:
    """Accept until `d.shutdown` is set, then drain in-flight requests within the grace."""

    async def handler(stream: trio.abc.Stream) -> None:
        admitted = admit_connection(d)
        try:
            if admitted or d.connections <= d.max_connections + SPARE_CONNECTIONS:
                groups = d.cfg.daemon.allow_gids is not None
                await handle_connection(d, stream, peer_credentials(stream, groups),
                                        admitted=admitted)
            else:  # far past the cap: closed unread
                with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                    await stream.aclose()
        finally:
            d.connection_closed()

    async with trio.open_nursery() as connections:
        d.background = connections
        connections.start_soon(d.autosave)
        connections.start_soon(d.watch_lag)
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(accept_loop, listener, handler, connections)
            task_status.started()
            await d.shutdown.wait()
            accepting.cancel_scope.cancel()
        d.draining = True
        d.shadows.cancel()
        for listener in listeners:
            await listener.aclose()
        for scope in list(d.idle_scopes):
            end_wait(scope, first=False)
        for scope in list(d.first_waits):
            end_wait(scope, first=True)
        with trio.move_on_after(d.cfg.daemon.shutdown_grace_s):
            await d.no_inflight.wait()
            await d.no_connections.wait()  # each closes after the request it is serving
        for req in d.inflight.values():
            req.cancel_reason = "shutdown"
        d.save_state()
        connections.cancel_scope.cancel()


# Connections accepted per wake-up of the accept loop before it lets others run.
ACCEPT_BATCH = 256
# accept(2) errors that mean "out of a resource for now": wait and go on.
ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept(2) errors about the one connection being accepted (a firewall's EPERM, a
# client that reset first, ...): skip it. The list is trio's own listener's.
ACCEPT_SKIP_ERRNOS = {getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
    "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET") if hasattr(errno, name)}


async def accept_loop(listener: trio.SocketListener,
                      handler: Callable[[trio.abc.Stream], Awaitable[None]],
                      nursery: trio.Nursery) -> None:
    """Accept every pending connection at each wake-up.

    trio's listener accepts one connection per scheduling round. Under load that
    leaves the queue in the kernel's accept backlog, where requests wait unseen by the
    overload signal (and unshed) while clients time out. Accepting them all moves the
    queue into the event loop, whose lag is what the shedder watches.
    """
    fd = listener.socket.fileno()
    # accept(2) on a duplicate of the listening descriptor: the stdlib socket accepts
    # without trio's per-call checkpoint. Closed on the way out, with the listener.
    sock = _socket.socket(fileno=os.dup(fd))
    warned = 0.0
    try:
        while True:
            await trio.lowlevel.wait_readable(fd)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in ACCEPT_SKIP_ERRNOS:
                        continue
                    if e.errno not in ACCEPT_RETRY_ERRNOS:
                        raise
                    if time.monotonic() - warned > 60:
                        warned = time.monotonic()
                        log.error("cannot accept connections: %s; retrying every 0.1 s (raise "
                                  "LimitNOFILE if this is the open-file limit)", e.strerror)
                    await trio.sleep(0.1)
                    break
                nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
    finally:
        sock.close()


async def _watch_signals(d: Daemon, config_path: str | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                reload_and_tell(d, config_path)
                continue
            log.warning("%s: stopping; in-flight requests get %g s to finish",
                        signal.Signals(signum).name, d.cfg.daemon.shutdown_grace_s)
            sd_notify("STOPPING=1")
            d.shutdown.set()


def reload_and_tell(d: Daemon, config_path: str | None) -> None:
    """SIGHUP (`systemctl reload`): reopen the ledger, take the new config or keep the
    old one, and tell systemd. Under Type=notify-reload, `systemctl reload` waits from
    RELOADING=1 to READY=1; STATUS= (shown by `systemctl status`) says whether it took."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
    d.ledger.reopen()
    error = d.reload(config_path) if config_path is not None else None
    if error is None:
        sd_notify(f"READY=1\nSTATUS={serving_status(d)}")
        return
    log.error("reload failed, still serving the previous config: %s", error)
    # STATUS= is one line: "PATH: invalid config: ERROR; ERROR"
    reason = re.sub(r"(:?)\n\s*", lambda m: ": " if m.group(1) else "; ", error)
    sd_notify(f"READY=1\nSTATUS=reload rejected, still serving the previous config: {reason}")


def serving_status(d: Daemon) -> str:
    return f"serving {len(d.routes)} route(s), {len(d.cfg.providers)} provider(s)"


async def _watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _serve_then_stop(
    d: Daemon, listeners: list[trio.abc.Listener[Any]], helpers: trio.CancelScope, *,
    task_status: trio.TaskStatus[None] = TASK_STATUS_IGNORED,
) -> None:
    await serve(d, listeners, task_status=task_status)
    helpers.cancel()


def resolve_keys(cfg: Config, env: Mapping[str, str]) -> dict[str, str | None]:
    return {name: resolve_api_key(name, p, env) for name, p in cfg.providers.items()}


async def run_daemon(cfg: Config, config_path: str | None) -> None:
    inherited = activated_listeners()
    problems = host_errors(cfg, socket=not inherited)
    if problems:
        raise StartupError("\n  ".join(["cannot start:", *problems]))
    try:
        keys = resolve_keys(cfg, os.environ)
        ledger = Ledger(cfg.daemon.ledger)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"cannot open daemon.ledger = {cfg.daemon.ledger}: {e.strerror}; "
                           "create the directory or fix its permissions") from None
    was, open_files = raise_fd_limit()
    d = Daemon(cfg, ledger=ledger, keys=keys)
    log.info("open files: %d allowed%s; at most %d client connections (daemon.max_connections)",
             open_files, f" (raised from {was})" if was != open_files else "",
             d.max_connections)
    listeners = await open_listeners(cfg, inherited)
    # The socket file is ours to remove only if we bound it: an inherited one belongs to
    # failoverd.socket, which keeps listening (and queueing clients) across restarts.
    own_socket = None if inherited else _file_id(cfg.daemon.socket)
    tune_gc()
    tune_malloc()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, d, config_path)
            if (usec := os.environ.get("WATCHDOG_USEC", "")).isdigit():
                nursery.start_soon(_watchdog, int(usec) / 2e6)
            await nursery.start(_serve_then_stop, d, listeners, nursery.cancel_scope)
            sd_notify(f"READY=1\nSTATUS={serving_status(d)}")
            log.info("failoverd %s serving %d route(s) on %s%s; ledger %s", __version__,
                     len(d.routes), ", ".join(map(_listener_name, listeners)),
                     " (socket activation)" if inherited else "", cfg.daemon.ledger)
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await d.aclose()
        ledger.close()
        if own_socket is not None and _file_id(cfg.daemon.socket) == own_socket:
            with contextlib.suppress(OSError):
                os.unlink(cfg.daemon.socket)


def _file_id(path: str) -> tuple[int, int] | None:
    """Which socket file is at `path` (device, inode), so that a daemon removes only the
    one it bound, never one inherited or since replaced by another daemon."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def _listener_name(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    if isinstance(name, tuple):
        return f"tcp {name[0]}:{name[1]}"
    return os.fsdecode(name) or "an unnamed socket"


# ---------------------------------------------------------------------------
# Demo
# A scripted OpenAI-compatible upstream on loopback (also used by the tests) and
# `failoverd demo`: hung, heartbeat-only and healthy upstreams, one timeline each.
# ---------------------------------------------------------------------------

# A script is a list of steps the fake upstream performs in order:
#   ("respond", status, headers, body)  a whole non-streamed reply, then close
#   ("head", status, headers)           start a close-delimited reply (default: 200 SSE)
#   ("chunked", status, headers)        start a chunked reply (default: 200 SSE) on a
#                                       kept-alive connection: each later write step is one
#                                       HTTP chunk ("raw" bytes go out unframed)
#   ("end",)                            the terminating chunk: the reply is complete and
#                                       the connection waits for its next request
#                                       (FakeUpstream only: MockUpstreams knows no chunks)
#   ("raw", bytes)                      write bytes as they are
#   ("sse", dict | str)                 one `data:` event (dicts are JSON-encoded)
#   ("comment", text)                   an SSE comment: a heartbeat
#   ("sleep", seconds) / ("hang",)      wait, or wait forever
#   ("close",)                          drop the connection here
Script = list[tuple[Any, ...]]


def sse_chunk(
    content: str | None = None, *, finish: str | None = None, role: str | None = None,
    model: str = "sim-1", usage: tuple[int, int] | None = None, choices: bool = True,
) -> dict[str, Any]:
    """One OpenAI chat.completion.chunk."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    chunk: dict[str, Any] = {
        "id": "chatcmpl-sim", "object": "chat.completion.chunk", "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        chunk["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                          "total_tokens": sum(usage)}
    return chunk


def token_script(
    parts: Iterable[str], *, gap: float = 0.0, first: float = 0.0, model: str = "sim-1",
    prompt_tokens: int = 12, done: bool = True,
) -> Script:
    """A healthy stream: role delta, one chunk per part, finish, usage, [DONE]."""
    parts = list(parts)
    steps: Script = [("head", 200, {}), ("sse", sse_chunk(role="assistant", content="",
                                                          model=model))]
    for i, part in enumerate(parts):
        steps.append(("sleep", first if i == 0 else gap))
        steps.append(("sse", sse_chunk(part, model=model)))
    steps.append(("sse", sse_chunk(finish="stop", model=model)))
    steps.append(("sse", sse_chunk(model=model, choices=False,
                                   usage=(prompt_tokens, len(parts)))))
    if done:
        steps.append(("sse", "[DONE]"))
    return [s for s in steps if s != ("sleep", 0.0)]


def script_bytes(step: tuple[Any, ...]) -> bytes:
    """The body bytes a write-step puts on the wire."""
    kind = step[0]
    if kind == "raw":
        return step[1]
    if kind == "sse":
        data = step[1] if isinstance(step[1], str) else _json_encode(step[1]).decode()
        return f"data: {data}\n\n".encode()
    if kind == "comment":
        return f": {step[1]}\n\n".encode()
    raise ValueError(f"not a write step: {step!r}")


class FakeUpstream:
    """A scripted upstream HTTP server on 127.0.0.1 for the demo and end-to-end tests.

    `scripts(model, body, n)` returns the script for the n-th request (0-based). A
    script that ends with ("end",) keeps its connection for the next request;
    `connections` counts the connections accepted (`serve_stream` serves one given).
    """

    def __init__(self, scripts: Callable[[str, dict[str, Any], int], Script]) -> None:
        self.scripts = scripts
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.disconnects = 0  # clients that hung up while their script was still running
        self.disconnected = trio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self, *, task_status: trio.TaskStatus[None] = TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.serve_stream, listeners)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve requests on one connection until a reply closes it."""
        self.connections += 1
        leftover = b""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 h11.RemoteProtocolError):
            while True:
                conn = h11.Connection(h11.SERVER)
                if leftover:
                    conn.receive_data(leftover)
                body = await self._request(conn, stream)
                if body is None or not await self._reply(stream, body):
                    break
                leftover = conn.trailing_data[0]
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await stream.aclose()

    async def _request(self, conn: h11.Connection, stream: trio.abc.Stream
                       ) -> dict[str, Any] | None:
        parts = []
        while True:
            event = await _next_event(conn, stream)
            if isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return msgspec.json.decode(b"".join(parts)) if parts else {}
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _reply(self, stream: trio.abc.Stream, body: dict[str, Any]) -> bool:
        """Play the request's script; True if the connection stays open after it."""
        n = len(self.requests)
        self.requests.append(body)
        script = self.scripts(str(body.get("model")), body, n)
        done = False  # stays False if the client hangs up first
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, stream, nursery.cancel_scope)
            done = await self._play(stream, script)
            nursery.cancel_scope.cancel()
        return done and bool(script) and script[-1] == ("end",)

    async def _watch(self, stream: trio.abc.Stream, script_scope: trio.CancelScope) -> None:
        """Notice the client hanging up, without taking bytes of its next request."""
        sock = getattr(stream, "socket", None)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if sock is not None:
                if await sock.recv(1, _socket.MSG_PEEK):
                    return  # the client sent more: its next request, not a hang-up
            else:
                while await stream.receive_some(RECV_SIZE):
                    pass
        self.disconnects += 1
        self.disconnected.set()
        script_scope.cancel()

    async def _play(self, stream: trio.abc.Stream, script: Script) -> bool:
        """Write the script's bytes; False if a "reset" step dropped the connection."""
        if script and script[0][0] not in ("head", "respond", "chunked"):
            script = [("head", 200, {}), *script]
        try:
            async for piece in play_script(script):
                await stream.send_all(piece)
        except ConnectionResetError:  # a "reset" step: just drop it
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # the client hung up mid-reply (caught here, not as a group)
        return True


def _reply_head(step: tuple[Any, ...]) -> bytes:
    kind, status = step[0], step[1]
    headers = {k.lower(): v for k, v in step[2].items()}
    if kind == "respond":
        headers.setdefault("content-type", "application/json")
        headers["content-length"] = str(len(step[3]))
    else:
        headers.setdefault("content-type", "text/event-stream")
    if kind == "chunked":
        headers["transfer-encoding"] = "chunked"
    else:
        headers["connection"] = "close"
    return (f"HTTP/1.1 {status} X\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


async def play_script(script: Script) -> AsyncIterator[bytes]:
    """The bytes a script puts on the wire, at the times it puts them; ends at a
    "close" step, raises ConnectionResetError at a "reset" step."""
    chunked = False
    for step in script:
        kind = step[0]
        if kind == "sleep":
            await trio.sleep(step[1])
        elif kind == "hang":
            await trio.sleep_forever()
        elif kind in ("close", "end"):
            if kind == "end":
                yield b"0\r\n\r\n"
            return
        elif kind == "reset":
            raise ConnectionResetError("connection reset by peer")
        elif kind in ("head", "respond", "chunked"):
            chunked = kind == "chunked"
            yield _reply_head(step) + (step[3] if kind == "respond" else b"")
            if kind == "respond":
                return
        elif chunked and kind != "raw":
            data = script_bytes(step)
            yield b"%x\r\n%b\r\n" % (len(data), data)
        else:
            yield script_bytes(step)


# A prefill a ContinuingModel refuses, with the error text a real server of that shape
# sends (see _PREFILL_REJECTED for where each comes from).
_FAKE_REJECTIONS = {
    "anthropic": (400, {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "This model does not support assistant message prefill. The conversation "
                   "must end with a user message."}}),
    "anthropic_whitespace": (400, {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "messages: final assistant content cannot end with trailing whitespace"}}),
    "trailing": (400, {"error": {
        "message": "Expected last role User or Tool (or Assistant with prefix True) for serving"
                   " but got assistant", "type": "invalid_request_error", "param": None,
        "code": "3230"}}),
    "prefix": (400, {"error": {
        "message": "'messages.1' : for 'role:assistant' the following must be satisfied"
                   "[('messages.1' : property 'prefix' is unsupported, did you mean 'name'?)]",
        "type": "invalid_request_error", "param": None, "code": None}}),
    "vllm": (400, {"error": {
        "message": "Unrecognized request argument supplied: add_generation_prompt, "
                   "continue_final_message", "type": "invalid_request_error", "param": None,
        "code": None}}),
}


def _fake_event(name: str, data: dict[str, Any]) -> tuple[Any, ...]:
    return ("raw", f"event: {name}\ndata: {_json_encode(data).decode()}\n\n".encode())


def _rest(parts: list[str], done: str) -> list[str]:
    """The pieces of `parts` after the text `done` (where they begin): the first may be
    the tail of the piece the text ends in, as when a model continues mid-token."""
    out, at = [], 0
    for part in parts:
        end = at + len(part)
        if end > len(done):
            out.append(part[max(0, len(done) - at):])
        at = end
    return out


class ContinuingModel:
    """A scripted model that knows one canonical answer and really continues it.

    Callable as FakeUpstream's `scripts(model, body, n)` (the tests' MockUpstreams
    takes it as a key's script too). A request that ends in a user message gets the
    answer from the start: `reasoning` pieces, then `parts` (with `cut_after = N`, only
    the first N pieces, then the stream breaks as `breaks` says: "close", "hang",
    "error" event or "garbage" data). A request whose final assistant message is a
    prefill in the shape `prefill` names gets the rest of the answer after that text:
    - "trailing": any final assistant message; "prefix": only with "prefix": true, its
      reasoning_content continued (a final assistant message without it: Mistral's 400);
    - "vllm": only with continue_final_message true and add_generation_prompt false
      (without, vLLM answers a new turn after it: the answer again from the start);
    - kind "anthropic" (Messages SSE): a final assistant message, refused with the
      API's 400 when it ends in whitespace.
    A prefill that is not where the canonical answer begins gets a 500 naming both (a
    test or the shaping got it wrong). `rejects`: every prefill gets a realistic 400.
    """

    def __init__(
        self, parts: Iterable[str], *, reasoning: Iterable[str] = (), prefill: str = "trailing",
        kind: str = "openai", cut_after: int | None = None, breaks: str = "close",
        rejects: bool = False, gap: float = 0.0, model: str = "sim-1",
    ) -> None:
        self.parts, self.reasoning = list(parts), list(reasoning)
        self.prefill, self.kind, self.rejects = prefill, kind, rejects
        self.cut_after, self.breaks = cut_after, breaks
        self.gap, self.model = gap, model

    @property
    def answer(self) -> str:
        return "".join(self.parts)

    def __call__(self, model: str, body: dict[str, Any], n: int) -> Script:
        messages = body.get("messages") or [{}]
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        if last.get("role") != "assistant":
            return self._stream(self.reasoning, self.parts, self.cut_after)
        content = last.get("content") if isinstance(last.get("content"), str) else ""
        refusal = self._refusal(body, last, content)
        if refusal is not None:
            status, error = _FAKE_REJECTIONS[refusal]
            return [("respond", status, {}, _json_encode(error))]
        if self.kind == "openai" and self.prefill == "vllm" and not (
                body.get("continue_final_message") is True
                and body.get("add_generation_prompt") is False):
            return self._stream(self.reasoning, self.parts, None)
        reasoning = last.get("reasoning_content") if self.prefill == "prefix" else ""
        return self._continue(content, reasoning if isinstance(reasoning, str) else "")

    def _refusal(self, body: dict[str, Any], last: dict[str, Any], content: str) -> str | None:
        """Which of _FAKE_REJECTIONS this request's prefill gets, if any."""
        if self.kind == "anthropic":
            if self.rejects:
                return "anthropic"
            return "anthropic_whitespace" if content != content.rstrip() else None
        if self.rejects:
            return self.prefill
        if self.prefill == "prefix" and last.get("prefix") is not True:
            return "trailing"  # Mistral: a final assistant message needs prefix: true
        return None

    def _continue(self, content: str, reasoning: str) -> Script:
        canonical_reasoning = "".join(self.reasoning)
        if not self.answer.startswith(content) or not canonical_reasoning.startswith(reasoning):
            message = (f"fake upstream: the prefill {content!r} (reasoning {reasoning!r}) is not "
                       f"where the canonical answer {self.answer!r} begins")
            return [("respond", 500, {}, _json_encode({"error": {"message": message}}))]
        if content:  # the answer had begun: no more thinking
            return self._stream([], _rest(self.parts, content), None)
        return self._stream(_rest(self.reasoning, reasoning), self.parts, None)

    def _stream(self, reasoning: list[str], parts: list[str], cut: int | None) -> Script:
        pieces = [("reasoning", r) for r in reasoning] + [("content", p) for p in parts]
        whole = cut is None or cut >= len(pieces)
        pieces = pieces[:cut]
        events = (self._anthropic if self.kind == "anthropic" else self._openai)(pieces, whole)
        steps: Script = [("head", 200, {})]
        for event in events:
            if event[0] == "piece" and self.gap:
                steps.append(("sleep", self.gap))
            steps.append(event[1] if event[0] == "piece" else event)
        if not whole:
            steps += self._break()
        return steps

    def _openai(self, pieces: list[tuple[str, str]], whole: bool) -> Script:
        role = sse_chunk(role="assistant", content="", model=self.model)
        steps: Script = [("sse", role)]
        for channel, text in pieces:
            chunk = sse_chunk(model=self.model)
            chunk["choices"][0]["delta"] = {
                "reasoning_content" if channel == "reasoning" else "content": text}
            steps.append(("piece", ("sse", chunk)))
        if whole:
            steps += [("sse", sse_chunk(finish="stop", model=self.model)),
                      ("sse", sse_chunk(model=self.model, choices=False,
                                        usage=(12, len(pieces)))),
                      ("sse", "[DONE]")]
        return steps

    def _anthropic(self, pieces: list[tuple[str, str]], whole: bool) -> Script:
        steps: Script = [_fake_event("message_start", {"type": "message_start", "message": {
            "id": "msg_sim", "model": self.model, "usage": {"input_tokens": 12}}})]
        block, index = None, -1
        for channel, text in pieces:
            kind = "thinking" if channel == "reasoning" else "text"
            if block != kind:
                if block is not None:
                    steps.append(_fake_event("content_block_stop", {
                        "type": "content_block_stop", "index": index}))
                block, index = kind, index + 1
                steps.append(_fake_event("content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {"type": kind, kind: ""}}))
            steps.append(("piece", _fake_event("content_block_delta", {
                "type": "content_block_delta", "index": index,
                "delta": {"type": f"{kind}_delta", kind: text}})))
        if whole:
            if block is not None:
                steps.append(_fake_event("content_block_stop", {
                    "type": "content_block_stop", "index": index}))
            steps += [
                _fake_event("message_delta", {"type": "message_delta", "delta": {
                    "stop_reason": "end_turn"}, "usage": {"output_tokens": len(pieces)}}),
                _fake_event("message_stop", {"type": "message_stop"})]
        return steps

    def _break(self) -> Script:
        if self.breaks == "hang":
            return [("hang",)]
        if self.breaks == "garbage":
            return [("raw", b"data: {not json\n\n"), ("close",)]
        if self.breaks == "error":
            if self.kind == "anthropic":
                return [_fake_event("error", {"type": "error", "error": {
                    "type": "overloaded_error", "message": "Overloaded"}}), ("close",)]
            return [("sse", {"error": {"message": "Internal error", "type": "server_error"}}),
                    ("close",)]
        return [("close",)]


DEMO_FIRST_TOKEN_S = 1.5


def _demo_scripts(model: str, body: dict[str, Any], n: int) -> Script:
    if model == "stuck":
        return [("hang",)]  # accepts the request, never answers
    if model == "heartbeat-only":
        return [("head", 200, {}), *[("comment", "keep-alive"), ("sleep", 0.25)] * 400]
    if model == "cuts-out":
        return token_script(["The answer is", " forty"], gap=0.3, done=False)[:-3] + [("close",)]
    words = ["Hello", " from", " the", " healthy", " upstream", "."]
    return token_script(words, first=0.05, gap=0.05, model="healthy")


def demo_config(port: int, workdir: str) -> Config:
    base = f"http://127.0.0.1:{port}/v1"
    return Config(
        daemon=DaemonConfig(socket=os.path.join(workdir, "failoverd.sock"),
                            ledger=os.path.join(workdir, "ledger.jsonl")),
        defaults=Timing(first_token_timeout_s=DEMO_FIRST_TOKEN_S, stall_timeout_s=1.0,
                        total_timeout_s=20.0),
        providers={
            "hung": ProviderConfig(base_url=base),
            "beat": ProviderConfig(base_url=base),
            "good": ProviderConfig(base_url=base),
        },
        routes={
            "demo": RouteConfig(chain=["hung/stuck", "beat/heartbeat-only", "good/healthy"]),
            "flaky": RouteConfig(chain=["good/cuts-out", "good/healthy"]),
        },
    )


def _demo_timeline(ledger_path: str, request_id: str, t0: float) -> list[str]:
    lines = []
    for _, row in read_ledger(ledger_path):
        if not isinstance(row, AttemptRow) or row.request_id != request_id:
            continue
        end = _dt.datetime.fromisoformat(row.ts).timestamp() - t0
        slot = f"{row.provider}/{row.model}"
        if row.outcome == "skipped":
            lines.append(f"  {end:6.2f} s  {slot:<22} skipped ({row.skip_reason})")
            continue
        start = end - (row.latency_ms or 0) / 1000
        lines.append(f"  {start:6.2f} s  {slot:<22} request sent")
        if row.outcome == "ok":
            first = start + (row.ttft_ms or 0) / 1000
            lines.append(f"  {first:6.2f} s  {slot:<22} first token: the answer starts")
            lines.append(f"  {end:6.2f} s  {slot:<22} done, {row.tokens_out} tokens")
        else:
            lines.append(f"  {end:6.2f} s  {slot:<22} abandoned: {row.outcome} ({row.error})")
    return lines


async def run_demo(echo: Callable[[str], None] = print) -> int:
    """`failoverd demo`: watch failover on simulated upstreams. Returns an exit code."""
    upstream = FakeUpstream(_demo_scripts)
    with tempfile.TemporaryDirectory(prefix="failoverd-demo-") as workdir:
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream.serve)
            cfg = demo_config(upstream.port, workdir)
            ledger = Ledger(cfg.daemon.ledger)
            d = Daemon(cfg, ledger=ledger)
            listeners = [await open_unix_listener(cfg.daemon.socket, "0600")]
            await nursery.start(serve, d, listeners)
            echo(f"failoverd demo: simulated upstreams on 127.0.0.1:{upstream.port}, daemon on "
                 f"{cfg.daemon.socket}")
            echo(f"route demo = hung/stuck -> beat/heartbeat-only -> good/healthy, "
                 f"first_token_timeout_s = {DEMO_FIRST_TOKEN_S:g}\n")
            transport = httpx2.AsyncHTTPTransport(uds=cfg.daemon.socket)
            ok = True
            async with httpx2.AsyncClient(transport=transport, base_url="http://failoverd",
                                         timeout=30) as client:
                for title, route, stream in (
                    ("1. streaming request: a hung upstream, then one that only sends "
                     "heartbeats", "demo", True),
                    ("2. the same, non-streaming: failoverd streams upstream anyway, so the "
                     "deadlines hold", "demo", False),
                    ("3. an upstream cuts out after the answer started (after commit)",
                     "flaky", True),
                ):
                    ok &= await _demo_request(client, echo, title, route, stream,
                                              cfg.daemon.ledger)
            d.shutdown.set()
            ledger.close()
            echo(f"ledger rows written: {sum(1 for _ in read_ledger(cfg.daemon.ledger))} "
                 "(one per attempt, one per request), in a temporary ledger deleted now; "
                 "a daemon's own: `failoverd tail`")
            nursery.cancel_scope.cancel()
    return 0 if ok else 1


async def _demo_request(
    client: httpx2.AsyncClient, echo: Callable[[str], None], title: str, route: str,
    stream: bool, ledger_path: str,
) -> bool:
    echo(title)
    body = {"model": route, "stream": stream,
            "messages": [{"role": "user", "content": "Say hello."}]}
    t0 = time.time()
    first_at = None
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        rid = resp.headers.get("x-failoverd-request-id", "?")
        async for line in resp.aiter_lines():
            if stream and line.startswith("data: {"):
                event = msgspec.json.decode(line[6:])
                if "error" in event:
                    text.append(f"[in-band error: {event['error']['message']}]")
                    continue
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        first_at = first_at or time.time() - t0
                        text.append(choice["delta"]["content"])
            elif not stream and line:
                first_at = time.time() - t0
                reply = msgspec.json.decode(line)
                text.append(reply["choices"][0]["message"]["content"] if resp.status_code == 200
                            else reply["error"]["message"])
    for line in _demo_timeline(ledger_path, rid, t0):
        echo(line)
    served = resp.headers.get("x-failoverd-served-by", "nobody")
    when = f"{first_at:.2f} s" if first_at is not None else "never"
    echo(f"  client saw: HTTP {resp.status_code}, first byte of the answer at {when}, served by "
         f"{served}: {''.join(text)!r}\n")
    return resp.status_code == 200


# ---------------------------------------------------------------------------
# CLI
# The click group. `serve` only builds the config and calls trio.run; the rest
# read the config or the ledger.
# ---------------------------------------------------------------------------


def _config_path(path: str | None) -> str:
    return path or os.environ.get("FAILOVERD_CONFIG") or DEFAULT_CONFIG_PATH


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stderr it connected to
    journald; a stderr redirected since (by a shell started from a service) is not."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(stream) and stream == f"{st.st_dev}:{st.st_ino}"


def _setup_logging(verbose: bool, fmt: str = "text") -> None:
    """journald gets "<N>" priority prefixes and no timestamp (it keeps its own);
    anywhere else each line starts with the local time. `fmt="json"` makes each line
    one JSON object for log shippers (still priority-prefixed for journald)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(json=fmt == "json", journal=_stderr_is_journal()))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


class _LogFormatter(logging.Formatter):
    # journald's priorities (syslog's levels) for Python's.
    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def __init__(self, *, json: bool, journal: bool) -> None:
        super().__init__()
        self.json, self.journal = json, journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if self.json:
            text = msgspec.json.encode({"ts": utc_timestamp(record.created),
                                        "level": record.levelname.lower(),
                                        "logger": record.name, "msg": message}).decode()
        elif self.journal:
            text = message
        else:
            t = _dt.datetime.fromtimestamp(record.created).astimezone()
            text = (f"{t.isoformat(timespec='milliseconds')} failoverd "
                    f"{record.levelname}: {message}")
        if self.journal:
            return f"<{self.PRIORITIES.get(record.levelno, 6)}>{text}"
        return text


def _load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        click.echo(f"failoverd: {e}", err=True)
        sys.exit(1)


@click.group()
@click.version_option(__version__, prog_name="failoverd")
def cli() -> None:
    """failoverd: LLM failover daemon (OpenAI chat API on a Unix socket)."""


@cli.command("serve")
@click.option("--config", "config_path", help="Config file [default: $FAILOVERD_CONFIG or "
              f"{DEFAULT_CONFIG_PATH}]")
@click.option("--quiet", is_flag=True, help="Log warnings and errors only (no per-failure lines).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: one JSON object per log line, for log shippers.")
def serve_cmd(config_path: str | None, quiet: bool, log_format: str) -> None:
    """Run the daemon in the foreground (systemd Type=notify)."""
    _setup_logging(verbose=not quiet, fmt=log_format)
    path = _config_path(config_path)
    cfg = _load_or_exit(path)
    try:
        trio.run(run_daemon, cfg, path)
    except StartupError as e:
        click.echo(f"failoverd: {e}", err=True)
        sys.exit(1)


@cli.command("check")
@click.option("--config", "config_path", help="Config file [default: $FAILOVERD_CONFIG or "
              f"{DEFAULT_CONFIG_PATH}]")
@click.option("--no-keys", is_flag=True,
              help="Do not read API keys (validate on a machine without the credentials).")
def check_cmd(config_path: str | None, no_keys: bool) -> None:
    """Validate the config and print each route's worst case against client_cliff_s."""
    path = _config_path(config_path)
    cfg = _load_or_exit(path)
    # The worst case uses the deadlines the daemon has learned (SPEC section 10).
    learned, learned_from = read_learned_deadlines(state_file_path(cfg.daemon))
    lines, warnings = check_report(cfg, learned)
    lines.append(learned_from)
    problems = host_errors(cfg)
    for name, p in cfg.providers.items() if not no_keys else ():
        try:
            resolve_api_key(name, p, os.environ)
        except ConfigError as e:
            problems.append(str(e))
    click.echo(f"{path}: {len(cfg.providers)} provider(s), {len(cfg.routes)} route(s)")
    for line in lines:
        click.echo(line)
    for w in warnings:
        click.echo(f"warning: {w}")
    for p in problems:
        click.echo(f"error: {p}")
    if not no_keys and not os.environ.get("CREDENTIALS_DIRECTORY") and any(
            p.credential for p in cfg.providers.values()):
        click.echo("hint: $CREDENTIALS_DIRECTORY exists only inside the service (systemd's "
                   "LoadCredential=): run `failoverd check --no-keys` to check the rest, or, as "
                   "root, `CREDENTIALS_DIRECTORY=/etc/failoverd/keys failoverd check` to read "
                   "the key files themselves")
    if problems:
        sys.exit(1)
    click.echo("config OK")


def _cell(v: float | None, spec: str, suffix: str = "") -> str:
    """A number formatted for a table or a line; "-" when there is none."""
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _fmt_ms(v: float | None) -> str:
    return _cell(v, ".0f", "ms")


def local_time(ts: str) -> str:
    """A row's `ts` (UTC) in the local zone, with the zone: 2026-01-02 04:04:05.678 CET."""
    try:
        t = _dt.datetime.fromisoformat(ts).astimezone()
    except ValueError:
        return ts
    return f"{t:%Y-%m-%d %H:%M:%S}.{t.microsecond // 1000:03d} {t:%Z}"


def format_row(row: LedgerRow) -> str:
    """One human-readable line for `failoverd tail`."""
    ts = local_time(row.ts)
    if isinstance(row, AttemptRow):
        what = row.outcome if row.outcome != "skipped" else f"skipped:{row.skip_reason}"
        line = (f"{ts} attempt {row.request_id} {row.route} #{row.attempt} "
                f"{row.provider}/{row.model} {what}")
        if row.shadow:
            line += f" shadow-of={row.shadow_of}"
        if row.status is not None:
            line += f" status={row.status}"
        if row.outcome != "skipped":
            line += f" ttft={_fmt_ms(row.ttft_ms)} latency={_fmt_ms(row.latency_ms)}"
        if row.tokens_in is not None or row.tokens_out is not None:
            line += f" tokens={row.tokens_in or 0}/{row.tokens_out or 0}"
            line += "~" if row.tokens_estimated else ""
        if row.cost_usd:
            line += f" ${row.cost_usd:.6f}"
        if row.committed:
            line += " committed"
        if row.error:
            line += f" -- {row.error}"
        return line
    if isinstance(row, RequestRow):
        return (f"{ts} request {row.request_id} {row.route} {row.outcome} status={row.status} "
                f"served_by={row.served_by or '-'} attempts={row.attempts} "
                f"ttft={_fmt_ms(row.ttft_ms)} total={_fmt_ms(row.total_ms)}")
    return (f"{ts} breaker {row.scope} {row.key} {row.from_} -> {row.to} -- {row.reason}"
            + (f" (open until {local_time(row.open_until)})" if row.open_until else ""))


def _daemon_config(config_path: str | None) -> DaemonConfig:
    """[daemon] of the config (--config, $FAILOVERD_CONFIG, the default path), for the
    commands that find the ledger or the socket in it; the built-in defaults only when no
    config was named and the default file does not exist. A config that exists but does
    not load is an error: falling back would read some other ledger, or ask some other
    daemon, without saying so."""
    path = _config_path(config_path)
    if config_path is None and not os.environ.get("FAILOVERD_CONFIG") \
            and not os.path.exists(path):
        return DaemonConfig()
    return _load_or_exit(path).daemon


def _default_ledger(config_path: str | None) -> str:
    return _daemon_config(config_path).ledger


@cli.command("tail")
@click.argument("ledger", required=False)
@click.option("-n", "--lines", default=10, show_default=True, type=click.IntRange(min=0),
              help="Print the last N rows (that match the filters) first; 0 prints none, so "
              "`-n 0 -f` shows only new rows.")
@click.option("-f", "--follow", is_flag=True,
              help="Then keep printing rows as they are appended, across log rotation.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON rows.")
@click.option("--route", "routes", multiple=True, help="Only rows of this route (repeatable).")
@click.option("--outcome", "outcomes", multiple=True,
              help="Only attempts or requests with this outcome: ok, error, first_token_timeout, "
              "..., skipped, or a skip reason such as breaker_open (repeatable).")
@click.option("--request-id", "request_ids", multiple=True,
              help="Only the rows of this request (repeatable).")
@click.option("--config", "config_path", help="Config to find daemon.ledger in [default: "
              f"$FAILOVERD_CONFIG or {DEFAULT_CONFIG_PATH}].")
def tail_cmd(ledger: str | None, lines: int, follow: bool, as_json: bool,
             routes: tuple[str, ...], outcomes: tuple[str, ...],
             request_ids: tuple[str, ...], config_path: str | None) -> None:
    """Print the last rows of the ledger, like tail(1): human-readable (local time) by
    default. With a filter, breaker rows are left out (they belong to no request)."""
    path = ledger or _default_ledger(config_path)
    wanted = row_filter(routes, outcomes, request_ids)
    try:
        _tail(path, lines, follow, lambda line, row: click.echo(
            line.decode() if as_json else format_row(row)), wanted)
    except FileNotFoundError:
        click.echo(f"failoverd: no ledger at {path}; pass its path or check daemon.ledger",
                   err=True)
        sys.exit(1)
    except IsADirectoryError:
        click.echo(f"failoverd: {path} is a directory; pass the ledger file", err=True)
        sys.exit(1)
    except PermissionError:
        click.echo(_unreadable(path), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


def _unreadable(path: str) -> str:
    return (f"failoverd: cannot read {path}: permission denied; under the unit the ledger "
            "belongs to the failoverd user (mode 0600): run this as root, e.g. "
            "`sudo failoverd tail`")


def row_filter(routes: Iterable[str], outcomes: Iterable[str], request_ids: Iterable[str]
               ) -> Callable[[LedgerRow], bool] | None:
    """`tail`'s filters as one predicate (None: every row); all given filters must match."""
    routes, outcomes, request_ids = set(routes), set(outcomes), set(request_ids)
    if not (routes or outcomes or request_ids):
        return None

    def wanted(row: LedgerRow) -> bool:
        if isinstance(row, BreakerRow):
            return False
        if routes and row.route not in routes:
            return False
        if request_ids and row.request_id not in request_ids:
            return False
        skip = row.skip_reason if isinstance(row, AttemptRow) else None
        return not outcomes or row.outcome in outcomes or skip in outcomes

    return wanted


# `tail` reads the ledger backwards in blocks of this size.
TAIL_BLOCK = 64 * 1024
# How often `tail -f` looks for new rows and for rotation (tail(1)'s default is 1 s).
TAIL_POLL_S = 0.25

Emit = Callable[[bytes, LedgerRow], None]


def _after_last_newline(f: Any, end: int) -> int:
    """The offset just past the last newline before `end` (0 if there is none)."""
    pos = end
    while pos > 0:
        size = min(TAIL_BLOCK, pos)
        pos -= size
        f.seek(pos)
        i = f.read(size).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0


def last_rows(f: Any, end: int, count: int, wanted: Callable[[LedgerRow], bool] | None
              ) -> list[tuple[bytes, LedgerRow]]:
    """The last `count` rows that decode and are `wanted` among the whole lines before
    offset `end`, read backwards block by block: time and memory grow with what is
    printed (and skipped by a filter), not with the size of the file."""
    decoder = msgspec.json.Decoder(LedgerRow)
    found: list[tuple[bytes, LedgerRow]] = []
    pos, carry = end, b""
    while pos > 0 and len(found) < count:
        size = min(TAIL_BLOCK, pos)
        pos -= size
        f.seek(pos)
        lines = (f.read(size) + carry).split(b"\n")
        carry = lines.pop(0) if pos > 0 else b""  # may start mid-line: finish it next block
        for line in reversed(lines):
            if len(found) >= count:
                break
            decoded = _decoded(line, decoder) if line.strip() else None
            if decoded is not None and (wanted is None or wanted(decoded[1])):
                found.append(decoded)
    return found[::-1]


def _tail(path: str, count: int, follow: bool, emit: Emit,
          wanted: Callable[[LedgerRow], bool] | None = None) -> None:
    with open(path, "rb") as f:
        # Rows end with a newline; what follows the last one is a row being written
        # (or one torn by a crash): -f picks it up from there once it is whole.
        whole = _after_last_newline(f, os.fstat(f.fileno()).st_size)
        for line, row in last_rows(f, whole, count, wanted):
            emit(line, row)
        if follow:
            f.seek(whole)
            _follow(path, f, b"", emit, wanted)


def _follow(path: str, f: Any, partial: bytes, emit: Emit,
            wanted: Callable[[LedgerRow], bool] | None) -> None:
    """Print rows as they are appended; after rotation, finish the old file, then read
    the new one from its start (like `tail -F`)."""
    decoder = msgspec.json.Decoder(LedgerRow)

    def drain(partial: bytes) -> bytes:
        while chunk := f.read():
            *complete, partial = (partial + chunk).split(b"\n")
            for decoded in (_decoded(line, decoder) for line in complete if line.strip()):
                if decoded is not None and (wanted is None or wanted(decoded[1])):
                    emit(*decoded)
        return partial

    inode = os.fstat(f.fileno()).st_ino
    try:
        while True:
            partial = drain(partial)
            time.sleep(TAIL_POLL_S)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # rotated away; the new file is not there yet
            if st.st_ino != inode:
                partial = drain(partial)  # what was written to the old file meanwhile
                f.close()
                f = open(path, "rb")  # noqa: SIM115 -- kept open across iterations
                inode, partial = os.fstat(f.fileno()).st_ino, b""
            elif st.st_size < f.tell():  # truncated in place (copytruncate)
                f.seek(0)
                partial = b""
    finally:
        f.close()


# Outcomes that mean the upstream hung: no meaningful output before a deadline fired.
HANG_OUTCOMES = TIMEOUT_OUTCOMES
PERCENTILES = (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
# Request rows written before they carried total_timeout_s and client_cliff_s are held
# to the built-in defaults: `audit` marks every figure that rests on them as assumed.
ASSUMED_TOTAL_S = Timing().total_timeout_s
ASSUMED_CLIFF_S = DaemonConfig().client_cliff_s


def _rank(ordered: list[float], p: float) -> float:
    """The nearest-rank p-th percentile of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _pct(part: int, whole: int) -> float | None:
    """`part` as a percentage of `whole`, to one decimal; None when there is no whole."""
    return round(100 * part / whole, 1) if whole else None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an unsorted list; None when empty."""
    return _rank(sorted(values), p) if values else None


def distribution(values: Iterable[float]) -> dict[str, Any]:
    """n and nearest-rank p50/p90/p99/max (None when there is no sample), rounded to ms."""
    ordered = sorted(values)
    out: dict[str, Any] = {"n": len(ordered)}
    for name, p in PERCENTILES:
        out[name] = round(_rank(ordered, p), 3) if ordered else None
    return out


def silent_s(row: AttemptRow) -> float:
    """The longest time an attempt went without meaningful output: to its first token
    (all of it when none came), the longest gap after, or the stall that ended it."""
    if row.ttft_ms is None:
        return (row.latency_ms or 0.0) / 1000
    gap = max(row.ttft_ms, row.max_gap_ms or 0.0) / 1000
    if row.outcome == "stall_timeout" and row.stall_deadline_s is not None:
        gap = max(gap, row.stall_deadline_s)
    return gap


class _Margins:
    """How close the slowest of a set of requests came to its total_timeout_s and to
    the cliff, each request against the values in its own row."""

    __slots__ = ("n", "slowest", "to_total", "to_cliff", "assumed")

    def __init__(self) -> None:
        self.n = self.assumed = 0
        self.slowest = 0.0
        self.to_total = self.to_cliff = math.inf

    def add(self, row: RequestRow, total_s: float, assume_total: float, assume_cliff: float,
            ) -> None:
        self.n += 1
        if row.total_timeout_s is None or row.client_cliff_s is None:
            self.assumed += 1
        limit = assume_total if row.total_timeout_s is None else row.total_timeout_s
        cliff = assume_cliff if row.client_cliff_s is None else row.client_cliff_s
        self.slowest = max(self.slowest, total_s)
        self.to_total = min(self.to_total, limit - total_s)
        self.to_cliff = min(self.to_cliff, cliff - total_s)

    def report(self) -> dict[str, Any]:
        # "timed": the requests these margins are over (those that reached an upstream).
        if not self.n:
            return {"timed": 0, "slowest_s": None, "margin_to_total_s": None,
                    "margin_to_cliff_s": None, "assumed": 0}
        return {"timed": self.n, "slowest_s": round(self.slowest, 3),
                "margin_to_total_s": round(self.to_total, 3),
                "margin_to_cliff_s": round(self.to_cliff, 3), "assumed": self.assumed}


class _SlotAudit:
    __slots__ = ("position", "n", "ok", "skipped", "hangs", "long_waits", "failovers",
                 "retries", "hedges_lost", "held_s", "cost", "failed_cost", "latency", "ttft",
                 "served", "points", "deadlines")

    def __init__(self, position: int) -> None:
        self.position = position  # the lowest attempt index seen: its place in the chain
        self.n = self.ok = self.skipped = self.hangs = self.long_waits = 0
        self.failovers = self.retries = self.hedges_lost = 0
        self.held_s = self.cost = self.failed_cost = 0.0
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.served = _Margins()
        self.points: list[tuple[float, float, str]] = []  # (unix time, latency s, outcome)
        self.deadlines: tuple[float | None, float | None] = (None, None)  # the latest rows'

    def report(self, key: str) -> dict[str, Any]:
        n = self.n
        decided = n - self.hedges_lost  # a race lost says nothing of the slot's success
        return {
            "model": key, "position": self.position, "n": n, "skipped": self.skipped,
            "success_pct": _pct(self.ok, decided),
            "hangs": self.hangs, "hangs_over_threshold": self.long_waits,
            "hedges_lost": self.hedges_lost,
            "latency_s": distribution(self.latency), "ttft_s": distribution(self.ttft),
            "failed_held_s": round(self.held_s, 3), "failovers": self.failovers,
            "retries": self.retries, "cost_usd": round(self.cost, 6),
            "failed_cost_usd": round(self.failed_cost, 6), "served": self.served.report(),
            "first_token_deadline_s": self.deadlines[0], "stall_deadline_s": self.deadlines[1],
        }


class _Trend:
    """One --by bucket of a route."""

    __slots__ = ("requests", "ok", "latency", "margins", "hangs", "failovers", "cost")

    def __init__(self) -> None:
        self.requests = self.ok = self.hangs = self.failovers = 0
        self.cost = 0.0
        self.latency: list[float] = []
        self.margins = _Margins()

    def report(self, bucket: str) -> dict[str, Any]:
        return {"bucket": bucket, "requests": self.requests,
                "success_pct": _pct(self.ok, self.requests),
                "latency_s": distribution(self.latency), **self.margins.report(),
                "hangs": self.hangs, "failovers": self.failovers, "cost_usd": round(self.cost, 6)}


class _RouteAudit:
    __slots__ = ("requests", "ok", "latency", "margins", "slots", "trend", "total_s", "cliff_s",
                 "continued", "rescued")

    def __init__(self) -> None:
        self.requests = self.ok = 0
        self.continued = self.rescued = 0  # answers that broke and were continued (and ok)
        self.latency: list[float] = []
        self.margins = _Margins()
        self.slots: dict[str, _SlotAudit] = {}
        self.trend: dict[str, _Trend] = {}
        self.total_s: float | None = None  # the latest total_timeout_s seen in its rows
        self.cliff_s: float | None = None


class Audit:
    """`failoverd audit` as data: `add()` every row (files oldest first, as written),
    then `report()`. Pure: no I/O and no clock; the caller gives `since_ts` (a row `ts`
    to compare with) and the zone that --by buckets are cut in (None: local)."""

    def __init__(self, *, since_ts: str | None = None, hang_threshold_s: float = 120.0,
                 by: str | None = None, tz: _dt.tzinfo | None = None,
                 assume_total_s: float = ASSUMED_TOTAL_S,
                 assume_cliff_s: float = ASSUMED_CLIFF_S, points: bool = False) -> None:
        self.since_ts = since_ts
        self.hang_threshold_s = hang_threshold_s
        self.by = by
        self.tz = tz
        self.assume_total_s, self.assume_cliff_s = assume_total_s, assume_cliff_s
        self.keep_points = points
        self.rows = self.skipped_rows = self.unreadable = 0
        self.routes: dict[str, _RouteAudit] = {}
        self.compared: list[AttemptRow] = []  # shadows and the sampled answers they shadow
        # The last attempt of each request still open: (slot, failed, trend bucket).
        self._last: dict[str, tuple[_SlotAudit, str, bool, _Trend | None]] = {}
        self._labels: dict[str, str] = {}

    def add(self, row: LedgerRow | None) -> None:
        if row is None:
            self.unreadable += 1
            return
        if self.since_ts is not None and row.ts < self.since_ts:
            self.skipped_rows += 1
            return
        self.rows += 1
        if isinstance(row, AttemptRow):
            if row.shadow or row.answer_digest is not None:
                self.compared.append(row)
            if not row.shadow:  # shadows have a report of their own (shadow_report)
                self._attempt(row)
        elif isinstance(row, RequestRow):
            self._request(row)

    def _route(self, name: str) -> _RouteAudit:
        route = self.routes.get(name)
        if route is None:
            route = self.routes[name] = _RouteAudit()
        return route

    def _trend(self, route: _RouteAudit, ts: str) -> _Trend | None:
        if self.by is None:
            return None
        label = self._labels.get(ts[:16])  # zones are whole minutes off UTC
        if label is None:
            t = _dt.datetime.fromisoformat(ts[:16]).replace(tzinfo=_dt.UTC).astimezone(self.tz)
            label = self._labels[ts[:16]] = f"{t:%Y-%m-%d %H}:00" if self.by == "hour" \
                else f"{t:%Y-%m-%d}"
        bucket = route.trend.get(label)
        if bucket is None:
            bucket = route.trend[label] = _Trend()
        return bucket

    def _attempt(self, row: AttemptRow) -> None:
        route = self._route(row.route)
        key = f"{row.provider}/{row.model}"
        slot = route.slots.get(key)
        if slot is None:
            slot = route.slots[key] = _SlotAudit(row.attempt)
        slot.position = min(slot.position, row.attempt)
        if row.outcome == "skipped":
            slot.skipped += 1
            return
        bucket = self._trend(route, row.ts)
        previous = self._last.get(row.request_id)
        if previous is not None and previous[2]:  # the attempt before this one failed
            if previous[1] == key:
                previous[0].retries += 1
            else:
                previous[0].failovers += 1
                if previous[3] is not None:
                    previous[3].failovers += 1
        # A hedge that lost was beaten, not failed: it moved no request anywhere.
        failed = row.outcome not in ("ok", "hedge_lost")
        self._last[row.request_id] = (slot, key, failed, bucket)
        self._account(slot, row, failed, bucket)

    def _account(self, slot: _SlotAudit, row: AttemptRow, failed: bool,
                 bucket: _Trend | None) -> None:
        latency = (row.latency_ms or 0.0) / 1000
        hang = row.outcome in HANG_OUTCOMES
        slot.n += 1
        if row.first_token_deadline_s is not None:  # as of the latest attempt
            slot.deadlines = (row.first_token_deadline_s, row.stall_deadline_s)
        slot.ok += row.outcome == "ok"
        slot.hedges_lost += row.outcome == "hedge_lost"
        slot.hangs += hang
        slot.long_waits += silent_s(row) >= self.hang_threshold_s
        slot.cost += row.cost_usd or 0.0
        if row.outcome != "ok":
            slot.failed_cost += row.cost_usd or 0.0
        if failed:
            slot.held_s += latency
        elif row.outcome == "ok" and row.latency_ms is not None:
            slot.latency.append(latency)
        if row.ttft_ms is not None:
            slot.ttft.append(row.ttft_ms / 1000)
        if self.keep_points and row.latency_ms is not None:
            slot.points.append((_dt.datetime.fromisoformat(row.ts).timestamp(), latency,
                                row.outcome))
        if bucket is not None:
            bucket.hangs += hang
            bucket.cost += row.cost_usd or 0.0

    def _request(self, row: RequestRow) -> None:
        self._last.pop(row.request_id, None)
        route = self._route(row.route)
        total_s = row.total_ms / 1000
        ok = row.outcome == "ok"
        route.continued += row.continued
        route.rescued += row.continued and ok
        if row.total_timeout_s is not None:
            route.total_s = row.total_timeout_s
        if row.client_cliff_s is not None:
            route.cliff_s = row.client_cliff_s
        bucket = self._trend(route, row.ts)
        # Every request counts in n and ok%, the route's and its --by bucket's alike; one
        # refused before any upstream (overload) has no latency to speak of.
        args = (row, total_s, self.assume_total_s, self.assume_cliff_s)
        for tally in (route, bucket) if bucket is not None else (route,):
            tally.requests += 1
            tally.ok += ok
            if row.attempts:
                tally.latency.append(total_s)
                tally.margins.add(*args)
        if row.attempts and row.served_by is not None and row.served_by in route.slots:
            route.slots[row.served_by].served.add(*args)

    def report(self) -> dict[str, Any]:
        routes = []
        assumed = 0
        for name, r in sorted(self.routes.items()):
            slots = sorted(r.slots.items(), key=lambda kv: (kv[1].position, kv[0]))
            assumed += r.margins.assumed
            routes.append({
                "route": name, "requests": r.requests,
                "success_pct": _pct(r.ok, r.requests),
                "latency_s": distribution(r.latency), **r.margins.report(),
                "total_timeout_s": r.total_s, "client_cliff_s": r.cliff_s,
                "continued": r.continued, "rescued": r.rescued,
                "models": [s.report(key) for key, s in slots],
                "trend": [b.report(label) for label, b in sorted(r.trend.items())],
            })
        return {
            "rows": self.rows, "unreadable_lines": self.unreadable,
            "older_rows_skipped": self.skipped_rows, "since": self.since_ts,
            "hang_threshold_s": self.hang_threshold_s, "by": self.by,
            "assumed": {"requests": assumed, "total_timeout_s": self.assume_total_s,
                        "client_cliff_s": self.assume_cliff_s},
            "routes": routes, "shadows": shadow_report(self.compared),
        }

    def points(self) -> dict[tuple[str, str], list[tuple[float, float, str]]]:
        """Each (route, model)'s attempts as (unix time, latency s, outcome), for --html."""
        return {(name, key): s.points for name, r in self.routes.items()
                for key, s in r.slots.items()}


def _secs(v: float | None) -> str:
    """Seconds with the precision that matters at their size."""
    if v is None:
        return "-"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def _margin(m: dict[str, Any], key: str) -> str:
    value = m[key]
    return "-" if value is None else _secs(value) + ("*" if m["assumed"] else "")


def _table(title: str, columns: list[tuple[str, str]],
           wrap: tuple[str, ...] = ("model",)) -> Any:
    """A compact rich table: (header, justify) per column. Numbers never wrap; the
    `wrap` columns fold long names and wrap text (keeping room for a short name);
    other columns keep their width."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  show_edge=False, padding=0, title_style="bold")
    for header, justify in columns:
        folds = header in wrap
        table.add_column(header, justify=justify,  # type: ignore[arg-type]
                         overflow="fold", no_wrap=not folds, min_width=16 if folds else None)
    return table


def _audit_tables(route: dict[str, Any], threshold: float) -> list[Any]:
    attempts = _table("attempts", [("#", "right"), ("model", "left"), ("n", "right"),
                                   ("ok%", "right"), ("hangs", "right"),
                                   (f">={threshold:g}s", "right"), ("failovers", "right"),
                                   ("failed held s", "right"), ("cost $", "right")])
    latency = _table("latency, s (nearest rank over n); the deadline the latest attempt had", [
        ("#", "right"), ("model", "left"), ("", "left"), ("n", "right"), ("p50", "right"),
        ("p90", "right"), ("p99", "right"), ("max", "right"), ("deadline", "right")])
    margins = _table("the slowest request, s", [
        ("#", "right"), ("model", "left"), ("requests", "right"), ("slowest", "right"),
        ("to total_timeout_s", "right"), ("to cliff", "right")])
    whole = route["latency_s"]
    latency.add_row("", "all requests", "", *_dist_cells(whole), _secs(route["total_timeout_s"]))
    margins.add_row("", "all requests", f"{route['timed']:,}", _secs(route["slowest_s"]),
                    _margin(route, "margin_to_total_s"), _margin(route, "margin_to_cliff_s"))
    for m in route["models"]:
        pos = str(m["position"])
        attempts.add_row(pos, m["model"], f"{m['n']:,}",
                         _cell(m["success_pct"], ".1f"),
                         str(m["hangs"]), str(m["hangs_over_threshold"]), str(m["failovers"]),
                         _secs(m["failed_held_s"]), f"{m['cost_usd']:.4f}")
        latency.add_row(pos, m["model"], "answer", *_dist_cells(m["latency_s"]), "")
        latency.add_row("", "", "first token", *_dist_cells(m["ttft_s"]),
                        _secs(m["first_token_deadline_s"]))
        latency.add_row("", "", "longest gap", "", "", "", "", "", _secs(m["stall_deadline_s"]))
        served = m["served"]
        margins.add_row(pos, m["model"], f"{served['timed']:,}", _secs(served["slowest_s"]),
                        _margin(served, "margin_to_total_s"), _margin(served, "margin_to_cliff_s"))
    return [attempts, latency, margins]


def _dist_cells(d: dict[str, Any]) -> list[str]:
    return [f"{d['n']:,}", *(_secs(d[name]) for name, _ in PERCENTILES)]


def _trend_table(route: dict[str, Any], by: str) -> Any:
    table = _table(f"requests by {by} ({time.strftime('%Z')}), s", [
        (by, "left"), ("n", "right"), ("ok%", "right"), ("p50", "right"),
        ("p99", "right"), ("max", "right"), ("to\ntotal", "right"), ("to\ncliff", "right"),
        ("hangs", "right"), ("fail-\novers", "right"), ("cost $", "right")])
    for b in route["trend"]:
        d = b["latency_s"]
        table.add_row(b["bucket"], f"{b['requests']:,}",
                      _cell(b["success_pct"], ".1f"),
                      _secs(d["p50"]), _secs(d["p99"]), _secs(d["max"]),
                      _margin(b, "margin_to_total_s"), _margin(b, "margin_to_cliff_s"),
                      str(b["hangs"]), str(b["failovers"]), f"{b['cost_usd']:.4f}")
    return table


def _route_heading(route: dict[str, Any], report: dict[str, Any]) -> str:
    assumed = report["assumed"]
    total = route["total_timeout_s"]
    cliff = route["client_cliff_s"]
    limits = (f"total_timeout_s {_secs(total) if total is not None else 'not recorded'}, "
              f"client_cliff_s {_secs(cliff) if cliff is not None else 'not recorded'}")
    if total is None or cliff is None:
        limits += (f" (assumed {assumed['total_timeout_s']:g} s and "
                   f"{assumed['client_cliff_s']:g} s)")
    ok = _cell(route["success_pct"], ".1f", "% ok")
    rescued = (f", {route['rescued']:,} of {route['continued']:,} broken answers rescued by "
               "continuation" if route.get("continued") else "")
    return f"route {route['route']}: {route['requests']:,} requests, {ok}{rescued}\n  {limits}"


def render_audit(report: dict[str, Any], width: int | None, *, trend: bool = True) -> str:
    """The audit as text no wider than `width` columns (default: the terminal's).
    Models are listed in chain order; * marks a margin resting on assumed values."""

    def draw(console: Any) -> None:
        if not report["routes"]:
            console.print("no attempt or request rows" + (
                f" since {report['since']}" if report["since"] else ""))
        for route in report["routes"]:
            console.print(_route_heading(route, report), style="bold")
            for table in _audit_tables(route, report["hang_threshold_s"]):
                console.print(table)
            if trend and report["by"]:
                console.print(_trend_table(route, report["by"]))
            console.print()
        _print_shadows(console, report.get("shadows") or [])
        console.print(_audit_notes(report))
    return "".join(line + "\n" for line in _captured(width, draw))


def _captured(width: int | None, draw: Callable[[Any], None]) -> list[str]:
    """What `draw` prints on a plain rich console `width` columns wide, as lines
    without trailing blanks (rich is imported here, by the CLI only)."""
    from rich.console import Console

    console = Console(width=width, color_system=None, highlight=False, emoji=False)
    with console.capture() as captured:
        draw(console)
    return [line.rstrip() for line in captured.get().splitlines()]


def _audit_notes(report: dict[str, Any]) -> str:
    notes = [f"hangs: first-token, stall or total deadline fired with no answer; "
             f">={report['hang_threshold_s']:g}s: attempts that went that long without "
             "meaningful output (any outcome). failed held s: time failed attempts held their "
             "requests. cost includes failed attempts that produced output."]
    assumed = report["assumed"]
    if assumed["requests"]:
        notes.append(f"* {assumed['requests']:,} request row(s) predate total_timeout_s and "
                     "client_cliff_s in the ledger; their margins assume total_timeout_s = "
                     f"{assumed['total_timeout_s']:g} s and client_cliff_s = "
                     f"{assumed['client_cliff_s']:g} s (--assume-total, --assume-cliff).")
    if report["unreadable_lines"]:
        notes.append(f"{report['unreadable_lines']:,} line(s) were not ledger rows (torn by a "
                     "crash, or foreign) and were skipped.")
    return "\n".join(notes)


def _call_stats(rows: list[AttemptRow]) -> dict[str, Any]:
    """Calls, answers, latency and first-token distributions (answered calls), tokens
    (of the calls that produced output, which may be billed) and cost (all calls)."""
    ok = [r for r in rows if r.outcome == "ok"]
    billed = [r for r in rows if r.ttft_ms is not None]
    return {
        "n": len(rows), "ok": len(ok),
        "latency_s": distribution(r.latency_ms / 1000 for r in ok if r.latency_ms is not None),
        "ttft_s": distribution(r.ttft_ms / 1000 for r in ok if r.ttft_ms is not None),
        "tokens_in": sum(r.tokens_in or 0 for r in billed),
        "tokens_out": sum(r.tokens_out or 0 for r in billed),
        "cost_usd": round(sum(r.cost_usd or 0.0 for r in rows), 6),
    }


def _agreement(pairs: list[tuple[AttemptRow, AttemptRow]]) -> dict[str, Any]:
    """How often a shadow's answer agrees with its primary's, from their fingerprints:
    identical text (and tools), how much text the shadow wrote for the primary's (all
    characters over all characters), and on tool-call turns (either side called one)
    whether the same tools were called."""
    both = [(p, s) for p, s in pairs if s.outcome == "ok" and s.answer_digest is not None]
    exact = sum(p.answer_digest == s.answer_digest and p.tool_names == s.tool_names
                for p, s in both)
    chars = sum(p.answer_chars or 0 for p, _ in both)
    tools = [(p, s) for p, s in both if p.tool_names or s.tool_names]
    same = sum(sorted(p.tool_names or []) == sorted(s.tool_names or []) for p, s in tools)
    return {
        "compared": len(both),
        "exact_match_pct": _pct(exact, len(both)),
        "length_ratio": round(sum(s.answer_chars or 0 for _, s in both) / chars, 3)
        if chars else None,
        "tool_turns": len(tools),
        "same_tools_pct": _pct(same, len(tools)),
    }


def _shadow_rows(rows: Iterable[LedgerRow]
                 ) -> tuple[dict[str, AttemptRow], list[AttemptRow]]:
    """The shadow rows, and by request id the answered live attempts that carry a
    fingerprint (those of sampled requests)."""
    live: dict[str, AttemptRow] = {}
    shadows = []
    for row in rows:
        if not isinstance(row, AttemptRow):
            continue
        if row.shadow:
            shadows.append(row)
        elif row.outcome == "ok" and row.answer_digest is not None:
            live[row.request_id] = row
    return live, shadows


def shadow_report(rows: Iterable[LedgerRow]) -> list[dict[str, Any]]:
    """Each shadow beside its primary (SPEC section 13), per route, shadow model and the
    model that answered the live requests it shadowed: calls, skips, latency and
    first-token distributions, tokens and cost of both, and how often they agree. A
    shadow whose live row is not in the rows given is counted under primary "?"."""
    live, shadows = _shadow_rows(rows)
    groups: dict[tuple[str, str, str], list[AttemptRow]] = {}
    for s in shadows:
        p = live.get(s.shadow_of or "")
        key = (s.route, f"{s.provider}/{s.model}", f"{p.provider}/{p.model}" if p else "?")
        groups.setdefault(key, []).append(s)
    report = []
    for (route, model, primary), group in sorted(groups.items(), key=lambda g: (
            g[0][0], g[0][1], g[0][2] == "?", g[0][2])):
        called = [s for s in group if s.outcome != "skipped"]
        pairs = [(live[s.shadow_of or ""], s) for s in called if (s.shadow_of or "") in live]
        report.append({
            "route": route, "shadow_model": model, "primary_model": primary,
            "skipped": dict(sorted(collections.Counter(
                s.skip_reason or "?" for s in group if s.outcome == "skipped").items())),
            "shadow": _call_stats(called), "primary": _call_stats([p for p, _ in pairs]),
            **_agreement(pairs),
        })
    return report


def _shadow_heading(r: dict[str, Any]) -> str:
    skipped = ", ".join(f"{k} {v:,}" for k, v in r["skipped"].items()) or "none"
    return (f"route {r['route']}: shadow {r['shadow_model']} beside primary "
            f"{r['primary_model']} (skipped: {skipped})")


def _shadow_table(r: dict[str, Any]) -> Any:
    table = _table("", [
                       ("", "left"), ("calls", "right"), ("ok", "right"),
                       ("tokens in/out", "right"), ("cost $", "right"), ("s", "left"),
                       ("n", "right"), ("p50", "right"), ("p90", "right"), ("p99", "right"),
                       ("max", "right")], wrap=())
    for name in ("primary", "shadow"):
        c = r[name]
        table.add_row(name, f"{c['n']:,}", f"{c['ok']:,}",
                      f"{c['tokens_in']:,}/{c['tokens_out']:,}", f"{c['cost_usd']:.4f}",
                      "answer", *_dist_cells(c["latency_s"]))
        table.add_row("", "", "", "", "", "first token", *_dist_cells(c["ttft_s"]))
    return table


def _agreement_line(r: dict[str, Any]) -> str:
    ratio = _cell(r["length_ratio"], ".2f")
    same, exact = _cell(r["same_tools_pct"], ".1f", "%"), _cell(r["exact_match_pct"], ".1f", "%")
    tools = (f"same tools {same} of {r['tool_turns']:,} tool-call "
             "turns") if r["tool_turns"] else "no tool calls"
    return (f"agreement over {r['compared']:,} answered pairs: exact match "
            f"{exact}, length {ratio}x the primary's, {tools}")


def _print_shadows(console: Any, shadows: list[dict[str, Any]]) -> None:
    if not shadows:
        return
    console.print("shadows: each beside the primary that answered the same requests",
                  style="bold")
    for r in shadows:
        console.print(_shadow_heading(r))
        console.print(_shadow_table(r))
        console.print("  " + _agreement_line(r))
        console.print()


def format_shadow_report(report: list[dict[str, Any]], width: int | None = None) -> list[str]:
    """The shadow report as text no wider than `width` (`failoverd audit --shadows`)."""
    def draw(console: Any) -> None:
        _print_shadows(console, report)
        if not report:
            console.print("no shadow rows")
    return _captured(width, draw)


def relative(seconds: float) -> str:
    """A duration as people say it: 46 s, 3 min 5 s, 2 h 4 min, 3 d 4 h."""
    s = max(0, round(seconds))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                     ("min", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size} {unit}" + (f" {rest} {sub}" if rest else "")
    return f"{s} s"


def _until(iso: str | None, now: float) -> float | None:
    if not iso:
        return None
    try:
        return _dt.datetime.fromisoformat(iso).timestamp() - now
    except ValueError:
        return None


def _slot_state(s: dict[str, Any], answers: bool, how: str) -> str:
    if answers:
        return {"ok": "answers now", "probe": "answers now: its probe (half-open)",
                "forced probe": "answers now: every slot is out, this one is closest to "
                "recovery"}[how] + (f" ({s['breaker']}: {s['reason']})" if s["reason"] else "")
    if s["state"] == "open":
        left = "" if s["left_s"] is None else f", {relative(s['left_s'])} left"
        return f"open{left} ({s['breaker']}: {s['reason']})"
    if s["state"] == "probing":
        return f"half-open, its probe is in flight ({s['breaker']}: {s['reason']})"
    if s["state"] == "budget":
        return f"out of budget, {relative(s['left_s'])} to UTC midnight ({s['reason']})"
    return "half-open: the next request probes" if s["state"] == "probe" else "ok, standing by"


def _routes_table(routes: list[dict[str, Any]]) -> Any:
    table = _table("routes: which slot answers now", [("route", "left"), ("#", "right"),
                                                      ("model", "left"), ("state", "left")],
                   wrap=("model", "state"))
    for r in routes:
        for i, s in enumerate(r["slots"]):
            table.add_row(r["route"] if i == 0 else "", str(i), s["slot"],
                          _slot_state(s, s["slot"] == r["answers"], r["how"]))
    return table


def _inflight_table(inflight: list[dict[str, Any]]) -> Any:
    table = _table(f"in flight: {len(inflight)}", [
        ("request", "left"), ("route", "left"), ("model", "left"), ("attempts", "right"),
        ("age", "right"), ("left", "right"), ("", "left")])
    for r in inflight:
        left = r.get("left_s")
        racing = r.get("racing") or []
        table.add_row(r["request_id"], r["route"],
                      " + ".join(racing) if len(racing) > 1 else r["slot"] or "-",
                      str(r["attempts"]),
                      relative(r["age_s"]), "-" if left is None else
                      relative(left) if left > 0 else "past its deadline",
                      "committed" if r["committed"] else "")
    return table


def _breakers_table(breakers: list[dict[str, Any]], now: float) -> Any:
    table = _table(f"breakers: {len(breakers)}", [
        ("scope", "left"), ("key", "left"), ("state", "left"), ("failures", "right"),
        ("why", "left")], wrap=("key", "why"))
    for b in breakers:
        state = b["state"].replace("_", "-")
        left = _until(b.get("open_until"), now)
        if b["state"] == "open" and left is not None:
            state = f"open, {relative(left)} left"
        elif b["state"] == "half_open" and b.get("probing"):
            state = "half-open, probing"
        # The reason belongs to the state it caused: a closed breaker has none.
        why = (b.get("last_reason") or "") if b["state"] != "closed" else ""
        table.add_row(b["scope"], b["key"], state,
                      f"{b['failures_in_window']}/{b['calls_in_window']}", why)
    return table


def _status_lines(status: dict[str, Any]) -> list[str]:
    lines = [f"failoverd {status['version']}, up {relative(status['uptime_s'])}"
             + (" (draining)" if status.get("draining") else "")]
    if status.get("shed_requests") or status.get("overloaded"):
        lines.append(f"event loop {status.get('loop_lag_ms', 0):.0f} ms late; "
                     f"{status.get('shed_requests', 0)} request(s) shed"
                     + (f" (overloaded now: refusing {status.get('shed_share', 0):.0%} of new "
                        f"requests, {status.get('shed_share_streams', 0):.0%} of new streams)"
                        if status.get("overloaded") else ""))
    if status.get("fallbacks_waiting"):
        lines.append(f"{status['fallbacks_waiting']} next attempt(s) waiting their turn while "
                     "the event loop runs late (a failover storm)")
    ledger = status.get("ledger") or {}
    if ledger.get("dropped_rows"):
        lines.append(f"ledger {ledger['path']}: {ledger['dropped_rows']} row(s) dropped "
                     "(disk full or unwritable?)")
    return lines


def format_status(status: dict[str, Any], width: int | None = None,
                  now: float | None = None) -> list[str]:
    """`failoverd status` as text no wider than `width`: routes (who answers now),
    in-flight requests with the time they have left, breakers with relative times and
    only the current reason, token divisors. `now` defaults to the daemon's time."""
    if now is None:
        now = _until(status.get("time"), 0.0) or time.time()

    def draw(console: Any) -> None:
        for line in _status_lines(status):
            console.print(line)
        if status.get("routes"):
            console.print(_routes_table(status["routes"]))
        inflight, breakers = status.get("in_flight") or [], status.get("breakers") or []
        console.print(_inflight_table(inflight) if inflight else "in flight: 0")
        console.print(_breakers_table(breakers, now) if breakers else "breakers: none yet")
        divisors = status.get("token_divisors") or {}
        if divisors:
            table = _table("token divisors", [("model", "left"), ("bytes/token", "right")])
            for k, v in sorted(divisors.items()):
                table.add_row(k, f"{v:.2f}")
            console.print(table)
        if status.get("deadlines"):
            console.print(_deadlines_table(status["deadlines"]))
        for table in _budget_tables(status):
            console.print(table)
    return _captured(width, draw)


def _deadlines_table(deadlines: dict[str, Any]) -> Any:
    """What each model's deadlines have learned (SPEC section 10); "-": nothing yet."""
    table = _table("deadlines learned (first token, stall)", [
        ("model", "left"), ("answers", "right"), ("first token s", "right"),
        ("p99 s", "right"), ("stall s", "right"), ("timeouts", "right"), ("", "left")],
        wrap=("model",))
    for model, d in sorted(deadlines.items()):
        ft, stall, timeouts = d["first_token"], d["stall"], d["timeouts"]
        table.add_row(model, str(d["answered"]), _secs(ft["learned_s"]), _secs(ft["p99_s"]),
                      _secs(stall["learned_s"]),
                      f"{timeouts['first_token']}/{timeouts['stall']}",
                      "cold: the configured deadlines apply" if d["cold"] else "")
    return table


def _budget_tables(status: dict[str, Any]) -> list[Any]:
    """Today's spend against the budgets, and the shadows (SPEC section 13)."""
    budgets, shadow = status.get("budgets") or {}, status.get("shadow") or {}

    def cells(b: dict[str, Any]) -> list[str]:
        budget = b["budget_usd_per_day"]
        return [f"{b['spent_usd']:.4f}", _cell(budget, "g"),
                _cell(b["left_usd"], ".4f"),
                "spent" if b["exhausted"] else ""]

    tables = []
    money = [("spent $", "right"), ("budget $", "right"), ("left $", "right"), ("", "left")]
    if budgets.get("models") or budgets.get("shadows"):  # titles wrap to a table's width
        tables.append(f"spend today ({budgets['day']} UTC; budgets reset "
                      f"{budgets['resets_at']})")
    if budgets.get("models"):
        table = _table("live, per model", [("model", "left"), *money])
        for b in budgets["models"]:
            table.add_row(b["model"], *cells(b))
        tables.append(table)
    if budgets.get("shadows"):
        dropped = ", ".join(f"{k} {v}" for k, v in (shadow.get("dropped") or {}).items())
        tables.append(
            f"shadows: {'on' if shadow.get('enabled') else 'off ([shadow] enabled = false)'}, "
            f"{shadow.get('in_flight', 0)}/{shadow.get('max_in_flight', 0)} in flight, "
            f"{shadow.get('started', 0)} started" + (f", dropped: {dropped}" if dropped else ""))
        table = _table("shadows, per route", [("route", "left"), ("model", "left"),
                                              ("sample", "right"), *money])
        for b in budgets["shadows"]:
            table.add_row(b["route"], b["model"], f"{b['sample']:.0%}", *cells(b))
        tables.append(table)
    return tables


@cli.command("status")
@click.option("--socket", "socket_path", help="Daemon socket [default: daemon.socket from the "
              "config]")
@click.option("--config", "config_path", help="Config file to find the socket in.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@click.option("--width", type=click.IntRange(min=40), help="Table width [default: the "
              "terminal's].")
def status_cmd(socket_path: str | None, config_path: str | None, as_json: bool,
               width: int | None) -> None:
    """Ask a running daemon which slot answers each route now, what is in flight and
    how long it has left, its breakers and token divisors."""
    if socket_path is None:
        socket_path = _daemon_config(config_path).socket
    transport = httpx2.HTTPTransport(uds=socket_path)
    try:
        with httpx2.Client(transport=transport, base_url="http://failoverd", timeout=5) as c:
            resp = c.get("/status")
    except httpx2.HTTPError as e:
        click.echo(f"failoverd: cannot reach the daemon at {socket_path} ({e}); is it running? "
                   "(systemctl status failoverd)", err=True)
        sys.exit(1)
    if as_json:
        click.echo(resp.text)
        return
    for line in format_status(resp.json(), width):
        click.echo(line)


# `audit --html` plots at most this many attempts per model: every failure, and answers
# evenly spaced in time (an SVG point each; 3000 keep a page of ten models ~10 MB).
HTML_MAX_POINTS = 3000
# Series colours of a model's plot: answered, failed, timed out, p50, p90, p99,
# total_timeout_s, cliff; and of a route's trend: p50, p99, max, total_timeout_s, cliff.
MODEL_COLOURS = ("#4575b4", "#fdae61", "#d73027", "#1a9850", "#74add1", "#8073ac", "#555555",
                 "#000000")
TREND_COLOURS = ("#1a9850", "#8073ac", "#d73027", "#555555", "#000000")
# Latency axis ticks (log scale), those within the plotted range are shown.
HTML_TICKS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1800)
_SVG_NOISE = re.compile(r'<!--.*?-->|<script\b.*?</script>| xmlns(?::\w+)?="[^"]*"', re.S)


def _require_report_extra() -> None:
    try:
        import pygal  # noqa: F401
    except ImportError:
        raise click.UsageError("--html needs the plotting library pygal: pip install "
                               "'failoverd[report]' (the daemon itself does not need it)"
                               ) from None


def _write_html(path: str, page: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as e:
        raise click.UsageError(f"cannot write --html {path}: {e.strerror}") from None


def _svg(chart: Any) -> str:
    """The chart inline in the page: no comments (pygal's carry its URLs), no script,
    no namespace URIs (HTML puts an inline <svg> in the SVG namespace by itself)."""
    return _SVG_NOISE.sub("", chart.render(is_unicode=True))


def _sampled(points: list[tuple[float, float, str]]) -> tuple[list[tuple[float, float, str]],
                                                              str]:
    if len(points) <= HTML_MAX_POINTS:
        return points, ""
    failed = [p for p in points if p[2] != "ok"][:HTML_MAX_POINTS // 2]
    answers = [p for p in points if p[2] == "ok"]
    step = math.ceil(len(answers) / (HTML_MAX_POINTS - len(failed)))
    kept = sorted(failed + answers[::step])
    return kept, f" (plotted: {len(kept):,} of {len(points):,}: failures, every {step}th answer)"


def _chart_config(title: str, colours: tuple[str, ...], lines: tuple[float, float],
                  values: Iterable[float]) -> dict[str, Any]:
    """pygal settings shared by the plots; `lines` (total_timeout_s, cliff) are ticks of
    their own, and the usual ticks too close to them give way."""
    from pygal.style import Style

    values = [v for v in (*lines, *values) if v > 0]
    low, high = min(values), max(values)
    ticks = sorted({t for t in HTML_TICKS if low / 2 <= t <= high * 1.5
                    and all(abs(t - line) > line / 5 for line in lines)} | set(lines))
    return {"title": title, "js": [], "disable_xml_declaration": True, "logarithmic": True,
            "width": 1000, "height": 380, "explicit_size": True, "legend_at_bottom": True,
            "legend_at_bottom_columns": 4, "y_title": "seconds (log scale)",
            "y_labels": [round(t, 3) for t in ticks], "truncate_legend": -1,
            "style": Style(colors=colours, background="white", plot_background="white",
                           font_family="sans-serif", guide_stroke_color="#ddd",
                           major_guide_stroke_color="#ddd")}


def _limits(route: dict[str, Any], report: dict[str, Any]) -> tuple[float, float, str]:
    assumed = report["assumed"]
    total, cliff = route["total_timeout_s"], route["client_cliff_s"]
    note = "" if total is not None and cliff is not None else " (assumed: not in the rows)"
    return (assumed["total_timeout_s"] if total is None else total,
            assumed["client_cliff_s"] if cliff is None else cliff, note)


def _model_chart(route: dict[str, Any], model: dict[str, Any], report: dict[str, Any],
                 points: list[tuple[float, float, str]]) -> str:
    import pygal

    total, cliff, note = _limits(route, report)
    kept, sampled = _sampled(points)
    title = f"#{model['position']} {model['model']}: attempt latency{sampled}"
    when = [(_dt.datetime.fromtimestamp(t), max(v, 0.001), o) for t, v, o in kept]
    chart = pygal.DateTimeLine(stroke=False, show_legend=True, dots_size=2,
                               x_value_formatter=lambda t: f"{t:%m-%d %H:%M}",
                               **_chart_config(title, MODEL_COLOURS, (total, cliff),
                                               (v for _, v, _ in when)))
    chart.add("answered", [(t, v) for t, v, o in when if o == "ok"])
    chart.add("failed", [(t, v) for t, v, o in when if o != "ok" and o not in HANG_OUTCOMES])
    chart.add("timed out", [(t, v) for t, v, o in when if o in HANG_OUTCOMES], dots_size=4)
    span = [when[0][0], when[-1][0]] if when else []
    dist = model["latency_s"]
    for name in ("p50", "p90", "p99"):
        value = dist[name]
        chart.add(f"answer {name} {_secs(value)} s (n {dist['n']:,})",
                  [(t, max(value, 0.001)) for t in span] if value is not None else [],
                  stroke=True, show_dots=False, stroke_style={"width": 2})
    chart.add(f"total_timeout_s {total:g}{note}", [(t, total) for t in span], stroke=True,
              show_dots=False, stroke_style={"width": 2, "dasharray": "6,4"})
    chart.add(f"cliff {cliff:g}{note}", [(t, cliff) for t in span], stroke=True,
              show_dots=False, stroke_style={"width": 3, "dasharray": "2,3"})
    return _svg(chart)


def _trend_chart(route: dict[str, Any], report: dict[str, Any]) -> str:
    import pygal

    total, cliff, note = _limits(route, report)
    trend = route["trend"]
    values = [b["latency_s"][k] or 0 for b in trend for k in ("p50", "max")]
    chart = pygal.Line(x_label_rotation=30, **_chart_config(
        f"route {route['route']}: request latency per {report['by']}", TREND_COLOURS,
        (total, cliff), values))
    chart.x_labels = [b["bucket"] for b in trend]

    def series(name: str) -> list[float | None]:
        return [None if b["latency_s"][name] is None else max(b["latency_s"][name], 0.001)
                for b in trend]

    chart.add("p50", series("p50"))
    chart.add("p99", series("p99"))
    chart.add("max", series("max"))
    chart.add(f"total_timeout_s {total:g}{note}", [total] * len(trend), show_dots=False,
              stroke_style={"width": 2, "dasharray": "6,4"})
    chart.add(f"cliff {cliff:g}{note}", [cliff] * len(trend), show_dots=False,
              stroke_style={"width": 3, "dasharray": "2,3"})
    return _svg(chart)


_HTML_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>failoverd audit</title>
<style>
body { font-family: sans-serif; margin: 2em auto; max-width: 1040px; color: #222; }
h2 { border-top: 1px solid #ccc; padding-top: 1em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 90%; }
th, td { padding: 2px 8px; text-align: right; }
th:nth-child(2), td:nth-child(2) { text-align: left; white-space: normal;
                                  word-break: break-all; }
td { white-space: nowrap; } th { vertical-align: bottom; }
.note { color: #555; font-size: 90%; } svg { display: block; margin: 1em 0; }
</style></head><body>
"""


def _html_summary(route: dict[str, Any]) -> str:
    import html

    rows = ["<tr><th>#</th><th>model</th><th>n</th><th>ok %</th><th>hangs</th>"
            "<th>answer p50 / p90 / p99 / max s</th><th>first token p99 s</th>"
            "<th>slowest served s</th><th>to total</th><th>to cliff</th></tr>"]
    for m in route["models"]:
        d, served = m["latency_s"], m["served"]
        answers = " / ".join(_secs(d[k]) for k, _ in PERCENTILES)
        rows.append(
            f"<tr><td>{m['position']}</td><td>{html.escape(m['model'])}</td><td>{m['n']:,}</td>"
            f"<td>{'-' if m['success_pct'] is None else m['success_pct']}</td>"
            f"<td>{m['hangs']}</td><td>{answers} (n {d['n']:,})</td>"
            f"<td>{_secs(m['ttft_s']['p99'])}</td>"
            f"<td>{_secs(served['slowest_s'])}</td><td>{_margin(served, 'margin_to_total_s')}</td>"
            f"<td>{_margin(served, 'margin_to_cliff_s')}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def audit_html(report: dict[str, Any], points: dict[tuple[str, str], list[Any]]) -> str:
    """One self-contained page: per route, the request trend against total_timeout_s and
    the cliff, then per model (in chain order) every attempt's latency as a point."""
    import html

    parts = [_HTML_HEAD, "<h1>failoverd audit</h1>",
             f"<p class=note>{html.escape(', '.join(report.get('files', [])))}: "
             f"{report['rows']:,} rows" + (f" since {html.escape(report['since'])}"
                                          if report["since"] else "") +
             f"; generated {html.escape(local_time(utc_timestamp()))}.</p>",
             "<p class=note>Latency is on a log scale, so one second and the cliff fit one "
             "picture. Watch the distance between the top of the cloud and the dashed lines: "
             "the cliff approaching shows as p99 and max rising towards total_timeout_s "
             "while every call still returns 200. Red points are attempts abandoned at a "
             "deadline; their height is how long they held the request. "
             "* marks a margin that rests on assumed values.</p>"]
    for route in report["routes"]:
        parts.append(f"<h2>route {html.escape(route['route'])}</h2>")
        heading = _route_heading(route, report).split(": ", 1)[1].replace("\n ", ";")
        parts.append(f"<p>{html.escape(heading)}</p>")
        parts.append(_html_summary(route))
        parts.append(_trend_chart(route, report))
        for model in route["models"]:
            parts.append(_model_chart(route, model, report,
                                      points.get((route["route"], model["model"]), [])))
    parts.append(f"<p class=note>{html.escape(_audit_notes(report))}</p></body></html>\n")
    return "\n".join(parts)


# logrotate's names for a rotated ledger: ledger.jsonl.1, ledger.jsonl.2.gz,
# ledger.jsonl-20260102 (dateext), each maybe compressed.
ROTATED_SUFFIX = re.compile(r"^(?:\.\d+|-\d{8,10})(?:\.gz)?$")
SINCE_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "wk": 604800, "week": 604800, "weeks": 604800,
}
_SINCE_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")


def parse_since(text: str, now: float) -> float:
    """--since as Unix time: a duration back from `now` (30m, 24h, 1w, "24 hours",
    "1h 30m") or an ISO date or time (local unless it names its zone)."""
    spec = text.strip().lower()
    pos, seconds = 0, 0.0
    while pos < len(spec) and (m := _SINCE_PART.match(spec, pos)) and m.group(2) in SINCE_UNITS:
        seconds += float(m.group(1)) * SINCE_UNITS[m.group(2)]
        pos = m.end()
    if spec and pos == len(spec):
        return now - seconds
    try:
        return _dt.datetime.fromisoformat(text.strip()).astimezone().timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration such as 30m, 24h, 1w or "
                         "'24 hours', or a date or time such as 2026-01-02 or "
                         "2026-01-02T15:00+01:00") from None


def ledger_files(path: str) -> list[str]:
    """The ledger and its rotated siblings that exist, oldest first."""
    directory, name = os.path.split(path)
    try:
        siblings = [os.path.join(directory, f) for f in os.listdir(directory or ".")
                    if f.startswith(name) and ROTATED_SUFFIX.match(f[len(name):])]
    except OSError:
        siblings = []
    return _oldest_first([*siblings, *([path] if os.path.exists(path) else [])])


def _oldest_first(paths: Iterable[str]) -> list[str]:
    return sorted(dict.fromkeys(paths), key=lambda p: os.stat(p).st_mtime)


def read_rows(path: str, problems: list[str]) -> Iterator[LedgerRow | None]:
    """The rows of a ledger file, plain or gzip-compressed (None for a line that is
    not a row); a compressed file cut short gives what it has and a problem note."""
    import gzip

    decoder = msgspec.json.Decoder(LedgerRow)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f: Any = gzip.GzipFile(fileobj=raw) if compressed else raw
        try:
            for line in f:
                if line.strip():
                    decoded = _decoded(line, decoder)
                    yield None if decoded is None else decoded[1]
        except (EOFError, OSError) as e:  # truncated or corrupt gzip
            problems.append(f"{path}: {e}; read up to there")


def _audit_paths(ledgers: tuple[str, ...], config_path: str | None) -> list[str]:
    if ledgers:
        missing = [p for p in ledgers if not os.path.isfile(p)]
        if missing:
            raise click.UsageError(f"no ledger file at {', '.join(missing)}")
        return _oldest_first(ledgers)
    path = _default_ledger(config_path)
    found = ledger_files(path)
    if not found:
        raise click.UsageError(f"no ledger at {path} (nor rotated ones beside it); pass the "
                               "ledger files, or --config with daemon.ledger")
    return found


@cli.command("audit")
@click.argument("ledgers", nargs=-1, metavar="[LEDGER]...")
@click.option("--since", help="Only rows since then: 30m, 24h, 1w, '24 hours', or an ISO date "
              "or time (local unless it gives its zone).")
@click.option("--by", type=click.Choice(["hour", "day"]), help="Add the trend per route: "
              "requests, latency and margins per hour or day (local time).")
@click.option("--hang-threshold", default=120.0, show_default=True, type=click.FloatRange(min=0),
              metavar="SECONDS", help="Count attempts that went this long without output.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--html", "html_path", metavar="FILE", help="Also write a self-contained page "
              "with the latency plots (needs failoverd[report]).")
@click.option("--width", type=click.IntRange(min=40), help="Table width [default: the "
              "terminal's].")
@click.option("--assume-total", default=ASSUMED_TOTAL_S, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0, min_open=True),
              help="total_timeout_s for request rows that predate the field (marked *).")
@click.option("--assume-cliff", default=ASSUMED_CLIFF_S, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0, min_open=True),
              help="client_cliff_s for request rows that predate the field (marked *).")
@click.option("--config", "config_path", help="Config to find the ledger in (when none is "
              "named); the figures need no config.")
@click.option("--shadows", "shadows_only", is_flag=True,
              help="Only the shadow report: each shadow model beside its primary.")
def audit_cmd(ledgers: tuple[str, ...], since: str | None, by: str | None,
              hang_threshold: float, as_json: bool, html_path: str | None, width: int | None,
              assume_total: float, assume_cliff: float, config_path: str | None,
              shadows_only: bool) -> None:
    """Per route, models in chain order: attempts, success, hangs, failovers, time and
    money failed attempts cost, latency and first-token percentiles with their sample
    counts, and how close the slowest requests came to total_timeout_s and the cliff.
    Reads rotated and .gz ledgers too (by default: the ledger and its rotated siblings)."""
    if html_path is not None:
        _require_report_extra()
    paths = _audit_paths(ledgers, config_path)
    try:
        since_ts = None if since is None else utc_timestamp(parse_since(since, time.time()))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    audit = Audit(since_ts=since_ts, hang_threshold_s=hang_threshold,
                  by=by or ("hour" if html_path else None), assume_total_s=assume_total,
                  assume_cliff_s=assume_cliff, points=html_path is not None)
    problems: list[str] = []
    for path in paths:
        try:
            for row in read_rows(path, problems):
                audit.add(row)
        except PermissionError:
            click.echo(_unreadable(path).replace("failoverd tail", "failoverd audit"), err=True)
            sys.exit(1)
    report = audit.report()
    report["files"] = paths
    for problem in problems:
        click.echo(f"failoverd: {problem}", err=True)
    if html_path is not None:
        _write_html(html_path, audit_html(report, audit.points()))
    if shadows_only:
        click.echo(msgspec.json.encode(report["shadows"]).decode() if as_json else
                   "\n".join(format_shadow_report(report["shadows"], width)))
    elif as_json:
        click.echo(msgspec.json.encode(report).decode())
    else:
        click.echo(render_audit(report, width, trend=by is not None), nl=False)


@cli.command("demo")
def demo_cmd() -> None:
    """Watch failover on simulated upstreams (no network, no keys, ~10 s)."""
    sys.exit(trio.run(run_demo))


if __name__ == "__main__":
    cli()
