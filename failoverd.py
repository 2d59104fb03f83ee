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
import email.utils
import errno
import gc
import hashlib
import logging
import math
import os
import random
import re
import secrets as _secrets
import signal
import socket as _socket
import ssl
import stat
import struct
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Annotated, Any, Literal

import click
import h11
import httpcore
import httpx
import msgspec
import trio

log = logging.getLogger("failoverd")

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
    cooldown_s: Seconds = 5.0
    cooldown_max_s: Seconds = 300.0
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
    # SPEC section 10: learn each model's deadlines, within these bounds. 10 s is the
    # floor below which a healthy first token is too often just a busy minute; 180 s is
    # above the 94 s first-token p99 of the slowest thinking model in the field data.
    adaptive_deadlines: bool = True
    first_token_min_s: Seconds = 10.0
    first_token_max_s: Seconds = 180.0
    stall_min_s: Seconds = 10.0
    stall_max_s: Seconds = 120.0


class RouteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    chain: Annotated[list[str], msgspec.Meta(min_length=1)]
    first_token_timeout_s: Seconds | None = None
    stall_timeout_s: Seconds | None = None
    total_timeout_s: Seconds | None = None
    retry_same: Annotated[int, msgspec.Meta(ge=0, le=1)] | None = None
    retry_backoff_s: NonNegative | None = None
    retry_after_max_s: NonNegative | None = None
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


NO_MODEL = ModelConfig()


def parse_slot(entry: str) -> Slot | None:
    provider, sep, model = entry.partition("/")
    return Slot(provider, model) if sep and provider and model else None


def resolve_route(cfg: Config, name: str, rc: RouteConfig) -> Route:
    overrides = {f: getattr(rc, f) for f in Timing.__struct_fields__ if getattr(rc, f) is not None}
    timing = msgspec.structs.replace(cfg.defaults, **overrides)
    slots = tuple(s for s in map(parse_slot, rc.chain) if s is not None)
    return Route(name, slots, timing)


_SECTION_TYPES: dict[str, type] = {
    "providers": ProviderConfig,
    "models": ModelConfig,
    "routes": RouteConfig,
}


_ENUMS = {"kind": "'openai' or 'anthropic'"}


def _expected(text: str) -> str:
    """msgspec's enum errors say what was wrong, not what is allowed: add that."""
    m = re.search(r"Invalid enum value .* - at `[^`]*\.(\w+)`", text)
    return f"{text}; expected {_ENUMS[m.group(1)]}" if m and m.group(1) in _ENUMS else text


def _entry_error(section: str, key: str, err: msgspec.ValidationError) -> str:
    # msgspec reports dict entries as `$.routes[...]`; name the entry instead.
    text = str(err)
    where = f"{section}.{key}"
    text = re.sub(r"`\$", f"`{where}", text) if "`$" in text else f"{text} - at `{where}`"
    return _expected(text)


def config_errors(cfg: Config) -> list[str]:
    """Cross-section checks msgspec cannot express, each naming its key path."""
    errors = []
    declared = ", ".join(sorted(cfg.providers)) or "none"
    cliff = cfg.daemon.client_cliff_s
    if cfg.defaults.total_timeout_s >= cliff:
        # Bare PROVIDER/MODEL requests run on the defaults, whatever the routes say.
        errors.append(
            f"defaults.total_timeout_s = {cfg.defaults.total_timeout_s:g}: must be below "
            f"daemon.client_cliff_s = {cliff:g} (bare PROVIDER/MODEL requests use it)")
    for name in cfg.models:
        slot = parse_slot(name)
        if slot is None or slot.provider not in cfg.providers:
            errors.append(
                f"models.{name!r}: expected PROVIDER/MODEL with a provider declared under "
                f"[providers] (declared: {declared})"
            )
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


def parse_config(text: str, source: str = "config") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    errors = []
    for section, typ in _SECTION_TYPES.items():
        entries = raw.get(section)
        if not isinstance(entries, dict):
            continue
        for key, value in entries.items():
            try:
                msgspec.convert(value, typ)
            except msgspec.ValidationError as e:
                errors.append(_entry_error(section, key, e))
    if not errors:
        try:
            cfg = msgspec.convert(raw, Config)
        except msgspec.ValidationError as e:
            errors.append(_expected(str(e)))
        else:
            errors = config_errors(cfg)
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


class BreakerRow(msgspec.Struct, tag="breaker", tag_field="kind", kw_only=True):
    ts: str
    scope: Literal["provider", "model", "credential"]
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
# Outcomes that count against a breaker; the rest say nothing about the slot's health
# (bad_request, client_disconnected, context_overflow, total_timeout) or have their
# own treatment (rate_limited, auth_error, not_found).
HEALTH_FAILURES = frozenset({
    "connect_error", "first_token_timeout", "stall_timeout", "http_error",
    "upstream_error_event", "protocol_error", "truncated",
})
# A 5xx that took longer than this to arrive is a gateway timeout in disguise:
# waiting for it twice costs more than moving to the next slot.
FAST_FAILURE_S = 2.0
# How much of an upstream error body is kept (for classification and the ledger).
ERROR_BODY_LIMIT = 64 * 1024

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


def error_summary(body: bytes) -> tuple[str, str]:
    """(message, code) from an OpenAI/Anthropic-style error body, else its first bytes."""
    try:
        parsed = msgspec.json.decode(body, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return text or "empty body", ""
    err = parsed.error
    if isinstance(err, _ErrorDetail):
        code = next((c for c in (err.code, err.type) if isinstance(c, str)), "")
        msg = err.message if isinstance(err.message, str) else code
        return (msg or "no message")[:300], code
    if isinstance(err, str):
        return err[:300], ""
    return str(parsed.message or body[:200].decode("utf-8", "replace"))[:300], ""


def classify_status(status: int, body: bytes) -> tuple[str, str]:
    """SPEC section 5's table for a non-2xx reply: (outcome, short error)."""
    message, code = error_summary(body)
    error = f"HTTP {status}: {message}"
    if status == 429:
        return "rate_limited", error
    if status in (401, 403) or status == 402:  # 402: out of credits, a credential problem
        return "auth_error", error
    if status == 404 or code == "model_not_found":
        return "not_found", error
    if status == 413 or (status in (400, 422) and _CONTEXT_OVERFLOW.search(body)):
        return "context_overflow", error
    if status in (400, 422):
        return "bad_request", error
    return "http_error", error


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float | None:
    """Go-style durations (x-ratelimit-reset-*, `audit --since`): `6m0s`, `20ms`, `2d`."""
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
                when = email.utils.parsedate_to_datetime(ra)
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
    """One circuit breaker. Pure: the caller passes the time and does the I/O.

    closed -> open after `consecutive_failures`, or a failure or slow-call rate over
    the window; open -> half_open when the cooldown ends; half_open lets one probe
    through: its success closes, its failure reopens with a doubled cooldown.
    A hold (a 429's Retry-After) simply ends: open -> closed.
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

    def blocks(self) -> bool:
        return self.state == "open" or (self.state == "half_open" and self.probing)

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
               jitter: float) -> Transition | None:
        """Record one finished call; `jitter` is uniform in [0, 1)."""
        self.expire(now, cfg.window_s)
        self.window.append((now, failed, slow))
        self.failures += failed
        self.slow += slow
        self.consecutive = self.consecutive + 1 if failed else 0
        if self.state == "half_open" and self.probing:
            self.probing = False
            if not failed:
                self.state, self.opens = "closed", 0
                self.window.clear()
                self.failures = self.slow = 0
                return ("half_open", "closed", "probe succeeded", None)
            return self._open(now, "probe failed", cfg, jitter)
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

    def _recent(self, model: str, now: float) -> collections.deque[tuple[float, int]]:
        entries = self.sent.setdefault(model, collections.deque())
        while entries and entries[0][0] <= now - self.WINDOW_S:
            entries.popleft()
        return entries

    def over(self, model: str, now: float, tokens: int, cfg: ModelConfig) -> str | None:
        """Why sending `tokens` more now would break the model's budget, or None."""
        if cfg.rpm_limit is None and cfg.tpm_limit is None:
            return None
        recent = self._recent(model, now)
        if cfg.rpm_limit is not None and len(recent) + 1 > cfg.rpm_limit:
            return f"{len(recent)} requests in the last minute, rpm_limit {cfg.rpm_limit}"
        used = sum(t for _, t in recent)
        if cfg.tpm_limit is not None and used + tokens > cfg.tpm_limit:
            return (f"{used} + {tokens} tokens in the last minute would pass tpm_limit "
                    f"{cfg.tpm_limit}")
        return None

    def add(self, model: str, now: float, tokens: int, cfg: ModelConfig) -> None:
        if cfg.rpm_limit is not None or cfg.tpm_limit is not None:
            self.sent.setdefault(model, collections.deque()).append((now, tokens))


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


def scrub(text: str, known: Iterable[str] = ()) -> str:
    """Remove API keys from text bound for the ledger or a log line."""
    for secret in known:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "[redacted]")
    return _SECRET_PATTERNS.sub(
        lambda m: (m.group(1) or m.group(2) or m.group(3) or "") + "[redacted]", text
    )


def cost_usd(model: ModelConfig, tokens_in: int | None, tokens_out: int | None) -> float | None:
    if not (model.price_in_per_mtok or model.price_out_per_mtok):
        return None
    return round(
        ((tokens_in or 0) * model.price_in_per_mtok + (tokens_out or 0) * model.price_out_per_mtok)
        / 1e6,
        8,
    )


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

    def quantile_s(self) -> float | None:
        """The q-quantile, interpolated within its bin (log scale); None if empty."""
        if self.total <= 0:
            return None
        i = self.qbin
        below, w = self.total - self.above - self.answers[i], self.answers[i]
        lo, hi = bin_upper_s(i - 1), bin_upper_s(i)
        share = (self.q * self.total - below) / w if w > 0 else 1.0
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
        if path is not None:
            self.open()

    def open(self) -> None:
        assert self.path is not None
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
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
            os.close(old)

    def write(self, row: LedgerRow) -> None:
        if self.fd is None:
            if self.path is not None:
                self.dropped += 1
            return
        buf = self._buf
        self._encoder.encode_into(row, buf)
        buf.extend(b"\n")
        try:
            if os.write(self.fd, buf) < len(buf):  # the disk filled mid-row
                os.write(self.fd, b"\n")  # end the torn line so the next row is whole
                raise OSError(errno.ENOSPC, "short write: row torn")
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

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_ledger(path: str) -> Iterable[tuple[bytes, LedgerRow | None]]:
    """Each line with its decoded row, or None for a torn or foreign line."""
    decoder = msgspec.json.Decoder(LedgerRow)
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield line, decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                yield line, None


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
    unknown fields are ignored as the SSE spec says.
    """

    __slots__ = ("_buf", "_event", "_data", "heartbeats", "junk")

    def __init__(self) -> None:
        self._buf = b""
        self._event: bytes | None = None
        self._data: bytes | None = None
        self.heartbeats = 0
        self.junk = 0

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        buf = self._buf + chunk if self._buf else chunk
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > MAX_SSE_LINE:
            raise Failure("protocol_error", f"SSE line longer than {MAX_SSE_LINE} bytes")
        out = []
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
                self._event = line[6:].strip()
            elif not line.startswith((b"id:", b"retry:")):
                self.junk += 1
        return out

    def close(self) -> list[tuple[bytes | None, bytes]]:
        """At end of stream: an event whose blank line never came still counts."""
        out = self.feed(b"\n") if self._buf else []
        if self._data is not None:
            out.append((self._event, self._data))
            self._event = self._data = None
        return out


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    message: _Delta | None = None  # a non-streamed reply from a server that ignored stream
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
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
        "sse", "out_chars",
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
            d = choice.delta or choice.message
            if choice.finish_reason:
                if choice.finish_reason == "error":
                    raise Failure("upstream_error_event", "finish_reason: error")
                st.finish_reason = choice.finish_reason
                st.progress = True
            if d is not None and (d.content or d.tool_calls or d.refusal or d.reasoning_content
                                  or d.reasoning):
                st.progress = True
                st.out_chars += len(d.content or "") + len(d.reasoning_content or d.reasoning
                                                           or "")
            if st.choices is not None:
                acc = st.choices.get(choice.index)
                if acc is None:
                    acc = st.choices[choice.index] = ChoiceAcc()
                if d is not None:
                    acc.add(d)
                if choice.finish_reason:
                    acc.finish_reason = choice.finish_reason
        return data if relay else None

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


# Anthropic's stop reasons in OpenAI's vocabulary.
_ANTHROPIC_FINISH = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
    "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop",
}


class _AnthropicEvent(msgspec.Struct):
    type: str = ""
    index: int | None = None
    delta: dict[str, Any] | None = None
    content_block: dict[str, Any] | None = None
    message: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


_anthropic_decoder = msgspec.json.Decoder(_AnthropicEvent)


def _anthropic_content(content: Any) -> Any:
    if not isinstance(content, list):
        return content if content is not None else ""
    blocks = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            m = re.match(r"data:([^;]+);base64,(.*)", url, re.S)
            source = (
                {"type": "base64", "media_type": m.group(1), "data": m.group(2)}
                if m else {"type": "url", "url": url}
            )
            blocks.append({"type": "image", "source": source})
    return blocks


def anthropic_body(model: str, body: dict[str, Any], model_cfg: ModelConfig) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request (streamed)."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role in ("system", "developer"):
            c = m.get("content")
            system.append(c if isinstance(c, str) else " ".join(
                p.get("text", "") for p in c or () if isinstance(p, dict)))
        elif role == "tool":
            block = {"type": "tool_result", "tool_use_id": m.get("tool_call_id"),
                     "content": _anthropic_content(m.get("content"))}
            if messages and messages[-1]["role"] == "user" and isinstance(
                    messages[-1]["content"], list):
                messages[-1]["content"].append(block)
            else:
                messages.append({"role": "user", "content": [block]})
        elif role == "assistant" and m.get("tool_calls"):
            content = _anthropic_content(m.get("content"))
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) and content \
                else (content if isinstance(content, list) else [])
            for tc in m["tool_calls"]:
                fn = tc.get("function") or {}
                try:
                    args = msgspec.json.decode(fn.get("arguments") or "{}")
                except msgspec.DecodeError:
                    args = {}
                blocks.append({"type": "tool_use", "id": tc.get("id"), "name": fn.get("name"),
                               "input": args})
            messages.append({"role": "assistant", "content": blocks})
        else:
            messages.append({"role": role, "content": _anthropic_content(m.get("content"))})
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens")
        or model_cfg.max_output_tokens,
        "stream": True,
    }
    if system:
        out["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stop"):
        out["stop_sequences"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    if body.get("tools"):
        out["tools"] = [
            {"name": t["function"].get("name"), "description": t["function"].get("description", ""),
             "input_schema": t["function"].get("parameters") or {"type": "object"}}
            for t in body["tools"] if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
    choice = body.get("tool_choice")
    if choice == "required":
        out["tool_choice"] = {"type": "any"}
    elif choice in ("auto", "none"):
        out["tool_choice"] = {"type": choice}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out["tool_choice"] = {"type": "tool", "name": choice["function"].get("name")}
    return out


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
        return _json_encode({
            "id": st.id, "object": "chat.completion.chunk", "created": st.created,
            "model": st.model,
            "choices": [] if delta is None else
            [{"index": 0, "delta": delta, "finish_reason": finish}],
            **({"usage": usage} if usage is not None else {}),
        })

    @staticmethod
    def on_event(event: bytes | None, data: bytes, st: StreamState) -> bytes | None:
        try:
            ev = _anthropic_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            raise Failure("protocol_error", f"unparseable SSE data line: {e}") from None
        kind = ev.type
        acc = st.choices.setdefault(0, ChoiceAcc()) if st.choices is not None else None
        if kind == "content_block_delta":
            d = ev.delta or {}
            dtype = d.get("type")
            if dtype == "text_delta" and d.get("text"):
                delta: dict[str, Any] = {"content": d["text"]}
            elif dtype == "thinking_delta" and d.get("thinking"):
                delta = {"reasoning_content": d["thinking"]}
            elif dtype == "input_json_delta" and d.get("partial_json"):
                delta = {"tool_calls": [{"index": st.tool_index,
                                         "function": {"arguments": d["partial_json"]}}]}
            else:
                return None
        elif kind == "ping":
            return None
        elif kind == "message_start":
            msg = ev.message or {}
            st.id = msg.get("id")
            st.model = msg.get("model")
            st.created = int(time.time())
            usage = msg.get("usage") or {}
            st.anthropic_usage["in"] = sum(_count(usage.get(k)) or 0 for k in (
                "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
            delta = {"role": "assistant", "content": ""}
            if acc is not None:
                return None
            return AnthropicAdapter._chunk(st, delta)
        elif kind == "content_block_start":
            block = ev.content_block or {}
            if block.get("type") != "tool_use":
                return None
            st.tool_index += 1
            delta = {"tool_calls": [{"index": st.tool_index, "id": block.get("id"),
                                     "type": "function",
                                     "function": {"name": block.get("name"), "arguments": ""}}]}
        elif kind == "message_delta":
            usage = ev.usage or {}
            if _count(usage.get("output_tokens")) is not None:
                st.anthropic_usage["out"] = _count(usage["output_tokens"]) or 0
            reason = (ev.delta or {}).get("stop_reason")
            if not reason:
                return None
            st.finish_reason = _ANTHROPIC_FINISH.get(reason, "stop")
            st.progress = True
            if acc is not None:
                acc.finish_reason = st.finish_reason
                return None
            return AnthropicAdapter._chunk(st, {}, st.finish_reason)
        elif kind == "message_stop":
            tin, tout = st.anthropic_usage.get("in", 0), st.anthropic_usage.get("out", 0)
            st.usage = {"prompt_tokens": tin, "completion_tokens": tout,
                        "total_tokens": tin + tout}
            st.done = True
            st.progress = True
            if acc is not None or not st.want_usage:
                return None
            return AnthropicAdapter._chunk(st, None, usage=st.usage)
        elif kind == "error" or event == b"error":
            raise Failure("upstream_error_event", _error_event_text(ev.error))
        else:  # content_block_stop and event types added later
            return None
        st.progress = True
        st.out_chars += len(delta.get("content") or delta.get("reasoning_content") or "")
        if acc is not None:
            acc.add(msgspec.convert(delta, _Delta))
            return None
        return AnthropicAdapter._chunk(st, delta)

    @staticmethod
    def whole_body(body: bytes, st: StreamState) -> bytes | None:
        raise Failure("protocol_error", "200 with a JSON body to a streamed request", status=200)


ADAPTERS: dict[str, type[OpenAIAdapter] | type[AnthropicAdapter]] = {
    "openai": OpenAIAdapter,
    "anthropic": AnthropicAdapter,
}


class _BoundedStream(httpcore.AsyncNetworkStream):
    """httpcore's read/write, bounded by a timeout scope only when httpcore gives a
    timeout; subclasses implement the unbounded `_read` and `_write`."""

    __slots__ = ()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 (httpcore's interface)
        if timeout is None:
            return await self._read(max_bytes)
        with trio.move_on_after(timeout):
            return await self._read(max_bytes)
        raise httpcore.ReadTimeout(f"no data within {timeout:g} s")

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 (httpcore's interface)
        if timeout is None:
            return await self._write(buffer)
        with trio.move_on_after(timeout):
            return await self._write(buffer)
        raise httpcore.WriteTimeout(f"could not send within {timeout:g} s")

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
            raise httpcore.ReadError(f"{type(e).__name__}: {e}") from None
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
            raise httpcore.WriteError(f"{type(e).__name__}: {e}") from None

    async def aclose(self) -> None:
        # No checkpoint: httpcore closes under a shield when an attempt is abandoned,
        # and a yield there would hold the failover back by a whole scheduling round
        # (the ledger row, the next attempt) when hundreds of deadlines fire at once.
        self._stream.socket.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:  # noqa: ASYNC109 (httpcore's interface)
        tls = trio.SSLStream(self._stream, ssl_context, server_hostname=server_hostname,
                             https_compatible=True)
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            await self.aclose()
            raise httpcore.ConnectTimeout(f"TLS handshake took over {timeout:g} s") from None
        except (trio.BrokenResourceError, OSError) as e:
            await self.aclose()
            raise httpcore.ConnectError(f"TLS handshake failed: {e}") from None
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
            raise httpcore.ReadError(f"{type(e).__name__}: {e}") from None

    async def _write(self, buffer: bytes) -> None:
        try:
            await self._tls.send_all(buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise httpcore.WriteError(f"{type(e).__name__}: {e}") from None

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


class NetBackend(httpcore.AsyncNetworkBackend):
    """httpcore's connection pools connect through this (see NetStream)."""

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[tuple[int, int, int | bytes | None]] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"timed out after {timeout:g} s") from None
        except OSError as e:
            raise httpcore.ConnectError(str(e) or type(e).__name__) from None
        for option in socket_options or ():
            stream.setsockopt(*option)
        return NetStream(stream)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class UpstreamTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over an httpcore pool that connects through NetBackend.

    httpx takes no network backend argument; its transport's one piece of state is
    the pool, so the pool is built here and the rest (request and response mapping,
    httpcore's exceptions as httpx's) is httpx's own.
    """

    def __init__(self, ssl_context: ssl.SSLContext, keepalive: int) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=None, max_keepalive_connections=keepalive,
            keepalive_expiry=5.0, http1=True, http2=False, retries=0,
            network_backend=NetBackend())


# ---------------------------------------------------------------------------
# Attempts
# The daemon's state, slot health, and one request's walk down its chain: each
# attempt in its own cancel scope carrying the first-token, then stall deadline.
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


class SavedBreaker(msgspec.Struct, kw_only=True):
    scope: str
    key: str
    state: str
    opens: int
    open_until: float  # Unix time
    reason: str
    skip: str = "breaker_open"
    hold: bool = False


class SavedState(msgspec.Struct, kw_only=True):
    """The state file: what must survive a restart during an outage."""

    version: int = 1
    saved_at: str = ""
    breakers: list[SavedBreaker] = []
    divisors: dict[str, float] = {}
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


class Health:
    """Breakers per credential, provider and model, and their I/O: ledger rows,
    warnings on stderr, the alert command and the state file."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.breakers: dict[tuple[str, str], Breaker] = {}
        self.alerts_in_flight = 0
        self.alerts_idle = trio.Event()  # set while no alert command runs
        self.alerts_idle.set()

    def credential_key(self, provider: str) -> str:
        """A credential is a provider and its key: a new key is a new credential."""
        key = self.d.keys.get(provider)
        if not key:
            return provider
        return f"{provider}:{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def _keys(self, slot: Slot) -> tuple[tuple[str, str], ...]:
        return (("credential", self.credential_key(slot.provider)),
                ("provider", slot.provider), ("model", slot.key))

    def admit(self, slot: Slot) -> tuple[str, float] | None:
        """None if the slot may be tried now (claiming a half-open probe), else
        (skip reason, when it may be tried again)."""
        now = trio.current_time()
        found = []
        for key in self._keys(slot):
            b = self.breakers.get(key)
            if b is not None:
                self._apply(key, b.poll(now))
                found.append(b)
        blocking = [b for b in found if b.blocks()]
        if blocking:
            # Out until its last breaker lets go; a half-open one being probed lets go soon.
            latest = max(blocking, key=lambda b: b.open_until if b.state == "open" else now)
            return latest.skip, latest.open_until if latest.state == "open" else now
        for b in found:
            if b.state == "half_open":
                b.probing = True
        return None

    def blocked_until(self, slot: Slot) -> float:
        """When the slot's breakers let it through again, without claiming a probe."""
        until = 0.0
        for key in self._keys(slot):
            b = self.breakers.get(key)
            if b is not None and b.blocks():
                until = max(until, b.open_until if b.state == "open" else math.inf)
        return until

    def force(self, slot: Slot, route: str) -> None:
        """Never blank: every slot is out, so this one is probed regardless."""
        for key in self._keys(slot):
            b = self.breakers.get(key)
            if b is not None and b.state != "closed":
                old, b.state, b.probing = b.state, "half_open", True
                if old != "half_open":
                    self._apply(key, (old, "half_open", f"every slot of route {route!r} is out; "
                                      "probing the one closest to recovery", None))

    def record(self, slot: Slot, failure: Failure | None, ttft: float | None) -> None:
        """Account one finished attempt."""
        now = trio.current_time()
        cfg = self.d.cfg.breakers
        outcome = "ok" if failure is None else failure.outcome
        if failure is not None and outcome == "rate_limited":
            self._trip(("model", slot.key), rate_limit_hold(failure.retry_after, cfg),
                       failure.error, skip="rate_limited", hold=True)
        elif failure is not None and outcome == "auth_error":
            self._trip(("credential", self.credential_key(slot.provider)), cfg.auth_isolation_s,
                       f"credential isolated: {failure.error}")
        elif failure is not None and outcome == "not_found":
            self._trip(("model", slot.key), cfg.not_found_isolation_s,
                       f"model isolated: {failure.error}")
        elif outcome == "ok" or outcome in HEALTH_FAILURES:
            failed = outcome != "ok"
            slow = ttft is not None and ttft > cfg.slow_call_s
            keys = [("provider", slot.provider), ("model", slot.key)]
            credential = ("credential", self.credential_key(slot.provider))
            if not failed and credential in self.breakers:
                keys.append(credential)  # a working call proves the key
            for key in keys:
                b = self.breakers.setdefault(key, Breaker())
                self._apply(key, b.result(now, failed, slow, cfg, self.d.rng.random()))
        # A probe whose outcome proved nothing (client gone, bad request) frees the
        # half-open slot for the next request instead of leaving it stuck.
        for key in self._keys(slot):
            b = self.breakers.get(key)
            if b is not None and b.probing:
                b.probing = False

    def _trip(self, key: tuple[str, str], seconds: float, reason: str, *,
              skip: str = "breaker_open", hold: bool = False) -> None:
        b = self.breakers.setdefault(key, Breaker())
        self._apply(key, b.trip(trio.current_time(), seconds, reason, skip=skip, hold=hold))

    def _apply(self, key: tuple[str, str], transition: Transition | None) -> None:
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
        self.save()

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
                                              capture_stderr=True, check=False)
            if scope.cancelled_caught:
                log.error("alert_command %s did not finish within %g s and was killed",
                          cmd[0], timeout)
            elif done.returncode:
                log.error("alert_command %s exited %d: %s", cmd[0], done.returncode,
                          done.stderr[:300].decode("utf-8", "replace").strip())
        except OSError as e:
            log.error("alert_command %s could not run: %s", cmd[0], e.strerror or e)
        finally:
            self.alerts_in_flight -= 1
            if not self.alerts_in_flight:
                self.alerts_idle.set()

    def snapshot(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        out = []
        for (scope, key), b in sorted(self.breakers.items()):
            self._apply((scope, key), b.poll(now))
            b.expire(now, self.d.cfg.breakers.window_s)
            out.append({
                "scope": scope, "key": key, "state": b.state,
                "failures_in_window": b.failures,
                "calls_in_window": len(b.window), "consecutive_failures": b.consecutive,
                "open_until": utc_timestamp(self.d.wall_time(b.open_until))
                if b.state == "open" else None,
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
            b.opens, b.reason, b.skip, b.hold = sb.opens, sb.reason, sb.skip, sb.hold
            if sb.state in ("open", "half_open"):
                # A half-open breaker reopens at once so the next request probes.
                b.state = "open"
                b.open_until = now + max(0.0, sb.open_until - wall)
                restored += 1
        return restored

    def save(self) -> None:
        self.d.save_state()


# httpcore's pool scans all its connections (and polls each idle one) on every
# request and every response close: O(n^2) per event with n connections, which
# costs even at n = 8. Smaller pools divide that: with 1000 streams open on one
# provider, 64 pools hold ~16 connections each; at 8 concurrent requests, one or two.
# Each pool keeps up to 4 idle connections for 5 s.
POOL_SHARDS = 64
POOL_KEEPALIVE = 4


class PoolShards:
    """A provider's connection pools, taken in turn among twice as many as there are
    requests under way: light traffic stays on the first pool, so its idle connection
    is reused within its keep-alive; under load each pool holds one or two, and the
    pool whose turn it is has likely an idle one."""

    __slots__ = ("pools", "active", "_turn")

    def __init__(self, pools: list[httpx.AsyncBaseTransport]) -> None:
        self.pools = pools
        self.active = 0  # requests under way on this provider
        self._turn = 0

    @contextlib.contextmanager
    def lease(self) -> Iterator[httpx.AsyncBaseTransport]:
        self._turn = (self._turn + 1) % min(len(self.pools), 2 * self.active + 1)
        self.active += 1
        try:
            yield self.pools[self._turn]
        finally:
            self.active -= 1


class Daemon:
    """Everything the daemon knows, passed down; there is no module-level state."""

    def __init__(
        self,
        cfg: Config,
        *,
        ledger: Ledger,
        keys: Mapping[str, str | None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.keys = dict(keys or {})
        self.secrets = [k for k in self.keys.values() if k]
        self.rng = rng or random.Random()
        self.routes = {name: resolve_route(cfg, name, rc) for name, rc in cfg.routes.items()}
        self.health = Health(self)
        self.estimator = Estimator()
        self.throttle = Throttle()
        self.inflight: dict[str, Exchange] = {}
        self.no_inflight = trio.Event()
        self.no_inflight.set()
        self.shutdown = trio.Event()
        self.idle_scopes: set[trio.CancelScope] = set()
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
        self.transport = transport
        self._tls: ssl.SSLContext | None = None  # one verified context, built on first use
        self.transports = {name: self._transport(p) for name, p in cfg.providers.items()}
        self.urls: dict[str, httpx.URL] = {}  # upstream URLs, parsed once
        # Where alert commands run; serve() sets it to a nursery that outlives requests.
        self.background: trio.Nursery | None = None
        self.state_path = cfg.daemon.state_file
        if self.state_path is None:
            self.state_path = os.path.join(os.path.dirname(ledger.path), "state.json") \
                if ledger.path else ""
        self._state_warned = False
        self.load_state()

    def wall_time(self, t: float) -> float:
        """A trio clock time as Unix time (for the ledger and the state file)."""
        return time.time() + (t - trio.current_time())

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

    def restore_divisors(self, divisors: dict[str, float]) -> None:
        self.estimator = Estimator(divisors)

    def divisors(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.estimator.divisors.items())}

    async def autosave(self) -> None:
        """Persist learned divisors once a minute when they changed."""
        while True:
            await trio.sleep(STATE_SAVE_EVERY_S)
            if self.estimator.dirty:
                self.estimator.dirty = False
                self.save_state()

    def save_state(self) -> None:
        """Atomically replace the state file; rare (breaker transitions, shutdown)."""
        if not self.state_path:
            return
        state = SavedState(saved_at=utc_timestamp(), breakers=self.health.saved(),
                           divisors=self.divisors())
        tmp = self.state_path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(msgspec.json.encode(state))
            os.replace(tmp, self.state_path)
        except OSError as e:
            if not self._state_warned:
                self._state_warned = True
                log.error("cannot write state file %s (%s); breakers will not survive a "
                          "restart until this is fixed", self.state_path, e.strerror)

    def _transport(self, provider: ProviderConfig) -> PoolShards:
        """Connection pools for one provider. failoverd uses httpx's transport layer
        directly: no redirects, cookies or auth flows to pay for on every request."""
        if self.transport is not None:
            return PoolShards([self.transport])
        if provider.base_url.startswith("https://"):
            if self._tls is None:  # loading the CA bundle costs ~100 ms and ~5 MB: once
                self._tls = httpx.create_ssl_context()
            tls = self._tls
        else:  # plain HTTP never uses it (redirects are not followed)
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        return PoolShards([UpstreamTransport(tls, POOL_KEEPALIVE) for _ in range(POOL_SHARDS)])

    async def aclose(self) -> None:
        for shards in self.transports.values():
            for transport in shards.pools:
                await transport.aclose()

    def reload(self, config_path: str) -> bool:
        """SIGHUP: take a new config and keys; keep the old ones if the new are bad."""
        try:
            cfg = load_config(config_path)
            keys = resolve_keys(cfg, os.environ)
        except ConfigError as e:
            log.error("reload failed, still serving the previous config: %s", e)
            return False
        changed = [n for n, p in cfg.providers.items()
                   if self.cfg.providers.get(n) != p or self.keys.get(n) != keys.get(n)]
        self.cfg, self.keys = cfg, keys
        self.secrets = [k for k in keys.values() if k]
        self.routes = {name: resolve_route(cfg, name, rc) for name, rc in cfg.routes.items()}
        # In-flight requests keep the pool they hold; new ones use a fresh pool.
        for name in changed:
            self.transports[name] = self._transport(cfg.providers[name])
        log.warning("config reloaded from %s: %d route(s), %d provider(s) changed",
                    config_path, len(self.routes), len(changed))
        return True

    def route_for(self, model: str) -> Route | None:
        route = self.routes.get(model)
        if route is None:
            slot = parse_slot(model)
            if slot is not None and slot.provider in self.cfg.providers:
                route = Route(model, (slot,), self.cfg.defaults)
        return route

    def model_cfg(self, slot: Slot) -> ModelConfig:
        return self.cfg.models.get(slot.key, NO_MODEL)

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

    def begin(self, ex: Exchange) -> None:
        if self.idle_probe is not None:  # overload can start with the first request
            self.idle_probe.cancel()
        self.inflight[ex.request_id] = ex
        self.no_inflight = trio.Event() if self.no_inflight.is_set() else self.no_inflight

    def end(self, ex: Exchange) -> None:
        self.inflight.pop(ex.request_id, None)
        if not self.inflight:
            self.no_inflight.set()

    def status(self) -> dict[str, Any]:
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
            "in_flight": [ex.describe(now) for ex in self.inflight.values()],
            "breakers": self.health.snapshot(),
            "token_divisors": self.divisors(),
            "ledger": {"path": self.ledger.path, "dropped_rows": self.ledger.dropped},
            "gc": {"frozen_objects": gc.get_freeze_count(), "threshold": list(gc.get_threshold()),
                   "collections": [g["collections"] for g in gc.get_stats()]},
        }


class Reply:
    """The client side of one exchange; the front end implements it over h11."""

    async def start(self, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                    *, final: bool = False) -> None:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    def relay_now(self, data: bytes) -> bytes | None:
        """Relay a chunk without waiting, if the socket takes it: b"" when all of it went
        out, else the framed rest for `send_raw`; None when there is no such path."""
        return None

    async def send_raw(self, framed: bytes) -> None:
        raise NotImplementedError

    async def finish(self, data: bytes) -> None:
        """The last bytes and the end of the body in one write: once [DONE] or an
        in-band error is out, the reply is settled even if the client hangs up."""
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


class Metrics:
    """Timings of one attempt, in trio clock seconds."""

    __slots__ = ("began", "first", "last", "max_gap")

    def __init__(self, began: float) -> None:
        self.began = began
        self.first: float | None = None
        self.last = began
        self.max_gap = 0.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class Exchange:
    """One client request on its way down a route's chain."""

    def __init__(
        self, d: Daemon, route: Route, body: dict[str, Any], *, stream: bool, peer: Peer,
        reply: Reply, request_id: str, body_size: int,
    ) -> None:
        self.d = d
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
        self.armed = "first_token_timeout"
        self.committed = False
        self.attempts = 0
        self.failures: list[tuple[Slot, Failure]] = []
        self.timed_out: set[str] = set()
        self.current: Slot | None = None
        self.served_by: Slot | None = None
        self.client_ttft: float | None = None
        self.cancel_reason = "client_disconnected"
        self.status = 200
        self.final_state: StreamState | None = None
        self.pending: list[bytes] = []  # frames held until commit
        self.holding = False  # commit held until usage is in (truncates_silently)
        self.writing = False  # a write to the client is under way
        self.min_window = 0  # after a context overflow: only larger windows
        self.tripped = False  # the silent-truncation tripwire fired
        self.context_skips: list[tuple[Slot, int, int]] = []  # (slot, needed, window)
        self.other_skips = 0  # slots skipped for a reason other than their window

    # -- the chain -------------------------------------------------------------

    async def run(self) -> None:
        self.d.begin(self)
        try:
            await self._walk()
        except trio.Cancelled:
            self.status = STATUS_SHUTDOWN if self.cancel_reason == "shutdown" \
                else STATUS_CLIENT_CLOSED
            self._request_row()
            raise
        except Exception:
            self.status = 500
            self._request_row()
            raise
        finally:
            self.d.end(self)

    async def _walk(self) -> None:
        last: Failure | None = None
        blocked: list[tuple[float, Slot]] = []  # slots out on a breaker, and until when
        redispatched = False
        for slot in self.route.slots:
            if self.tripped and redispatched:
                break  # one re-dispatch after a suspected truncation, no more
            skip = self.skip_reason(slot)
            if skip is not None:
                reason, until = skip
                self._attempt_row(slot, None, None, outcome="skipped", skip_reason=reason)
                if reason != "context_window":
                    self.other_skips += 1
                if until != math.inf:
                    blocked.append((until, slot))
                continue
            redispatched = self.tripped
            done, last = await self._try_slot(slot, last)
            if done:
                return
            if trio.current_time() >= self.deadline:
                break
        if not self.failures and blocked and trio.current_time() < self.deadline:
            # Never blank: rather than fail without an attempt, probe the slot whose
            # breaker is closest to recovery.
            slot = min(blocked, key=lambda b: b[0])[1]
            self.d.health.force(slot, self.route.name)
            done, last = await self._try_slot(slot, last)
            if done:
                return
        await self._finish_failed(last)

    async def _try_slot(self, slot: Slot, last: Failure | None) -> tuple[bool, Failure | None]:
        """Attempt a slot (and retry it once where the rules allow). True when the
        request is finished, one way or another."""
        timing = self.route.timing
        retried = False
        while trio.current_time() < self.deadline:
            if self.failures and not await self._wait_turn():
                break
            began = trio.current_time()
            failure = await self.attempt(slot)
            if failure is None:
                await self._finish_ok()
                return True, None
            last = failure
            self.failures.append((slot, failure))
            if failure.outcome == "client_disconnected":
                self.status = STATUS_CLIENT_CLOSED
                self._request_row()
                return True, last
            if self.committed:
                await self._finish_in_band(failure)
                return True, last
            if failure.outcome == "bad_request":
                await self._pass_through(failure)
                return True, last
            now = trio.current_time()
            wait = None if retried else retry_wait(
                failure, elapsed=now - began, remaining=self.deadline - now, timing=timing,
                jitter=self.d.rng.random())
            # An open breaker means no retry (the failure may just have opened it),
            # unless it is a 429 hold that ends within the wait.
            if wait is None or self.d.health.blocked_until(slot) > now + wait:
                break
            retried = True
            await trio.sleep(wait)
            if self.d.health.admit(slot) is not None:
                break
        if last is not None and is_timeout(last):
            self.timed_out.add(slot.provider)
        return False, last

    async def _wait_turn(self) -> bool:
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

    def skip_reason(self, slot: Slot) -> tuple[str, float] | None:
        """(skip reason, until when) if the slot must not be tried for this request."""
        if slot.provider in self.timed_out:
            return "provider_timed_out", math.inf
        d = self.d
        model_cfg = d.model_cfg(slot)
        window = model_cfg.context_window
        estimate = d.estimator.estimate(slot.key, self.body_size)
        needed = estimate + output_reserve(self.body, model_cfg)
        if window is not None and (needed > window or window <= self.min_window):
            self.context_skips.append((slot, needed, window))
            return "context_window", math.inf
        over = d.throttle.over(slot.key, trio.current_time(), needed, model_cfg)
        if over is not None:
            log.info("request %s: %s skipped: %s", self.request_id, slot.key, over)
            return "rate_limited", math.inf
        return d.health.admit(slot)  # last: it may claim a half-open probe

    # -- one attempt -----------------------------------------------------------

    def arm(self, scope: trio.CancelScope, deadline: float, kind: str) -> None:
        """Set the attempt's deadline, clipped by the request's total deadline."""
        if deadline < self.deadline:
            scope.deadline = deadline
            self.armed = kind
        else:
            scope.deadline = self.deadline
            self.armed = "total_timeout"

    async def attempt(self, slot: Slot) -> Failure | None:
        timing = self.route.timing
        d = self.d
        model_cfg = d.model_cfg(slot)
        st = StreamState(assemble=not self.stream, want_usage=self.want_usage)
        m = Metrics(trio.current_time())
        self.current = slot
        self.pending = []
        reserve = output_reserve(self.body, model_cfg)
        estimate = d.estimator.estimate(slot.key, self.body_size)
        d.throttle.add(slot.key, m.began, estimate + reserve, model_cfg)
        # A model that truncates silently may only be trusted once its usage is in:
        # hold the commit when the prompt could, at worst, reach its truncation zone.
        self.holding = self.stream and model_cfg.truncates_silently and bool(
            model_cfg.context_window) and Estimator.worst_case(self.body_size) >= (
            (model_cfg.context_window or 0) - reserve)
        failure: Failure | None = None
        try:
            with trio.CancelScope() as scope:
                self.arm(scope, m.began + timing.first_token_timeout_s, "first_token_timeout")
                try:
                    await self._exchange(slot, st, m, scope)
                except Failure as f:
                    failure = f
                except Exception as e:  # a bug or an upstream reply we did not foresee
                    log.exception("request %s: %s: unexpected error handling the upstream "
                                  "reply; treated as a protocol error", self.request_id, slot.key)
                    failure = Failure("protocol_error", f"failoverd could not handle the reply: "
                                                        f"{type(e).__name__}: {e}")
            if scope.cancelled_caught and not st.complete:
                failure = Failure(self.armed, self._timeout_text(st))
                if self.writing:  # cut mid-write: the framing is broken
                    self.reply.abort()
                    if self.armed == "client_write":
                        failure = Failure("client_disconnected", "client stopped reading for "
                                          f"{d.cfg.daemon.client_write_timeout_s:g} s")
        except trio.Cancelled:
            if self.writing:
                self.reply.abort()
            gone = Failure(self.cancel_reason, self.cancel_reason)
            self._attempt_row(slot, st, m, failure=gone)
            self.d.health.record(slot, gone, None)
            raise
        if failure is None:
            failure = self._tripwire(slot, st, model_cfg, reserve)
            if failure is None and st.tokens_in:
                d.estimator.observe(slot.key, self.body_size, st.tokens_in)
        elif failure.outcome == "context_overflow":
            reported = reported_prompt_tokens(failure.error)
            d.estimator.overflowed(slot.key, self.body_size, model_cfg.context_window, reported)
            self.min_window = max(self.min_window,
                                  model_cfg.context_window or reported or estimate)
        if failure is not None:
            failure.error = scrub(failure.error, self.d.secrets)
        self._attempt_row(slot, st, m, failure=failure)
        self.d.health.record(slot, failure, None if m.first is None else m.first - m.began)
        if failure is None:
            self.served_by = slot
            self.final_state = st
        elif failure.outcome != "client_disconnected":
            log.info("request %s: %s %s (%s)", self.request_id, slot.key, failure.outcome,
                     failure.error)
        return failure

    def _tripwire(self, slot: Slot, st: StreamState, model_cfg: ModelConfig,
                  reserve: int) -> Failure | None:
        """A silently truncating model that reports a prompt filling its window has
        most likely dropped part of it: never pass that answer off as good."""
        if not model_cfg.truncates_silently or not truncation_suspected(
                st.tokens_in, model_cfg.context_window, reserve):
            return None
        window = model_cfg.context_window or 0
        self.tripped = True
        self.min_window = max(self.min_window, window)
        error = (f"suspected silent truncation: {slot.key} reported {st.tokens_in} prompt "
                 f"tokens, at or above its context_window {window} minus {reserve} reserved "
                 "for output")
        log.warning("request %s: %s", self.request_id, error)
        self.d.health.alert(msgspec.json.encode({
            "kind": "alert", "ts": utc_timestamp(), "type": "silent_truncation",
            "request_id": self.request_id, "route": self.route.name, "slot": slot.key,
            "prompt_tokens": st.tokens_in, "context_window": window}))
        return Failure("context_overflow", error, status=200)

    def _timeout_text(self, st: StreamState) -> str:
        t = self.route.timing
        if self.armed == "first_token_timeout":
            text = f"no output within first_token_timeout_s = {t.first_token_timeout_s:g} s"
        elif self.armed == "stall_timeout":
            text = f"no output for stall_timeout_s = {t.stall_timeout_s:g} s after output began"
        else:
            text = f"total_timeout_s = {t.total_timeout_s:g} s ran out"
        # Before the first token every decoded frame was empty; after it, only comments count.
        ignored = st.sse.heartbeats + (st.events if self.armed == "first_token_timeout" else 0)
        return text + (f"; {ignored} heartbeat(s) or empty frame(s) ignored" if ignored else "")

    async def _exchange(
        self, slot: Slot, st: StreamState, m: Metrics, scope: trio.CancelScope,
    ) -> None:
        d = self.d
        provider = d.cfg.providers[slot.provider]
        adapter = ADAPTERS[provider.kind]
        url, headers, payload = adapter.request(
            provider.base_url, slot.model, self.body, d.keys.get(slot.provider), d.model_cfg(slot))
        if provider.headers:
            headers = {**provider.headers, **headers}
        # Only the connect timeout is httpx's; the attempt's cancel scope owns the rest
        # (httpx's default 5 s read timeout would fight it).
        timeout = {"connect": provider.connect_timeout_s, "read": None, "write": None,
                   "pool": None}
        parsed = d.urls.get(url)
        if parsed is None:
            parsed = d.urls[url] = httpx.URL(url)
        request = httpx.Request("POST", parsed, headers=headers, content=payload,
                                extensions={"timeout": timeout})
        with d.transports[slot.provider].lease() as pool:
            await self._call(pool, request, slot, adapter, st, m, scope)

    async def _call(
        self, pool: httpx.AsyncBaseTransport, request: httpx.Request, slot: Slot, adapter: Any,
        st: StreamState, m: Metrics, scope: trio.CancelScope,
    ) -> None:
        provider = self.d.cfg.providers[slot.provider]
        try:
            resp = await pool.handle_async_request(request)
        except httpx.TimeoutException:
            raise Failure("connect_error", f"connect timed out after "
                                           f"{provider.connect_timeout_s:g} s",
                          timeout=True) from None
        except httpx.HTTPError as e:
            raise Failure("connect_error", f"{type(e).__name__}: {e}") from None
        try:
            await self._consume(slot, adapter, resp, st, m, scope)
        except httpx.HTTPError as e:
            if st.complete:
                return  # the answer was whole; only the connection's end was untidy
            outcome = "truncated" if m.first is not None else "connect_error"
            raise Failure(outcome, f"{type(e).__name__} after {st.events} event(s): {e}") from None
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await resp.aclose()

    async def _consume(
        self, slot: Slot, adapter: Any, resp: httpx.Response, st: StreamState, m: Metrics,
        scope: trio.CancelScope,
    ) -> None:
        status = resp.status_code
        if status != 200:
            body = await _read_limited(resp, ERROR_BODY_LIMIT)
            outcome, error = classify_status(status, body)
            retry_after = (parse_retry_after(resp.headers, time.time())
                           if outcome == "rate_limited" else None)
            raise Failure(outcome, error, status=status, body=body, retry_after=retry_after)
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            if "json" not in ctype:
                raise Failure("protocol_error", f"200 with content-type {ctype!r}, expected "
                                                "text/event-stream", status=200)
            body = await _read_limited(resp, self.d.cfg.daemon.max_body_bytes)
            frame = adapter.whole_body(body, st)
            await self._digested(slot, st, m, scope, frame)
            return
        sse = st.sse
        on_event = adapter.on_event
        # We ask for identity encoding; read the transport's stream directly unless a
        # server compressed anyway (httpx's iterators then decode it).
        body = resp.aiter_bytes() if "content-encoding" in resp.headers else resp.stream
        async for chunk in body:
            if st.done:
                continue  # drain to the end, so the connection goes back to the pool
            for event, data in sse.feed(chunk):
                frame = on_event(event, data, st)
                await self._digested(slot, st, m, scope, frame)
                if st.done:
                    # Well-behaved servers end the body right after [DONE]; one
                    # that does not is left after a short grace, not waited on.
                    scope.deadline = min(scope.deadline, trio.current_time() + DRAIN_S)
                    break
        for event, data in () if st.done else sse.close():
            frame = on_event(event, data, st)
            await self._digested(slot, st, m, scope, frame)
        if st.done or st.finish_reason:
            if m.first is None:
                raise Failure("protocol_error", "stream completed without any output", status=200)
            return
        if sse.junk and not st.events:
            raise Failure("protocol_error", f"{sse.junk} line(s) that are not SSE, no data",
                          status=200)
        raise Failure("truncated", f"stream ended without [DONE] or finish_reason after "
                                   f"{st.events} event(s)", status=200)

    async def _digested(
        self, slot: Slot, st: StreamState, m: Metrics, scope: trio.CancelScope,
        frame: bytes | None,
    ) -> None:
        """After an event: move the deadline on progress, commit, relay.

        Nothing is dropped: if the deadline fired before this event could be handled
        (a late event loop), the attempt ends as that timeout, so the client gets a
        failover or an in-band error, never an answer with a hole in it.
        """
        stall = self.route.timing.stall_timeout_s
        if st.progress:
            st.progress = False
            now = trio.current_time()
            if m.first is None:
                m.first = now
            elif now - m.last > m.max_gap:
                m.max_gap = now - m.last
            m.last = now
            if self.stream and not self.holding:
                if scope.cancel_called:
                    raise Failure(self.armed, self._timeout_text(st))
                if not self.committed:
                    if frame is not None:
                        self.pending.append(frame)
                    await self._write(scope, slot, None, now + stall, "stall_timeout")
                elif frame is not None:
                    await self._write(scope, slot, frame, now + stall, "stall_timeout")
                else:
                    self.arm(scope, now + stall, "stall_timeout")
                return
            self.arm(scope, now + stall, "stall_timeout")
        if frame is not None and self.stream:
            if self.committed:
                if scope.cancel_called:
                    raise Failure(self.armed, self._timeout_text(st))
                await self._write(scope, slot, frame, scope.deadline, self.armed)
            elif self.holding or len(self.pending) < MAX_PENDING_FRAMES:
                self.pending.append(frame)

    async def _write(self, scope: trio.CancelScope, slot: Slot, frame: bytes | None,
                     upstream_deadline: float, kind: str) -> None:
        """Commit (frame None) or relay one frame under the client's own deadline, then
        give the upstream its deadline back, extended by the time the write took: a
        client slow to read is never an upstream stall, and one that stops reading is
        dropped after client_write_timeout_s. A client that is reading takes the
        frame at once, without a deadline move or a checkpoint."""
        rest = None
        if frame is not None:
            data = b"data: %b\n\n" % frame
            try:
                rest = self.reply.relay_now(data)
            except ClientGone:
                raise Failure("client_disconnected", _CLIENT_GONE) from None
            if rest == b"":
                self.arm(scope, upstream_deadline, kind)
                return
        before = trio.current_time()
        self.arm(scope, before + self.d.cfg.daemon.client_write_timeout_s, "client_write")
        self.writing = True
        if frame is None:
            await self._commit(slot)
        else:
            try:
                await (self.reply.send(data) if rest is None else self.reply.send_raw(rest))
            except ClientGone:
                raise Failure("client_disconnected", _CLIENT_GONE) from None
        self.writing = False
        self.arm(scope, upstream_deadline + (trio.current_time() - before), kind)

    async def _commit(self, slot: Slot) -> None:
        pending, self.pending = self.pending, []
        self.committed = True
        self.client_ttft = trio.current_time() - self.started
        headers = [*self._headers(slot, in_attempt=True), ("content-type", "text/event-stream"),
                   ("cache-control", "no-cache")]
        first = b"".join(b"data: " + f + b"\n\n" for f in pending)
        try:
            await self.reply.start(200, headers, first)
        except ClientGone:
            raise Failure("client_disconnected", "client went away before the first byte") from None

    # -- replies ---------------------------------------------------------------

    def _headers(self, slot: Slot | None, in_attempt: bool = False) -> list[tuple[str, str]]:
        """`x-failoverd-*` headers; `in_attempt` counts the attempt not yet in the ledger."""
        headers = [("x-failoverd-request-id", self.request_id),
                   ("x-failoverd-attempts", str(self.attempts + in_attempt))]
        if slot is not None:
            headers.append(("x-failoverd-served-by", slot.key))
        return headers

    async def _finish_ok(self) -> None:
        slot = self.served_by
        assert slot is not None
        try:
            if self.stream:
                if not self.committed:  # held until usage was in, and it passed
                    await self._commit(slot)
                await self.reply.finish(b"data: [DONE]\n\n")
            else:
                assert self.final_state is not None
                body = _json_encode(self.final_state.completion(slot.model, self.request_id))
                self.client_ttft = trio.current_time() - self.started
                await self.reply.start(200, [*self._headers(slot),
                                             ("content-type", "application/json")],
                                       body, final=True)
        except (ClientGone, Failure):
            self.status = STATUS_CLIENT_CLOSED
        self._request_row()

    async def _finish_in_band(self, failure: Failure) -> None:
        """After commit: one error event, no [DONE], so OpenAI clients raise."""
        self.status = failure_status(failure)
        slot = self.served_by = self.current
        body = self._error(f"upstream {slot.key if slot else '?'} failed mid-stream: "
                           f"{failure.outcome} ({failure.error})", failure)
        with contextlib.suppress(ClientGone):
            await self.reply.finish(b"data: " + _json_encode(body) + b"\n\n")
        self._request_row()

    async def _pass_through(self, failure: Failure) -> None:
        """A client error the upstream reported would fail everywhere: return it as is."""
        self.status = failure.status or 400
        body = failure.body or _json_encode(self._error(failure.error, failure))
        for secret in self.d.secrets:  # some upstreams echo the key; agents never see it
            body = body.replace(secret.encode(), b"[redacted]")
        with contextlib.suppress(ClientGone):
            await self.reply.start(self.status, [*self._headers(self.current),
                                                 ("content-type", "application/json")],
                                   body, final=True)
        self.client_ttft = trio.current_time() - self.started
        self._request_row()

    async def _finish_failed(self, last: Failure | None) -> None:
        if not self.other_skips and all(
                f.outcome == "context_overflow" for _, f in self.failures) and (
                self.failures or self.context_skips):
            return await self._finish_too_large()
        self.status = failure_status(last)
        tried = len(self.failures)
        if last is None:
            message = (f"route {self.route.name!r}: no slot could be tried "
                       f"({self.attempts} skipped); see x-failoverd-request-id in the ledger")
        else:
            slot = self.failures[-1][0]
            message = (f"route {self.route.name!r}: all {tried} attempt(s) failed; last: "
                       f"{slot.key} {last.outcome} ({last.error})")
        code = "upstream_timeout" if self.status == 504 else "upstream_failed"
        body = error_body(message, type_="failoverd_error", code=code,
                          extra=self._failoverd_extra())
        with contextlib.suppress(ClientGone):
            await self.reply.start(self.status, [*self._headers(None),
                                                 ("content-type", "application/json")],
                                   _json_encode(body), final=True)
        self.client_ttft = trio.current_time() - self.started
        self._request_row()

    async def _finish_too_large(self) -> None:
        """No slot can hold the prompt: say so the way OpenAI does, so agents compact."""
        self.status = 400
        windows = [(w, s) for s, _, w in self.context_skips]
        windows += [(self.d.model_cfg(s).context_window or 0, s) for s, _ in self.failures]
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
        body = error_body(message, type_="invalid_request_error", code="context_length_exceeded",
                          param="messages", extra=self._failoverd_extra())
        with contextlib.suppress(ClientGone):
            await self.reply.start(400, [*self._headers(None),
                                         ("content-type", "application/json")],
                                   _json_encode(body), final=True)
        self.client_ttft = trio.current_time() - self.started
        self._request_row()

    def _failoverd_extra(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "attempts": [
                {"provider": s.provider, "model": s.model, "outcome": f.outcome,
                 "status": f.status, "error": f.error}
                for s, f in self.failures
            ],
        }

    def _error(self, message: str, failure: Failure) -> dict[str, Any]:
        return error_body(message, type_="failoverd_error", code=failure.outcome,
                          extra=self._failoverd_extra())

    # -- ledger ----------------------------------------------------------------

    def _attempt_row(
        self, slot: Slot, st: StreamState | None, m: Metrics | None, *,
        failure: Failure | None = None, outcome: str | None = None,
        skip_reason: str | None = None,
    ) -> None:
        tokens_in = tokens_out = None
        estimated = False
        ttft = latency = gap = None
        if st is not None and m is not None:
            tokens_in, tokens_out = st.tokens_in, st.tokens_out
            if tokens_in is None:
                tokens_in = self.d.estimator.estimate(slot.key, self.body_size)
                estimated = True
            if tokens_out is None and st.out_chars:
                tokens_out = math.ceil(st.out_chars / OUTPUT_CHARS_PER_TOKEN)
                estimated = True
            ttft = None if m.first is None else m.first - m.began
            latency = trio.current_time() - m.began
            gap = m.max_gap if m.first is not None else None
        model_cfg = self.d.model_cfg(slot)
        self.d.ledger.write(AttemptRow(
            ts=utc_timestamp(), request_id=self.request_id, route=self.route.name,
            attempt=self.attempts, provider=slot.provider, model=slot.model,
            outcome=outcome or (failure.outcome if failure else "ok"), skip_reason=skip_reason,
            status=(failure.status if failure else (200 if st is not None else None)),
            error=failure.error if failure else None, ttft_ms=_ms(ttft), latency_ms=_ms(latency),
            max_gap_ms=_ms(gap), committed=self.committed and st is not None,
            tokens_in=tokens_in, tokens_out=tokens_out, tokens_estimated=estimated,
            # A call that produced output may be billed; one that produced none is not.
            cost_usd=cost_usd(model_cfg, tokens_in, tokens_out)
            if st is not None and (m is not None and m.first is not None) else None,
            stream=self.stream, client_pid=self.peer.pid, client_uid=self.peer.uid,
        ))
        self.attempts += 1

    def _request_row(self) -> None:
        served = self.served_by.key if self.served_by and self.status == 200 else None
        self.d.ledger.write(RequestRow(
            ts=utc_timestamp(), request_id=self.request_id, route=self.route.name,
            outcome="ok" if self.status == 200 else "error", served_by=served,
            attempts=self.attempts, total_ms=_ms(trio.current_time() - self.started) or 0.0,
            ttft_ms=_ms(self.client_ttft), status=self.status, stream=self.stream,
            client_pid=self.peer.pid, client_uid=self.peer.uid,
        ))

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "route": self.route.name,
            "slot": self.current.key if self.current else None,
            "attempts": self.attempts, "committed": self.committed,
            "age_s": round(now - self.started, 3), "stream": self.stream,
        }


async def _read_limited(resp: httpx.Response, limit: int) -> bytes:
    parts, size = [], 0
    async for chunk in resp.aiter_bytes():
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


# ---------------------------------------------------------------------------
# Front end
# The h11 connection loop: keep-alive, head/body deadlines, size limits, routing
# to the OpenAI endpoints, and the Reply the engine writes through.
# ---------------------------------------------------------------------------

# Request heads are small; 64 KiB is h11's own default bound.
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

    async def send(self, data: bytes) -> None:
        """No deadline of its own: the Exchange bounds it."""
        if not self.chunked:
            await self._write([h11.Data(data=data)])
            return
        await self.send_raw(b"%x\r\n%b\r\n" % (len(data), data))

    def relay_now(self, data: bytes) -> bytes | None:
        """The per-token hot path: one write(2) and no checkpoint. A client that is
        reading takes a token at once; only a full socket buffer takes the slow path."""
        if not self.chunked or self.sock is None:
            return None
        if self.conn.our_state is h11.ERROR:
            raise ClientGone
        framed = b"%x\r\n%b\r\n" % (len(data), data)
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

    async def finish(self, data: bytes) -> None:
        await self._write([h11.Data(data=data), h11.EndOfMessage()])

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
        with trio.move_on_after(self.write_timeout) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                scope.cancel()
        if scope.cancelled_caught:
            self.conn.send_failed()
            raise ClientGone


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
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


async def handle_connection(d: Daemon, stream: trio.abc.Stream, peer: Peer) -> None:
    """Serve HTTP/1.1 requests on one client connection until it closes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    dc = d.cfg.daemon
    reply = H11Reply(conn, stream, dc.client_write_timeout_s)
    try:
        while True:
            if not conn.trailing_data[0]:
                # Keep-alive idle: wait for the next request's first byte.
                idle_until = trio.current_time() + dc.keepalive_timeout_s
                with trio.CancelScope(deadline=idle_until) as idle:
                    d.idle_scopes.add(idle)
                    if d.draining:
                        idle.cancel()
                    try:
                        data = await stream.receive_some(RECV_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    conn.receive_data(data)
                d.idle_scopes.discard(idle)
                if idle.cancelled_caught:
                    return
            with trio.move_on_after(dc.head_timeout_s) as head_scope:
                try:
                    event = await _next_event(conn, stream)
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
            await _handle_request(d, conn, stream, reply, event, peer)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # MUST_CLOSE, an error, or a reply cut short: not reusable
            conn.start_next_cycle()
    except Exception:
        log.exception("connection handler failed; the connection is closed, the daemon goes on")
        if conn.our_state is h11.SEND_RESPONSE:
            await _simple(reply, 500, error_body("internal error in failoverd; see its log",
                                                 type_="failoverd_error", code="internal"))
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await stream.aclose()


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
        await reply._write([h11.InformationalResponse(status_code=100, headers=[])])
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


async def _handle_request(
    d: Daemon, conn: h11.Connection, stream: trio.abc.Stream, reply: H11Reply,
    request: h11.Request, peer: Peer,
) -> None:
    path = request.target.split(b"?", 1)[0]
    method = request.method
    try:
        body = await _read_body(d, conn, stream, reply, request)
    except h11.RemoteProtocolError as e:
        await _client_error(reply, e.error_status_hint, f"malformed HTTP request body: {e}",
                            code="bad_http", close=True)
        return
    if body is None:
        return
    if path == b"/v1/chat/completions" and method == b"POST":
        await _chat(d, conn, stream, reply, body, peer)
    elif path == b"/v1/models" and method == b"GET":
        await _simple(reply, 200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "failoverd"}
            for name in d.routes]})
    elif path == b"/healthz" and method == b"GET":
        await _simple(reply, 503 if d.draining else 200,
                      {"status": "draining" if d.draining else "ok"})
    elif path == b"/status" and method == b"GET":
        await _simple(reply, 200, d.status())
    elif path in (b"/v1/chat/completions", b"/v1/models", b"/healthz", b"/status"):
        await _client_error(reply, 405, f"{method.decode()} is not allowed on {path.decode()}",
                            code="method_not_allowed")
    else:
        await _client_error(reply, 404, f"no such endpoint {path.decode('latin-1')}; failoverd "
                            "serves POST /v1/chat/completions, GET /v1/models, /healthz, /status",
                            code="not_found")


async def _chat(
    d: Daemon, conn: h11.Connection, stream: trio.abc.Stream, reply: H11Reply, raw: bytes,
    peer: Peer,
) -> None:
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        await _client_error(reply, 400, f"request body is not valid JSON: {e}", code="invalid_json")
        return
    if not isinstance(body, dict):
        await _client_error(reply, 400, "request body must be a JSON object", code="invalid_json")
        return
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        await _client_error(reply, 400, "'messages' must be a non-empty array of messages",
                            code="missing_messages", param="messages")
        return
    if not isinstance(body.get("stream_options") or {}, dict):
        await _client_error(reply, 400, "'stream_options' must be an object",
                            code="invalid_value", param="stream_options")
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
    if d.draining:
        await _client_error(reply, 503, "failoverd is shutting down; retry shortly",
                            code="shutting_down", close=True)
        return
    if d.should_shed(body.get("stream") is True):
        await _shed(d, reply, route, body, peer)
        return
    ex = Exchange(d, route, body, stream=body.get("stream") is True, peer=peer, reply=reply,
                  request_id=_secrets.token_hex(8), body_size=len(raw))
    with trio.CancelScope() as ex_scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_client, conn, stream, ex, ex_scope)
            await ex.run()
            nursery.cancel_scope.cancel()


async def _shed(d: Daemon, reply: H11Reply, route: Route, body: dict[str, Any],
                peer: Peer) -> None:
    """Overloaded: refuse at once, cheaply, so accepted requests stay fast."""
    d.shed += 1
    d.ledger.write(RequestRow(
        ts=utc_timestamp(), request_id=_secrets.token_hex(8), route=route.name, outcome="error",
        served_by=None, attempts=0, total_ms=0.0, ttft_ms=None, status=503,
        stream=body.get("stream") is True, client_pid=peer.pid, client_uid=peer.uid))
    error = error_body(f"failoverd is overloaded (event loop {d.loop_lag * 1000:.0f} ms late, "
                       f"limit daemon.shed_lag_s = {d.cfg.daemon.shed_lag_s:g} s); retry shortly",
                       type_="failoverd_error", code="overloaded")
    await _simple(reply, 503, error, [("retry-after", "1")])


async def _watch_client(
    conn: h11.Connection, stream: trio.abc.Stream, ex: Exchange, ex_scope: trio.CancelScope
) -> None:
    """Cancel the exchange the moment the client hangs up; keep pipelined bytes."""
    buffered = 0
    while buffered <= MAX_HEAD_BYTES:
        try:
            data = await stream.receive_some(RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            ex.cancel_reason = "client_disconnected"
            ex_scope.cancel()
            return
        conn.receive_data(data)
        buffered += len(data)


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


def peer_credentials(stream: trio.abc.Stream) -> Peer:
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family != _socket.AF_UNIX:
        return Peer()
    try:
        raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return Peer()
    pid, uid, _gid = struct.unpack("3i", raw)
    return Peer(pid, uid)


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
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)


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


async def open_listeners(cfg: Config) -> list[trio.SocketListener]:
    listeners = activated_listeners()
    if not listeners:
        try:
            listeners.append(await open_unix_listener(cfg.daemon.socket, cfg.daemon.socket_mode))
        except OSError as e:
            raise StartupError(f"cannot listen on daemon.socket = {cfg.daemon.socket}: "
                               f"{e.strerror}") from None
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


async def serve(
    d: Daemon, listeners: list[trio.abc.Listener[Any]], *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept until `d.shutdown` is set, then drain in-flight requests within the grace."""

    async def handler(stream: trio.abc.Stream) -> None:
        await handle_connection(d, stream, peer_credentials(stream))

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
        for listener in listeners:
            await listener.aclose()
        for scope in list(d.idle_scopes):
            scope.cancel()
        with trio.move_on_after(d.cfg.daemon.shutdown_grace_s):
            await d.no_inflight.wait()
        for ex in d.inflight.values():
            ex.cancel_reason = "shutdown"
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
                d.ledger.reopen()
                if config_path is not None:
                    d.reload(config_path)
                continue
            log.warning("%s: stopping; in-flight requests get %g s to finish",
                        signal.Signals(signum).name, d.cfg.daemon.shutdown_grace_s)
            sd_notify("STOPPING=1")
            d.shutdown.set()


async def _watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _serve_then_stop(
    d: Daemon, listeners: list[trio.abc.Listener[Any]], helpers: trio.CancelScope, *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(d, listeners, task_status=task_status)
    helpers.cancel()


def resolve_keys(cfg: Config, env: Mapping[str, str]) -> dict[str, str | None]:
    return {name: resolve_api_key(name, p, env) for name, p in cfg.providers.items()}


async def run_daemon(cfg: Config, config_path: str | None) -> None:
    try:
        keys = resolve_keys(cfg, os.environ)
        ledger = Ledger(cfg.daemon.ledger)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"cannot open daemon.ledger = {cfg.daemon.ledger}: {e.strerror}; "
                           "create the directory or fix its permissions") from None
    d = Daemon(cfg, ledger=ledger, keys=keys)
    listeners = await open_listeners(cfg)
    tune_gc()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, d, config_path)
            if (usec := os.environ.get("WATCHDOG_USEC", "")).isdigit():
                nursery.start_soon(_watchdog, int(usec) / 2e6)
            await nursery.start(_serve_then_stop, d, listeners, nursery.cancel_scope)
            sd_notify("READY=1")
            log.info("failoverd %s serving %d route(s) on %s%s; ledger %s", __version__,
                     len(d.routes), cfg.daemon.socket,
                     f" and tcp {cfg.daemon.tcp}" if cfg.daemon.tcp else "", cfg.daemon.ledger)
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await d.aclose()
        ledger.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(cfg.daemon.socket).st_mode):
                os.unlink(cfg.daemon.socket)


# ---------------------------------------------------------------------------
# Demo
# A scripted OpenAI-compatible upstream on loopback (also used by the tests) and
# `failoverd demo`: hung, heartbeat-only and healthy upstreams, one timeline each.
# ---------------------------------------------------------------------------

# A script is a list of steps the fake upstream performs in order:
#   ("respond", status, headers, body)  a whole non-streamed reply, then close
#   ("head", status, headers)           start a close-delimited reply (default: 200 SSE)
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

    `scripts(model, body, n)` returns the script for the n-th request (0-based).
    """

    def __init__(self, scripts: Callable[[str, dict[str, Any], int], Script]) -> None:
        self.scripts = scripts
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0  # clients that hung up while their script was still running
        self.disconnected = trio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        parts = []
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                 h11.RemoteProtocolError):
            while True:
                event = await _next_event(conn, stream)
                if isinstance(event, h11.Data):
                    parts.append(event.data)
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if not isinstance(event, h11.EndOfMessage):
                return
            body = msgspec.json.decode(b"".join(parts)) if parts else {}
            n = len(self.requests)
            self.requests.append(body)
            script = self.scripts(str(body.get("model")), body, n)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, stream, nursery.cancel_scope)
                await self._play(stream, script)
                nursery.cancel_scope.cancel()
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await stream.aclose()

    async def _watch(self, stream: trio.abc.Stream, script_scope: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(RECV_SIZE):
                pass
        self.disconnects += 1
        self.disconnected.set()
        script_scope.cancel()

    async def _play(self, stream: trio.abc.Stream, script: Script) -> None:
        if script and script[0][0] not in ("head", "respond"):
            script = [("head", 200, {}), *script]
        with contextlib.suppress(ConnectionResetError):  # a "reset" step: just drop it
            async for piece in play_script(script):
                await stream.send_all(piece)


async def play_script(script: Script) -> AsyncIterator[bytes]:
    """The bytes a script puts on the wire, at the times it puts them; ends at a
    "close" step, raises ConnectionResetError at a "reset" step."""
    for step in script:
        kind = step[0]
        if kind == "sleep":
            await trio.sleep(step[1])
        elif kind == "hang":
            await trio.sleep_forever()
        elif kind == "close":
            return
        elif kind == "reset":
            raise ConnectionResetError("connection reset by peer")
        elif kind in ("head", "respond"):
            status, headers = step[1], {k.lower(): v for k, v in step[2].items()}
            body = step[3] if kind == "respond" else b""
            if kind == "respond":
                headers.setdefault("content-type", "application/json")
                headers["content-length"] = str(len(body))
            else:
                headers.setdefault("content-type", "text/event-stream")
            headers["connection"] = "close"
            yield (f"HTTP/1.1 {status} X\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + body
            if kind == "respond":
                return
        else:
            yield script_bytes(step)


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
            transport = httpx.AsyncHTTPTransport(uds=cfg.daemon.socket)
            ok = True
            async with httpx.AsyncClient(transport=transport, base_url="http://failoverd",
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
                 "(one per attempt, one per request); see `failoverd tail LEDGER`")
            nursery.cancel_scope.cancel()
    return 0 if ok else 1


async def _demo_request(
    client: httpx.AsyncClient, echo: Callable[[str], None], title: str, route: str,
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


def _setup_logging(verbose: bool) -> None:
    # Under systemd, journald reads "<N>" priority prefixes from stderr.
    prefix = "%(levelno)s" if os.environ.get("JOURNAL_STREAM") else ""
    handler = logging.StreamHandler(sys.stderr)
    if prefix:
        handler.addFilter(_JournalPriority())
        handler.setFormatter(logging.Formatter("<%(priority)d>%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("failoverd %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


class _JournalPriority(logging.Filter):
    LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}

    def filter(self, record: logging.LogRecord) -> bool:
        record.priority = self.LEVELS.get(record.levelno, 6)
        return True


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
def serve_cmd(config_path: str | None, quiet: bool) -> None:
    """Run the daemon in the foreground (systemd Type=notify)."""
    _setup_logging(verbose=not quiet)
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
    problems = []
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
    if problems:
        sys.exit(1)
    click.echo("config OK")


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms"


def format_row(row: LedgerRow) -> str:
    """One human-readable line for `failoverd tail`."""
    ts = row.ts[11:23] if len(row.ts) >= 23 else row.ts
    if isinstance(row, AttemptRow):
        what = row.outcome if row.outcome != "skipped" else f"skipped:{row.skip_reason}"
        line = (f"{ts} attempt {row.request_id} {row.route} #{row.attempt} "
                f"{row.provider}/{row.model} {what}")
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
            + (f" (open until {row.open_until})" if row.open_until else ""))


def _default_ledger() -> str:
    with contextlib.suppress(ConfigError):
        return load_config(_config_path(None)).daemon.ledger
    return DaemonConfig().ledger


@cli.command("tail")
@click.argument("ledger", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing rows as they are appended.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON rows.")
@click.option("-n", "--lines", default=0, help="Only the last N rows (0 = all).")
def tail_cmd(ledger: str | None, follow: bool, as_json: bool, lines: int) -> None:
    """Print ledger rows (human-readable by default)."""
    path = ledger or _default_ledger()
    try:
        _tail(path, follow, as_json, lines)
    except FileNotFoundError:
        click.echo(f"failoverd: no ledger at {path}; pass its path or check daemon.ledger",
                   err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


def _decoded(line: bytes, decoder: msgspec.json.Decoder) -> tuple[bytes, LedgerRow] | None:
    line = line.strip()
    try:
        return line, decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None  # a torn or foreign line


def _print_row(line: bytes, row: LedgerRow, as_json: bool) -> None:
    click.echo(line.decode() if as_json else format_row(row))


def _tail(path: str, follow: bool, as_json: bool, last: int) -> None:
    decoder = msgspec.json.Decoder(LedgerRow)
    with open(path, "rb") as f:
        rows = [r for r in (_decoded(line, decoder) for line in f) if r is not None]
        for line, row in rows[-last:] if last else rows:
            _print_row(line, row, as_json)
        if not follow:
            return
        inode, partial = os.fstat(f.fileno()).st_ino, b""
        while True:
            chunk = f.read()
            if chunk:
                *complete, partial = (partial + chunk).split(b"\n")
                for decoded in (_decoded(line, decoder) for line in complete):
                    if decoded is not None:
                        _print_row(*decoded, as_json)
                continue
            time.sleep(0.25)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                if st.st_ino != inode or st.st_size < f.tell():  # rotated or truncated
                    f.close()
                    f = open(path, "rb")  # noqa: SIM115 -- kept open across iterations
                    inode, partial = st.st_ino, b""


# Outcomes that mean the upstream hung (no meaningful output in time).
HANG_OUTCOMES = frozenset({"first_token_timeout", "stall_timeout"})
# Outcomes that are no fault of the slot: a failover from them is not counted.
NOT_FAILOVERS = frozenset({"ok", "skipped", "bad_request", "client_disconnected", "shutdown"})


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an unsorted list; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def audit(rows: Iterable[LedgerRow], cliff_s: float, since_epoch: float | None = None
          ) -> list[dict[str, Any]]:
    """Per model: volume, success, latency and TTFT percentiles, hangs, failovers, cost,
    and the margin between the slowest request it served and the client's cliff."""
    stats: dict[str, dict[str, Any]] = {}
    served_worst: dict[str, float] = {}
    for row in rows:
        if since_epoch is not None and _dt.datetime.fromisoformat(row.ts).timestamp() < since_epoch:
            continue
        if isinstance(row, RequestRow) and row.served_by:
            served_worst[row.served_by] = max(served_worst.get(row.served_by, 0.0), row.total_ms)
        if not isinstance(row, AttemptRow) or row.outcome == "skipped":
            continue
        s = stats.setdefault(f"{row.provider}/{row.model}", {
            "n": 0, "ok": 0, "latency": [], "ttft": [], "hangs": 0, "failovers": 0, "cost": 0.0})
        s["n"] += 1
        s["ok"] += row.outcome == "ok"
        s["hangs"] += row.outcome in HANG_OUTCOMES
        s["failovers"] += row.outcome not in NOT_FAILOVERS and not row.committed
        s["cost"] += row.cost_usd or 0.0
        if row.outcome == "ok" and row.latency_ms is not None:
            s["latency"].append(row.latency_ms)
        if row.ttft_ms is not None:
            s["ttft"].append(row.ttft_ms)
    table = []
    for model, s in sorted(stats.items()):
        worst = served_worst.get(model)
        table.append({
            "model": model, "n": s["n"], "success_pct": round(100 * s["ok"] / s["n"], 1),
            **{f"latency_{name}_ms": percentile(s["latency"], p) for name, p in
               (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            **{f"ttft_{name}_ms": percentile(s["ttft"], p) for name, p in
               (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "hangs": s["hangs"], "failovers": s["failovers"], "cost_usd": round(s["cost"], 6),
            "cliff_margin_s": None if worst is None else round(cliff_s - worst / 1000, 3),
        })
    return table


def format_audit(table: list[dict[str, Any]]) -> list[str]:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v / 1000:.2f}" if v >= 1000 else f"{v / 1000:.3f}"

    head = (f"{'model':<36} {'n':>6} {'ok%':>6}  {'latency s p50/p90/p99/max':<27} "
            f"{'ttft s p50/p90/p99/max':<27} {'hangs':>5} {'failover':>8} {'cost $':>10} "
            f"{'cliff margin':>12}")
    lines = [head]
    for r in table:
        lat = "/".join(ms(r[f"latency_{p}_ms"]) for p in ("p50", "p90", "p99", "max"))
        ttft = "/".join(ms(r[f"ttft_{p}_ms"]) for p in ("p50", "p90", "p99", "max"))
        margin = "-" if r["cliff_margin_s"] is None else f"{r['cliff_margin_s']:.1f} s"
        lines.append(f"{r['model']:<36} {r['n']:>6} {r['success_pct']:>6.1f}  {lat:<27} "
                     f"{ttft:<27} {r['hangs']:>5} {r['failovers']:>8} {r['cost_usd']:>10.4f} "
                     f"{margin:>12}")
    return lines


def format_status(status: dict[str, Any]) -> list[str]:
    """`failoverd status` as text: in-flight requests, breakers, token divisors."""
    lines = [f"failoverd {status['version']}, up {status['uptime_s']:.0f} s"
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
    inflight = status.get("in_flight") or []
    lines.append(f"in flight: {len(inflight)}")
    for r in inflight:
        lines.append(f"  {r['request_id']} {r['route']:<12} on {r['slot'] or '-':<32} "
                     f"attempts={r['attempts']} age={r['age_s']:.1f}s"
                     + (" committed" if r["committed"] else ""))
    breakers = status.get("breakers") or []
    lines.append(f"breakers: {len(breakers)}")
    for b in breakers:
        line = (f"  {b['scope']:<10} {b['key']:<36} {b['state']:<9} "
                f"failures {b['failures_in_window']}/{b['calls_in_window']} in window")
        if b.get("open_until"):
            line += f", open until {b['open_until']}"
        if b.get("last_reason"):
            line += f" -- {b['last_reason']}"
        lines.append(line)
    divisors = status.get("token_divisors") or {}
    if divisors:
        lines.append("token divisors (chars per prompt token):")
        lines += [f"  {k:<40} {v:.2f}" for k, v in sorted(divisors.items())]
    return lines


@cli.command("status")
@click.option("--socket", "socket_path", help="Daemon socket [default: daemon.socket from the "
              "config]")
@click.option("--config", "config_path", help="Config file to find the socket in.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status_cmd(socket_path: str | None, config_path: str | None, as_json: bool) -> None:
    """Ask a running daemon for its breakers, in-flight requests and token divisors."""
    if socket_path is None:
        try:
            socket_path = load_config(_config_path(config_path)).daemon.socket
        except ConfigError:
            socket_path = DaemonConfig().socket
    transport = httpx.HTTPTransport(uds=socket_path)
    try:
        with httpx.Client(transport=transport, base_url="http://failoverd", timeout=5) as c:
            resp = c.get("/status")
    except httpx.HTTPError as e:
        click.echo(f"failoverd: cannot reach the daemon at {socket_path} ({e}); is it running? "
                   "(systemctl status failoverd)", err=True)
        sys.exit(1)
    if as_json:
        click.echo(resp.text)
        return
    for line in format_status(resp.json()):
        click.echo(line)


@cli.command("audit")
@click.argument("ledger", required=False)
@click.option("--since", help="Only rows newer than this: 90s, 30m, 6h, 2d.")
@click.option("--config", "config_path", help="Config for the ledger path and client_cliff_s.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def audit_cmd(ledger: str | None, since: str | None, config_path: str | None,
              as_json: bool) -> None:
    """Per-model table: n, success %, latency and TTFT p50/p90/p99/max, hangs, failovers,
    cost, and the margin to the client's cancel cliff."""
    try:
        cfg = load_config(_config_path(config_path))
    except ConfigError:
        cfg = Config()
    path = ledger or cfg.daemon.ledger
    since_epoch = None
    if since is not None:
        seconds = parse_duration(since)
        if seconds is None:
            click.echo(f"failoverd: --since {since!r}: expected a duration like 30m, 6h or 2d",
                       err=True)
            sys.exit(2)
        since_epoch = time.time() - seconds
    try:
        table = audit((row for _, row in read_ledger(path) if row is not None),
                      cfg.daemon.client_cliff_s, since_epoch)
    except FileNotFoundError:
        click.echo(f"failoverd: no ledger at {path}; pass its path or check daemon.ledger",
                   err=True)
        sys.exit(1)
    if as_json:
        click.echo(msgspec.json.encode(table).decode())
        return
    for line in format_audit(table):
        click.echo(line)


@cli.command("demo")
def demo_cmd() -> None:
    """Watch failover on simulated upstreams (no network, no keys, ~10 s)."""
    sys.exit(trio.run(run_demo))


if __name__ == "__main__":
    cli()
