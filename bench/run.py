"""failoverd benchmark: `python bench/run.py [--quick] [--markdown bench/RESULTS.md]`.

Starts a fake OpenAI-compatible upstream (bench/upstream.py, pinned to core 1), the
daemon (`taskset -c 0 failoverd serve`, a temporary config) and drives both from this
process (pinned to core 1) with a lean asyncio load generator (bench/loadgen.py). Every
figure is measured in rounds, with its baseline (the same request straight to the fake
upstream) in the same round, and the median over rounds is reported. One table at the
end. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadgen as lg  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
# The interpreter this script runs under (in the venv failoverd is installed in), and
# the `failoverd` script next to it, or `python -m failoverd` where there is none.
PYTHON = sys.executable
_SCRIPT = os.path.join(os.path.dirname(PYTHON), "failoverd")
FAILOVERD = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [PYTHON, "-m", "failoverd"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
MS = 1_000_000  # ns per ms
FIRST_TOKEN_S = 2.0


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------


@dataclass
class Params:
    rounds: int = 3  # rounds for the cheap figures
    heavy_rounds: int = 3  # rounds for throughput, memory, recovery
    startups: int = 5
    warmup: int = 300
    cpu_requests: int = 1000  # non-streaming requests per CPU round
    cpu_concurrency: int = 8
    big_requests: int = 8  # per round with a 1 MB prompt; half as many with 10 MB
    chunk_streams: int = 100
    chunk_count: int = 100
    chunk_base: int = 10  # the same burst with fewer deltas; the difference is per chunk
    pace_ms: int = 20
    c1_pairs: int = 300  # per round: daemon and direct, streaming and not
    session_block_s: float = 2.0  # c=64: per round, per target
    session_chunks: int = 25
    sessions: int = 64
    gap_streams: int = 300  # also the step of the search for the most streams carried
    gap_max: int = 1500
    gap_chunks: int = 75
    rates: tuple[int, ...] = (200, 400, 600, 800, 1000, 1200)
    step_s: float = 1.5
    p99_limit_ms: float = 50.0
    overload_s: float = 2.0
    ceiling_s: float = 1.0
    mem_streams: int = 1000
    mem_hold_s: float = 1.5
    recover_singles: int = 3
    recover_streams: int = 500


QUICK = Params(
    rounds=2, heavy_rounds=2, startups=3, warmup=100, cpu_requests=300, big_requests=4,
    chunk_streams=50,
    chunk_count=40, chunk_base=5, c1_pairs=60, session_block_s=0.8, session_chunks=15,
    gap_chunks=30, rates=(300, 600, 900), step_s=0.8, overload_s=1.0, ceiling_s=0.5,
    mem_hold_s=0.5, recover_singles=1, gap_max=600,
)

# failoverd's upstream pools (keepalive_expiry = 5.0) close idle connections after 5 s,
# on the next request. A phase that leaves many idle connections makes the next phase pay
# for them (httpcore's pool bookkeeping grows with the number of connections), so the
# phases that follow one are preceded by this pause and one request.
SETTLE_S = 5.5


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def median(values: Iterable[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return statistics.median(v) if v else math.nan


def spread(values: Iterable[float], fmt: Callable[[float], str]) -> str:
    v = [x for x in values if not math.isnan(x)]
    if len(v) < 2:
        return ""
    return f"{fmt(min(v))} .. {fmt(max(v))}"


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
    """CPU time of a process (all threads), in seconds, to the nanosecond: the kernel's
    per-process CPU clock (clockid ~pid << 3 | CPUCLOCK_SCHED). /proc/PID/stat counts
    in 10 ms ticks, which blurred the per-chunk figure by up to ~4 us (it is built from
    four readings); it stays the fallback, and the user/kernel split comes from it."""
    try:
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        return sum(proc_cpu_split(pid))


def core_busy_s(core: int) -> tuple[float, float]:
    """(busy, steal) seconds of one CPU since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                # user nice system idle iowait irq softirq steal ...
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK, v[7] / CLK_TCK
    return math.nan, math.nan


def machine_busy(seconds: float = 1.0) -> float:
    """How many cores' worth of CPU the machine used over `seconds` (before we start)."""
    cores = range(os.cpu_count() or 1)
    b0 = sum(core_busy_s(c)[0] for c in cores)
    time.sleep(seconds)
    return (sum(core_busy_s(c)[0] for c in cores) - b0) / seconds


def wait_quiet(max_s: float) -> float:
    """Wait up to max_s for a second in which other processes use < 0.15 core."""
    busy = machine_busy()
    for _ in range(int(max_s)):
        if busy < 0.15:
            break
        log(f"machine busy ({busy:.2f} cores in use by other processes); waiting")
        busy = machine_busy()
    return busy


CALIBRATE = ("import time\nt = time.perf_counter()\nx = 0\nfor i in range(1_000_000):\n"
             "    x += i & 7\nprint(time.perf_counter() - t)")


def calibrate() -> float:
    """Milliseconds a fixed pure-Python loop takes on core 0: the machine's speed now."""
    try:
        out = subprocess.run(pinned(0, [PYTHON, "-c", CALIBRATE]), capture_output=True,
                             text=True, timeout=30, check=True).stdout
        return float(out) * 1e3
    except (OSError, ValueError, subprocess.SubprocessError):
        return math.nan


def proc_status_mb(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


def file_size(path: str) -> int:
    return os.path.getsize(path)


def ledger_rows(path: str, offset: int) -> list[dict]:
    """The ledger rows written after byte `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# Processes: the fake upstream and the daemon
# ---------------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []
# The daemon imports failoverd.py from a copy taken when the run starts (PYTHONPATH comes
# before the editable install), so one run measures one version of a file being edited.
DAEMON_ENV: dict[str, str] | None = None


def snapshot_daemon(tmp: str, source: str) -> str:
    """Copy `source` aside as failoverd.py, compile it, point the daemon at it."""
    global DAEMON_ENV
    snap = os.path.join(tmp, "snapshot")
    os.makedirs(snap)
    shutil.copyfile(source, os.path.join(snap, "failoverd.py"))
    subprocess.run([PYTHON, "-m", "py_compile", os.path.join(snap, "failoverd.py")], check=True,
                   timeout=60)
    env = dict(os.environ)
    env["PYTHONPATH"] = snap + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    where = subprocess.run([PYTHON, "-c", "import failoverd; print(failoverd.__file__)"],
                           env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
    if where.stdout.strip() != os.path.join(snap, "failoverd.py"):
        # Measuring another file than the one named (an A/B with --daemon-file) would
        # be silently wrong: stop instead.
        raise BenchError(f"the daemon would not import the snapshot of {source} (it imports "
                         f"{where.stdout.strip() or where.stderr.strip()}); check PYTHONPATH")
    DAEMON_ENV = env
    with open(os.path.join(snap, "failoverd.py"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return f"{source}, copied at start, sha256 {digest}"


def _kill(p: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait(5)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def pinned(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if PINNING else argv


class Upstream:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(pinned(1, [PYTHON, os.path.join(BENCH, "upstream.py")]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=_die_with_parent)
        _children.append(self.proc)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            raise BenchError("the fake upstream did not start (no port on its stdout)")
        self.port = int(line)


def write_config(tmp: str, port: int, p: Params) -> str:
    up = f"http://127.0.0.1:{port}/v1"
    lines = [
        "[daemon]",
        f'socket = "{tmp}/fo.sock"',
        f'ledger = "{tmp}/ledger.jsonl"',
        "shutdown_grace_s = 1",
        "",
        "[providers.up]",
        f'base_url = "{up}"',
    ]
    routes = {
        "fast": "bench-fast-4",
        "paced": f"bench-paced-{p.chunk_count}-{p.pace_ms}",
        "paced_base": f"bench-paced-{p.chunk_base}-{p.pace_ms}",
        "session": f"bench-paced-{p.session_chunks}-{p.pace_ms}",
        "gap": f"bench-paced-{p.gap_chunks}-{p.pace_ms}",
        "trickle": "bench-trickle-600-1000",
    }
    for name, model in routes.items():
        lines += ["", f"[routes.{name}]", f'chain = ["up/{model}"]']
    # A fresh hung provider per recovery round, so no breaker carries over between rounds.
    hung = [f"s{i}" for i in range(p.recover_singles)] + [f"c{i}" for i in range(p.heavy_rounds)]
    for tag in hung:
        lines += ["", f"[providers.hung_{tag}]", f'base_url = "{up}"',
                  "", f"[routes.recover_{tag}]",
                  f'chain = ["hung_{tag}/bench-hung", "up/bench-fast-4"]',
                  f"first_token_timeout_s = {FIRST_TOKEN_S:g}"]
    path = os.path.join(tmp, "failoverd.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Daemon:
    """One `failoverd serve` process with its own socket path."""

    def __init__(self, config: str, tmp: str, tag: str) -> None:
        self.tmp = tmp
        self.socket = os.path.join(tmp, f"fo-{tag}.sock")
        self.config = os.path.join(tmp, f"failoverd-{tag}.toml")
        with open(config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(text.replace(f'socket = "{tmp}/fo.sock"', f'socket = "{self.socket}"'))
        self.log_path = os.path.join(tmp, f"daemon-{tag}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = DAEMON_ENV

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def start(self, timeout_s: float = 20.0) -> float:
        """Spawn; poll connect + GET /healthz; return spawn-to-200 seconds."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        logf = open(self.log_path, "wb")  # noqa: SIM115 (the child holds it)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            pinned(0, [*FAILOVERD, "serve", "--config", self.config, "--quiet"]),
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, preexec_fn=_die_with_parent,
            cwd=self.tmp, env=self.env)
        logf.close()
        _children.append(self.proc)
        deadline = t0 + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"failoverd exited with status {self.proc.returncode} during "
                                 f"start-up; its stderr:\n{self.stderr_text()}")
            if _healthz(self.socket):
                return time.perf_counter() - t0
            time.sleep(0.002)
        self.stop()
        raise BenchError(f"failoverd did not answer GET /healthz within {timeout_s:g} s; its "
                         f"stderr:\n{self.stderr_text()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            code = self.proc.returncode if self.proc else None
            raise BenchError(f"failoverd died (status {code}); its stderr:\n{self.stderr_text()}")

    def cpu(self) -> float:
        return proc_cpu_s(self.pid)

    def rss_mb(self) -> float:
        return proc_status_mb(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc)

    def target(self) -> lg.Target:
        return lg.Target("failoverd", unix=self.socket)


def _healthz(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        s.sendall(lg.get("/healthz"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return False
            data += chunk
        return data[9:12] == b"200"
    except OSError:
        return False
    finally:
        s.close()


class Relay:
    """A reference relay from relays.py (raw or naive httpx2), pinned where the daemon is."""

    def __init__(self, mode: str, port: int, tmp: str) -> None:
        self.mode = mode
        self.socket = os.path.join(tmp, f"relay-{mode}.sock")
        self.proc = subprocess.Popen(
            pinned(0, [PYTHON, os.path.join(BENCH, "relays.py"), mode, str(port), self.socket]),
            preexec_fn=_die_with_parent)
        _children.append(self.proc)
        for _ in range(500):
            if os.path.exists(self.socket):
                return
            time.sleep(0.01)
        raise BenchError(f"the {mode} relay did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return proc_cpu_s(self.pid)

    def target(self) -> lg.Target:
        return lg.Target(f"relay-{self.mode}", unix=self.socket)

    def stop(self) -> None:
        _kill(self.proc)


class HostileUpstream:
    """An upstream that answers every request 200 application/json with a body of
    HOSTILE_BODY bytes, made up as it goes, once `concurrent` requests are in (so that
    many attempts meet their bodies at once). It counts what each connection took."""

    def __init__(self, concurrent: int) -> None:
        self.concurrent = concurrent
        self.server: asyncio.Server | None = None
        self.reset()

    def reset(self) -> None:
        self.waiting = 0
        self.all_in = asyncio.Event()
        self.sent: list[int] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            self.waiting += 1
            if self.waiting >= self.concurrent:
                self.all_in.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_in.wait(), 10)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         b"%d\r\n\r\n{\"choices\":[{\"message\":{\"content\":\"" % HOSTILE_BODY)
            filler = b"x" * (256 * 1024)
            while sent < HOSTILE_BODY:
                writer.write(filler)
                await writer.drain()
                sent += len(filler)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the daemon hung up: what it would not read
        finally:
            self.sent.append(sent)
            writer.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


# The hostile upstream's body: as big as the fault run sent.
HOSTILE_BODY = 2 * 1024**3


def write_hostile_config(tmp: str, port: int, up_port: int) -> str:
    """Route `hostile`: the hostile upstream, then the fake upstream; `fast` for warm-up."""
    path = os.path.join(tmp, "failoverd-hostile-base.toml")
    with open(path, "w") as f:
        f.write("\n".join([
            "[daemon]", f'socket = "{tmp}/fo.sock"', f'ledger = "{tmp}/ledger-hostile.jsonl"',
            "shutdown_grace_s = 1", "shed_lag_s = 0", "state_file = \"\"", "",
            "[providers.evil]", f'base_url = "http://127.0.0.1:{port}/v1"', "",
            "[providers.up]", f'base_url = "http://127.0.0.1:{up_port}/v1"', "",
            "[routes.hostile]", 'chain = ["evil/bench-huge", "up/bench-fast-4"]', "",
            "[routes.fast]", 'chain = ["up/bench-fast-4"]', ""]))
    return path


async def quiesce(d: Daemon | Relay, max_s: float = 10.0) -> None:
    """Wait until the daemon uses (almost) no CPU: at most one clock tick per 100 ms."""
    last = d.cpu()
    for _ in range(int(max_s * 10)):
        await asyncio.sleep(0.1)
        now = d.cpu()
        if now - last <= 1.0 / CLK_TCK:
            return
        last = now


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    spread: str = ""
    target: str = ""
    status: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, value: str, *, baseline: str = "", ratio: str = "",
            spread: str = "", target: str = "", ok: bool | None = None) -> None:
        status = "" if ok is None else ("PASS" if ok else "MISS")
        self.rows.append(Row(figure, value, baseline, ratio, spread, target, status))

    def failed(self, figure: str, why: str) -> None:
        self.rows.append(Row(figure, "error", spread=why[:60], status="MISS"))

    def render(self) -> str:
        head = Row("figure", "failoverd", "direct / baseline", "ratio", "rounds min .. max",
                   "target", "result")
        rows = [head, *self.rows]
        cols = list(Row.__dataclass_fields__)
        widths = {c: max(len(getattr(r, c)) for r in rows) for c in cols}
        out = []
        for i, r in enumerate(rows):
            out.append("  ".join(getattr(r, c).ljust(widths[c]) for c in cols).rstrip())
            if i == 0:
                out.append("  ".join("-" * widths[c] for c in cols))
        return "\n".join(out + [""] + [f"note: {n}" for n in self.notes])


def ms(ns: float) -> str:
    return "n/a" if math.isnan(ns) else f"{ns / MS:.2f} ms"


def fmt_ms(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f} ms"


def fmt_us(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.1f} us"


def ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}x"


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------

# Run by Bench.observer_cost with the daemon's failoverd.py: the cost of the metrics
# observer per request, as the time to write a request's rows with it minus without.
OBSERVE_COST = """
import time, failoverd as fo
cfg = fo.Config(daemon=fo.DaemonConfig(ledger=""), routes={"r": fo.RouteConfig(chain=["a/m"])},
                providers={"a": fo.ProviderConfig(base_url="http://127.0.0.1:9/v1")})
d = fo.Daemon(cfg, ledger=fo.Ledger(None))
rows = [fo.AttemptRow(ts="2026-01-02T03:04:05.678Z", request_id="0123456789abcdef", route="r",
                      attempt=0, provider="a", model="m", outcome="ok", status=200,
                      ttft_ms=812.4, latency_ms=3857.1, cost_usd=0.0008,
                      first_token_deadline_s=30.0, stall_deadline_s=60.0),
        fo.RequestRow(ts="2026-01-02T03:04:05.678Z", request_id="0123456789abcdef", route="r",
                      outcome="ok", served_by="a/m", attempts=1, total_ms=3860.0,
                      ttft_ms=812.4, status=200)]
def best(n=20000):
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            for row in rows:
                d.ledger.write(row)
        times.append((time.perf_counter() - t) / n)
    return min(times)
observers = list(d.ledger.observers)
with_ = best()
d.ledger.observers[:] = []
without = best()
print((with_ - without) * 1e6 if observers else float("nan"))
"""


class Bench:
    def __init__(self, p: Params, tmp: str, up: Upstream, config: str) -> None:
        self.p = p
        self.tmp = tmp
        self.up = up
        self.config = config
        self.report = Report()
        self.direct = lg.Target("direct", port=up.port)
        self.d: Daemon | None = None
        self.dt: lg.Target | None = None
        self.idle_rss: list[float] = []
        self.speed: list[float] = [calibrate()]
        self.relays_cpu = 0.0  # CPU of the reference relays, pinned to the daemon's core
        self.big_shed = 0  # large-prompt requests refused by the shedder, then retried

    def main(self) -> tuple[Daemon, lg.Target]:
        assert self.d is not None
        assert self.dt is not None
        return self.d, self.dt

    def via(self, route: str, model: str, *, stream: bool) -> tuple[bytes, bytes]:
        """The request to failoverd (a route name) and the same one straight to the
        upstream (the model the route maps to)."""
        return lg.chat(route, stream=stream), lg.chat(model, stream=stream)

    def note(self, text: str) -> None:
        self.report.notes.append(text)
        log(f"  note: {text}")

    async def phase(self, name: str, fn: Callable[[], Awaitable[None]],
                    figures: list[str]) -> None:
        log(f"phase: {name}")
        t0 = time.perf_counter()
        busy0, steal0 = core_busy_s(0)
        daemon0 = self.d.cpu() if self.d is not None else 0.0
        relays0 = self.relays_cpu
        try:
            await fn()
        except BenchError:
            raise
        except Exception as e:  # a broken phase must not hide the other figures
            traceback.print_exc()
            for f in figures:
                self.report.failed(f, f"{type(e).__name__}: {e}")
        if self.d is not None:
            self.d.check()
        took = time.perf_counter() - t0
        if self.d is not None and PINNING:
            busy1, steal1 = core_busy_s(0)
            ours = self.d.cpu() - daemon0 + self.relays_cpu - relays0
            other = (busy1 - busy0 - ours) / took
            steal = (steal1 - steal0) / took
            if other > 0.05 or steal > 0.02:
                self.note(f"{name}: core 0 was {other:.0%} busy with other work (other "
                          "processes, interrupts, the kernel's share of loopback I/O)"
                          + (f", {steal:.0%} stolen by the hypervisor" if steal > 0.02 else ""))
        self.speed.append(calibrate())
        log(f"phase: {name} done in {took:.1f} s")

    async def settle(self) -> None:
        """Let failoverd's idle upstream connections expire, then reap them."""
        d, dt = self.main()
        await asyncio.sleep(SETTLE_S)
        conn = await dt.connect()
        await asyncio.wait_for(conn.fetch(lg.chat("fast", stream=False)), 30)
        conn.close()
        await quiesce(d)

    # -- 6. start-up (and idle memory) --------------------------------------------------

    async def startup(self) -> None:
        times = []
        for i in range(self.p.startups):
            d = Daemon(self.config, self.tmp, f"start{i}")
            try:
                times.append(d.start())
                await asyncio.sleep(0.3)
                self.idle_rss.append(d.rss_mb())
            finally:
                d.stop()
        t = median(times)
        self.report.add("6. start-up: spawn -> GET /healthz 200", f"{t:.3f} s",
                        spread=spread(times, lambda v: f"{v:.3f}"), target="<= 0.5 s",
                        ok=t <= 0.5)

    # -- sanity and warm-up ------------------------------------------------------------

    async def sanity(self) -> None:
        _, dt = self.main()
        conn = await dt.connect()
        direct = await self.direct.connect()
        p = self.p
        # failoverd relays role, content..., finish and [DONE] (no usage chunk: the client
        # did not ask for it); the upstream also sends the usage chunk.
        checks = [
            (conn, lg.chat("fast", stream=False), 0),
            (conn, lg.chat("fast", stream=True), 7),
            (conn, lg.chat("paced_base", stream=True), p.chunk_base + 3),
            (direct, lg.chat("bench-fast-4", stream=False), 0),
            (direct, lg.chat("bench-fast-4", stream=True), 8),
        ]
        for c, req, events in checks:
            res = await asyncio.wait_for(c.fetch(req, keep_body=True), 30)
            if not res.ok or (events and res.events != events):
                raise BenchError(f"sanity check failed: {req[-120:]!r} -> status {res.status}"
                                 f" {res.error}, {res.events} SSE events (expected {events}):"
                                 f" {res.body[:300]!r}")
        conn.close()
        direct.close()
        # Warm-up: imports, pools and caches on both sides.
        for t, model in ((dt, "fast"), (self.direct, "bench-fast-4")):
            for stream in (False, True):
                res = await lg.closed_loop(t, lg.chat(model, stream=stream), concurrency=8,
                                           total=p.warmup)
                bad = [r for r in res if not r.ok]
                if bad:
                    raise BenchError(f"warm-up: {len(bad)} of {len(res)} requests to "
                                     f"{t.name} failed, e.g. {bad[0].status} {bad[0].error}")

    # -- 1. CPU per request and per chunk -----------------------------------------------

    async def cpu_requests(self) -> None:
        d, dt = self.main()
        p = self.p
        per_req, rps = [], []
        for _ in range(p.rounds):
            await quiesce(d)
            c0, t0 = d.cpu(), time.perf_counter()
            res = await lg.closed_loop(dt, lg.chat("fast", stream=False),
                                       concurrency=p.cpu_concurrency, total=p.cpu_requests)
            c1, t1 = d.cpu(), time.perf_counter()
            ok = sum(r.ok for r in res)
            if ok < len(res):
                self.note(f"CPU round: {len(res) - ok} of {len(res)} requests failed")
            per_req.append((c1 - c0) / max(1, ok) * 1e3)
            rps.append(ok / (t1 - t0))
        v = median(per_req)
        self.report.add(f"1. CPU / non-streaming request (closed loop c={p.cpu_concurrency})",
                        fmt_ms(v), baseline=f"{median(rps):.0f} req/s at 1 core",
                        spread=spread(per_req, lambda x: f"{x:.2f}"), target="<= 0.5 ms",
                        ok=v <= 0.5)
        await self._big_bodies()

    async def _until_served(self, conn: lg.Conn, req: bytes) -> None:
        """One request; a 503 from the shedder is retried after 1 s, as SDKs do (its
        CPU, ~0.1 ms, stays in the figure)."""
        for _ in range(5):
            res = await asyncio.wait_for(conn.fetch(req), 60)
            if res.ok:
                return
            if res.status != 503:
                break
            self.big_shed += 1
            await asyncio.sleep(1.0)
        raise BenchError(f"a {len(req)}-byte request failed: {res.status} {res.error}")

    async def _big_bodies(self) -> None:
        """CPU per non-streaming request with a 1 MB and a 10 MB prompt, one connection,
        alternating sizes per round: the cost should grow with the body, no faster."""
        d, dt = self.main()
        p = self.p
        sizes = (1_000_000, 10_000_000)
        reqs = {n: lg.post({"model": "fast", "stream": False,
                            "messages": [{"role": "user", "content": "x" * n}]}) for n in sizes}
        per: dict[int, list[float]] = {n: [] for n in sizes}
        conn = await dt.connect()
        for r in range(p.rounds):
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                await self._until_served(conn, reqs[n])  # the same path, warm
                await quiesce(d)
                c0 = d.cpu()
                count = p.big_requests if n < 5e6 else max(1, p.big_requests // 2)
                for _ in range(count):
                    await self._until_served(conn, reqs[n])
                per[n].append((d.cpu() - c0) / count * 1e3)
        conn.close()
        if self.big_shed:
            self.note(f"big prompts: {self.big_shed} request(s) refused by the shedder (the "
                      "loop ran late after a large body) and retried after 1 s")
        small, big = median(per[sizes[0]]), median(per[sizes[1]])
        self.report.add("1. CPU / request, 10 MB prompt vs 1 MB (non-streaming)",
                        fmt_ms(big), baseline=f"1 MB: {fmt_ms(small)}", ratio=ratio(big, small),
                        spread=spread([b / s for b, s in zip(per[sizes[1]], per[sizes[0]],
                                                              strict=True)],
                                      lambda x: f"{x:.1f}x"),
                        target="<= 10x", ok=big <= 10 * small)

    def observer_cost(self) -> float:
        """What the metrics observer adds to writing one request's rows (an attempt and a
        request row), timed in a process of its own on the daemon's core: microseconds."""
        out = subprocess.run(pinned(0, [PYTHON, "-c", OBSERVE_COST]), capture_output=True,
                             text=True, env=DAEMON_ENV, timeout=120, check=False)
        if out.returncode:
            raise BenchError(f"timing the metrics observer failed: {out.stderr[-2000:]}")
        return float(out.stdout.split()[-1])

    async def metrics_cost(self) -> None:
        """CPU per request with metrics (the main daemon) and without (a second daemon
        with FAILOVERD_METRICS=off, same config), alternating in each round; then what
        one GET /metrics costs the daemon after all that traffic."""
        d, dt = self.main()
        p = self.p
        off = Daemon(self.config, self.tmp, "nometrics")
        off.env = {**(DAEMON_ENV or os.environ), "FAILOVERD_METRICS": "off"}
        off.start()
        on_ms: list[float] = []
        off_ms: list[float] = []
        try:
            ot = off.target()
            await lg.closed_loop(ot, lg.chat("fast", stream=False), concurrency=8,
                                 total=p.warmup)
            for _ in range(p.rounds):
                for daemon, target, out in ((d, dt, on_ms), (off, ot, off_ms)):
                    await quiesce(daemon)
                    c0 = daemon.cpu()
                    res = await lg.closed_loop(target, lg.chat("fast", stream=False),
                                               concurrency=p.cpu_concurrency,
                                               total=p.cpu_requests)
                    out.append((daemon.cpu() - c0) / max(1, sum(r.ok for r in res)) * 1e3)
            conn = await dt.connect()
            await quiesce(d)
            c0, size = d.cpu(), 0
            for _ in range(20):
                res = await asyncio.wait_for(conn.fetch(lg.get("/metrics"), keep_body=True), 30)
                size = len(res.body)
            scrape_ms = (d.cpu() - c0) / 20 * 1e3
            conn.close()
        finally:
            self.relays_cpu += off.cpu() if off.alive() else 0.0  # not "other work" on core 0
            off.stop()
        diff = [a - b for a, b in zip(on_ms, off_ms, strict=True)]
        self.report.add("1. metrics: CPU / request, on - off", f"{median(diff) * 1e3:.0f} us",
                        baseline=f"{median(off_ms):.3f} ms/request with metrics off",
                        ratio=ratio(median(on_ms), median(off_ms)),
                        spread=spread([x * 1e3 for x in diff], lambda x: f"{x:.0f}"))
        observer = self.observer_cost()
        self.report.add("1. metrics: observer CPU / request (in-process)", f"{observer:.1f} us",
                        baseline="attempt row + request row, best of 5 x 20000",
                        ratio=f"{observer / 1e3 / median(off_ms):.1%} of a request")
        self.note(f"GET /metrics after the run: {size / 1024:.1f} KiB of text, "
                  f"{scrape_ms:.2f} ms of daemon CPU per scrape (mean of 20 in a row)")

    async def _paced_cpu(self, route: str, chunks: int, via: Relay | None = None
                         ) -> tuple[float, int, float]:
        """Daemon (or relay) CPU seconds for one burst of paced streams, how many
        completed, and the share of that CPU spent in the kernel."""
        d, dt = self.main()
        p = self.p
        if via is not None:  # a relay takes the upstream's model name itself
            d, dt = via, via.target()  # type: ignore[assignment]
            route = f"bench-paced-{chunks}-{p.pace_ms}"
        await quiesce(d)
        burst = lg.Burst(dt, lg.chat(route, stream=True), p.chunk_streams,
                         spread_s=p.pace_ms / 1000)
        await burst.connect()
        c0, (u0, s0) = proc_cpu_s(d.pid), proc_cpu_split(d.pid)
        await burst.send()
        res = await burst.wait(chunks * p.pace_ms / 1000 * 4 + 10)
        cpu, (u1, s1) = proc_cpu_s(d.pid) - c0, proc_cpu_split(d.pid)
        burst.close()
        ok = sum(r.ok for r in res)
        if ok < p.chunk_streams:
            self.note(f"CPU/chunk: only {ok}/{p.chunk_streams} {route} streams completed")
        ticks = (u1 - u0) + (s1 - s0)  # the kernel's share: only /proc/PID/stat splits it
        return cpu, ok, (s1 - s0) / ticks if ticks else 0.0

    async def cpu_chunks(self) -> None:
        """Two bursts that differ only in stream length: S streams x C deltas and S x B.
        Start-up, pool and teardown work is the same in both, so
        (CPU_C - CPU_B) / (S * (C - B)) is the marginal cost of one relayed chunk."""
        p = self.p
        net, gross, base, kernel = [], [], [], []
        c, b = p.chunk_count, p.chunk_base
        relays = [Relay(mode, self.up.port, self.tmp) for mode in ("raw", "httpx2")]
        ref: dict[str, list[float]] = {r.mode: [] for r in relays}
        try:
            await self._paced_cpu("paced_base", b)  # every measured burst finds the same pool
            for r in relays:
                await self._paced_cpu("", b, r)
            for _ in range(p.rounds):
                cpu_c, ok_c, sys_c = await self._paced_cpu("paced", c)
                cpu_b, ok_b, _ = await self._paced_cpu("paced_base", b)
                kernel.append(sys_c * 100)
                if ok_c and ok_b:
                    per_chunk = (cpu_c / ok_c - cpu_b / ok_b) / (c - b)
                    net.append(per_chunk * 1e6)
                    gross.append(cpu_c / (ok_c * c) * 1e6)
                    base.append((cpu_c / ok_c - c * per_chunk) * 1e3)
                for r in relays:  # the same two bursts through each reference relay
                    rc, rok_c, _ = await self._paced_cpu("", c, r)
                    rb, rok_b, _ = await self._paced_cpu("", b, r)
                    if rok_c and rok_b:
                        ref[r.mode].append((rc / rok_c - rb / rok_b) / (c - b) * 1e6)
        finally:
            for r in relays:
                self.relays_cpu += r.cpu()
                r.stop()
        v = median(net)
        self.report.add(f"1. CPU / relayed chunk, marginal ({p.chunk_streams} streams x "
                        f"{c} vs {b} @ {p.pace_ms} ms)", fmt_us(v),
                        baseline=f"gross {fmt_us(median(gross))}, "
                                 f"{median(kernel):.0f}% of it in the kernel",
                        spread=spread(net, lambda x: f"{x:.1f}"), target="<= 35 us", ok=v <= 35)
        v = median(base)
        self.report.add("   CPU / stream, per-stream part of that burst (intercept)", fmt_ms(v),
                        spread=spread(base, lambda x: f"{x:.2f}"))
        for mode, label in (("httpx2", "naive trio + httpx2 relay (aiter_raw, no parsing)"),
                            ("raw", "bare trio relay, no HTTP parsing (the floor)")):
            r = median(ref[mode])
            floor = mode == "raw"  # failoverd at most 2.5x the bare relay, same rounds
            self.report.add(f"   same bursts, {label}", fmt_us(r),
                            baseline=f"failoverd {fmt_us(median(net))}",
                            ratio=ratio(median(net), r),
                            spread=spread(ref[mode], lambda x: f"{x:.1f}"),
                            target="failoverd <= 2.5x" if floor else "",
                            ok=median(net) <= 2.5 * r if floor else None)

    # -- 2. added latency ---------------------------------------------------------------

    def _added(self, label: str, rounds: list[tuple[float, float, float, float]], *,
               p99_target: float | None) -> None:
        """Rows for (daemon p50, direct p50, daemon p99, direct p99) per round."""
        for i, q, target in ((0, "p50", 1.0), (2, "p99", p99_target)):
            added = [(r[i] - r[i + 1]) / MS for r in rounds]
            dv = median(r[i] for r in rounds)
            uv = median(r[i + 1] for r in rounds)
            v = median(added)
            self.report.add(f"{label} {q}", fmt_ms(v),
                            baseline=f"{ms(dv)} vs {ms(uv)}", ratio=ratio(dv, uv),
                            spread=spread(added, lambda x: f"{x:.2f}"),
                            target="" if target is None else f"<= {target:g} ms",
                            ok=None if target is None else v <= target)

    async def latency_c1(self) -> None:
        _, dt = self.main()
        p = self.p
        out: dict[str, list[tuple[float, float, float, float]]] = {"stream": [], "plain": []}
        for _ in range(p.rounds):
            dconn, uconn = await dt.connect(), await self.direct.connect()
            samples: dict[tuple[str, str], list[int]] = {}
            plan = []
            for stream, kind in ((True, "stream"), (False, "plain")):
                dreq, ureq = self.via("fast", "bench-fast-4", stream=stream)
                plan += [(kind, "d", dconn, dreq), (kind, "u", uconn, ureq)]
            for i in range(p.c1_pairs):
                for kind, side, conn, req in (plan if i % 2 == 0 else plan[::-1]):
                    res = await asyncio.wait_for(conn.fetch(req), 30)
                    if res.ok:
                        samples.setdefault((kind, side), []).append(res.ttfb_ns)
            dconn.close()
            uconn.close()
            for kind in out:
                d, u = samples.get((kind, "d"), []), samples.get((kind, "u"), [])
                out[kind].append((pct(d, .5), pct(u, .5), pct(d, .99), pct(u, .99)))
        self._added("2. added TTFB c=1 streaming", out["stream"], p99_target=None)
        self._added("2. added TTFB c=1 non-streaming", out["plain"], p99_target=None)

    async def latency_c64(self) -> None:
        d, dt = self.main()
        p = self.p
        length_s = p.session_chunks * p.pace_ms / 1000
        dreq, ureq = self.via("session", f"bench-paced-{p.session_chunks}-{p.pace_ms}",
                              stream=True)
        rounds, inflight, cpu = [], [], []
        for r in range(p.rounds):
            got = {}
            order = [("d", dt, dreq), ("u", self.direct, ureq)]
            for side, target, req in (order if r % 2 == 0 else order[::-1]):
                t0, c0 = time.perf_counter(), d.cpu()
                res = await lg.closed_loop(
                    target, req, concurrency=p.sessions, duration_s=p.session_block_s,
                    stagger_s=length_s / p.sessions,
                    timeout_s=p.session_block_s + length_s * 4 + 10)
                took, c1 = time.perf_counter() - t0, d.cpu()
                good = [x.ttfb_ns for x in res if x.ok]
                if side == "d":
                    inflight.append(sum((x.t_end - x.t_send) for x in res if x.ok) / 1e9 / took)
                    cpu.append((c1 - c0) / took)
                if len(good) < len(res):
                    self.note(f"c={p.sessions} {target.name}: {len(res) - len(good)} of "
                              f"{len(res)} requests failed")
                got[side] = good
            rounds.append((pct(got["d"], .5), pct(got["u"], .5), pct(got["d"], .99),
                           pct(got["u"], .99)))
        self._added(f"2. added TTFB c={p.sessions} streaming", rounds, p99_target=5.0)
        self.note(f"c={p.sessions}: {p.sessions} closed-loop sessions of {p.session_chunks}-"
                  f"chunk streams paced {p.pace_ms} ms; through failoverd {median(inflight):.1f}"
                  f" streams in flight on average, daemon CPU {median(cpu):.0%} of a core")

    async def _gap_round(self, n: int, r: int) -> tuple[float, float, float]:
        """One round of n paced streams through the daemon and direct (alternating
        which goes first): (daemon p99, direct p99) of the gaps in ns, daemon CPU share."""
        d, dt = self.main()
        p = self.p
        dreq, ureq = self.via("gap", f"bench-paced-{p.gap_chunks}-{p.pace_ms}", stream=True)
        spread_s = min(0.6, n * 0.002)
        length_s = p.gap_chunks * p.pace_ms / 1000
        got: dict[str, list[int]] = {}
        cpu = math.nan
        order = [("d", dt, dreq), ("u", self.direct, ureq)]
        for side, target, req in (order if r % 2 == 0 else order[::-1]):
            burst = lg.Burst(target, req, n, spread_s=spread_s, keep_times=True)
            await burst.connect()
            t0, c0 = time.perf_counter(), d.cpu()
            await burst.send()
            res = await burst.wait(length_s * 4 + spread_s + 10)
            if side == "d":
                cpu = (d.cpu() - c0) / (time.perf_counter() - t0)
            burst.close()
            ok = [x for x in res if x.ok]
            if len(ok) < n:
                self.note(f"gap test {target.name}: {len(ok)}/{n} streams completed")
            # Only gaps after every stream has started: the ramp is not steady state.
            window = burst.t0 + int((spread_s + 0.1) * 1e9)
            gaps = []
            for x in ok:
                t = x.times or []
                gaps += [b - a for a, b in zip(t, t[1:], strict=False) if a >= window]
            got[side] = gaps
            await quiesce(d)
        return pct(got["d"], .99), pct(got["u"], .99), cpu

    def _gap_row(self, n: int, rounds: list[tuple[float, float, float]], target: float) -> float:
        p = self.p
        added = [(a - b) / MS for a, b, _ in rounds]
        v = median(added)
        dv, uv = median(r[0] for r in rounds), median(r[1] for r in rounds)
        self.report.add(f"2. added inter-chunk gap p99 ({n} streams @ {p.pace_ms} ms)",
                        fmt_ms(v), baseline=f"{ms(dv)} vs {ms(uv)}", ratio=ratio(dv, uv),
                        spread=spread(added, lambda x: f"{x:.2f}"), target=f"<= {target:g} ms",
                        ok=v <= target)
        self.note(f"gap test: daemon CPU {median(r[2] for r in rounds):.0%} of a core while "
                  f"{n} streams ran")
        return v

    async def gaps(self) -> None:
        p = self.p
        carried, n = 0, p.gap_streams
        for target in (2.0, 25.0):
            rounds = [await self._gap_round(n, r) for r in range(p.rounds)]
            v = self._gap_row(n, rounds, target)
            if v > 25.0 or math.isnan(v):
                break
            carried, n = n, n * 2
        # The largest count carried with added p99 <= 25 ms: past the two rows above,
        # more streams, one round each, until a step misses.
        searching = carried == 2 * p.gap_streams
        n = carried + p.gap_streams
        while searching and n <= p.gap_max:
            a, b, c = await self._gap_round(n, 0)
            v = (a - b) / MS
            self.note(f"gap search: {n} streams, added p99 {v:.2f} ms, daemon CPU {c:.0%}")
            searching = v <= 25.0
            if searching:
                carried, n = n, n + p.gap_streams
        self.report.add(f"2. paced streams carried, added gap p99 <= 25 ms (steps of "
                        f"{p.gap_streams} up to {p.gap_max})", f"{carried}",
                        target=">= 600", ok=carried >= 600)

    # -- 5. recovery ---------------------------------------------------------------------

    async def recovery(self) -> None:
        d, dt = self.main()
        p = self.p
        await self.settle()
        ttft = []
        for i in range(p.recover_singles):
            conn = await dt.connect()
            res = await asyncio.wait_for(conn.fetch(lg.chat(f"recover_s{i}", stream=True)), 30)
            conn.close()
            if res.ok:
                ttft.append(res.ttfb_ns / 1e9)
            else:
                self.note(f"recovery single {i}: status {res.status} {res.error}")
        v = median(ttft)
        self.report.add(f"5. failover TTFT, hung primary (first_token_timeout_s = "
                        f"{FIRST_TOKEN_S:g})", f"{v:.3f} s",
                        spread=spread(ttft, lambda x: f"{x:.3f}"),
                        target=f"{FIRST_TOKEN_S:g} s + <= 50 ms", ok=v <= FIRST_TOKEN_S + 0.05)
        ledger = os.path.join(self.tmp, "ledger.jsonl")
        late: dict[str, list[float]] = {"p50": [], "p99": [], "max": []}
        client: dict[str, list[float]] = {"p50": [], "p99": [], "max": []}
        served = []
        for r in range(p.heavy_rounds):
            if r:
                await self.settle()  # the same pool state in every round
            route = f"recover_c{r}"
            offset = file_size(ledger)
            burst = lg.Burst(dt, lg.chat(route, stream=True), p.recover_streams)
            await burst.connect()
            await burst.send()
            res = await burst.wait(FIRST_TOKEN_S * 3 + 20)
            burst.close()
            ok = [x for x in res if x.ok]
            served.append(len(ok) / p.recover_streams)
            if len(ok) < p.recover_streams:
                statuses = collections.Counter(
                    str(x.status) if x.status else x.error for x in res if not x.ok)
                self.note(f"recovery round {r}: {len(ok)}/{p.recover_streams} streams answered;"
                          f" failures: {dict(statuses.most_common(3))}")
                bad_heads = sum(1 for x in res if x.error.startswith("malformed response"))
                if bad_heads:
                    self.note(f"recovery round {r}: {bad_heads} replies were body bytes with "
                              "no response head before them")
            rows = ledger_rows(ledger, offset)
            lateness = [row["latency_ms"] - FIRST_TOKEN_S * 1000 for row in rows
                        if row.get("kind") == "attempt" and row.get("route") == route
                        and row.get("outcome") == "first_token_timeout"
                        and row.get("provider") == "hung_" + route.removeprefix("recover_")]
            if len(lateness) < p.recover_streams:
                self.note(f"recovery round {r}: the ledger has {len(lateness)} "
                          "first_token_timeout rows for the hung slot")
            seen = [x.ttfb_ns / MS - FIRST_TOKEN_S * 1000 for x in ok]
            for dest, vals in ((late, lateness), (client, seen)):
                dest["p50"].append(pct(vals, .5))
                dest["p99"].append(pct(vals, .99))
                dest["max"].append(max(vals) if vals else math.nan)
        n = p.recover_streams
        for q, vals in late.items():
            v = median(vals)
            self.report.add(f"5. failover lateness past {FIRST_TOKEN_S:g} s @ {n} streams, "
                            f"{q} (ledger)", fmt_ms(v), spread=spread(vals, lambda x: f"{x:.1f}"),
                            target="<= 50 ms", ok=v <= 50)
        self.report.add(f"   client TTFT - {FIRST_TOKEN_S:g} s @ {n} streams, p50 / p99 / max",
                        " / ".join(f"{median(client[q]):.0f}" for q in ("p50", "p99", "max"))
                        + " ms", baseline=f"{median(served):.0%} answered",
                        spread=spread(client["p99"], lambda x: f"{x:.0f}"))

    # -- 3. throughput and overload -------------------------------------------------------

    async def _step(self, target: lg.Target, req: bytes, rate: float,
                    duration_s: float) -> dict[str, float]:
        """One open-loop step: latency percentiles (ms, from the scheduled send time), the
        error rate, HTTP errors and unanswered requests, goodput."""
        res = await lg.open_loop(target, req, rate=rate, duration_s=duration_s,
                                 cap=1024, grace_s=2.0)
        n = max(1, len(res))
        lat = [x.latency_ns / MS for x in res]
        errors = sum(not x.ok for x in res)
        http = sum(1 for x in res if x.status and x.status != 200)
        return {"p50": pct(lat, .5), "p99": pct(lat, .99), "err": errors / n,
                "http": http / n, "unanswered": (errors - http) / n,
                "good": (len(res) - errors) / duration_s}

    async def throughput(self) -> None:
        d, dt = self.main()
        p = self.p
        await self.settle()
        dreq, ureq = self.via("fast", "bench-fast-4", stream=False)
        best: dict[str, list[float]] = {"d": [], "u": []}
        ceilings = []
        for r in range(p.heavy_rounds):
            top = {"d": 0.0, "u": 0.0}
            failed = {"d": False, "u": False}
            for rate in p.rates:
                order = [("d", dt, dreq), ("u", self.direct, ureq)]
                for side, target, req in (order if r % 2 == 0 else order[::-1]):
                    if failed[side]:
                        continue
                    await quiesce(d, 5)
                    st = await self._step(target, req, rate, p.step_s)
                    log(f"  {target.name:9} {rate:5d}/s: p99 {st['p99']:8.2f} ms, errors "
                        f"{st['err']:.1%}, goodput {st['good']:.0f}/s")
                    if st["p99"] < p.p99_limit_ms and st["err"] <= 0.001:
                        top[side] = rate
                    else:
                        failed[side] = True
            best["d"].append(top["d"])
            best["u"].append(top["u"])
            # The load generator's own ceiling: closed loop, straight to the fake upstream.
            t0 = time.perf_counter()
            res = await lg.closed_loop(self.direct, ureq, concurrency=64,
                                       duration_s=p.ceiling_s)
            ceilings.append(sum(x.ok for x in res) / (time.perf_counter() - t0))
        v, u = median(best["d"]), median(best["u"])
        top_rate = p.rates[-1]

        def rate_str(x: float) -> str:
            if math.isnan(x):
                return "n/a"
            if x == 0:
                return f"< {p.rates[0]}/s"
            return f"{'>= ' if x >= top_rate else ''}{x:.0f}/s"

        self.report.add(f"3. max rate, non-streaming, p99 < {p.p99_limit_ms:g} ms (open loop)",
                        rate_str(v), baseline=f"direct {rate_str(u)}", ratio=ratio(v, u),
                        spread=spread(best["d"], lambda x: f"{x:.0f}"), target=">= 800/s",
                        ok=v >= 800)
        c = median(ceilings)
        self.report.add("   load generator ceiling (direct, closed loop c=64)", f"{c:.0f} req/s",
                        spread=spread(ceilings, lambda x: f"{x:.0f}"))
        # Overload: twice the highest passing rate (twice the lowest step if none passed).
        rate = 2 * (v or p.rates[0])
        over: list[dict[str, float]] = []
        for _ in range(p.heavy_rounds):
            await quiesce(d, 15)
            st = await self._step(dt, dreq, rate, p.overload_s)
            log(f"  overload {rate:.0f}/s: p50 {st['p50']:.1f} ms, p99 {st['p99']:.1f} ms, "
                f"HTTP errors {st['http']:.1%}, unanswered {st['unanswered']:.1%}, goodput "
                f"{st['good']:.0f}/s")
            over.append(st)
        await quiesce(d, 15)
        m = {k: median(o[k] for o in over) for k in over[0]}
        collapsed = m["p99"] >= 10 * p.p99_limit_ms
        verdict = ("collapses: latency explodes" if collapsed else
                   "sheds: fast errors" if m["err"] > 0.01 else "copes")
        self.report.add(f"3. overload at 2x max ({rate:.0f}/s, {p.overload_s:g} s): p99 / "
                        "errors / goodput", f"{m['p99']:.0f} ms / {m['err']:.1%} / "
                        f"{m['good']:.0f}/s",
                        baseline=f"p50 {m['p50']:.0f} ms, {m['http']:.0%} HTTP errors, "
                        f"{m['unanswered']:.0%} unanswered: {verdict}",
                        spread=spread([o["p99"] for o in over], lambda x: f"{x:.0f}"),
                        target="shed, not collapse", ok=not collapsed)

    # -- 4. memory ------------------------------------------------------------------------

    async def memory(self) -> None:
        p = self.p
        idle, peak, hwm, retried = list(self.idle_rss), [], [], []
        for r in range(p.heavy_rounds):
            d = Daemon(self.config, self.tmp, f"mem{r}")
            try:
                d.start()
                await asyncio.sleep(0.3)
                idle.append(d.rss_mb())
                # Like an SDK client, a stream refused by the shedder retries after 1 s.
                burst = lg.Burst(d.target(), lg.chat("trickle", stream=True), p.mem_streams,
                                 spread_s=1.0, retry_shed=True)
                await burst.connect()
                await burst.send()
                for _ in range(300):  # up to 30 s for every stream's first token
                    if burst.started() >= p.mem_streams:
                        break
                    await asyncio.sleep(0.1)
                open_now = burst.started()
                if open_now < p.mem_streams:
                    self.note(f"memory round {r}: only {open_now}/{p.mem_streams} streams got "
                              "a first token")
                top = 0.0
                for _ in range(max(1, int(p.mem_hold_s * 10))):
                    top = max(top, d.rss_mb())
                    await asyncio.sleep(0.1)
                gone = sum(1 for x in burst.results if not x.ok)
                if gone:
                    self.note(f"memory round {r}: {gone} trickle streams ended early")
                peak.append(top)
                retried.append(burst.shed)
                hwm.append(proc_status_mb(d.pid, "VmHWM"))
                burst.close()
            finally:
                d.stop()
        v = median(idle)
        self.report.add("4. RSS idle (fresh daemon after /healthz)", f"{v:.1f} MB",
                        spread=spread(idle, lambda x: f"{x:.1f}"), target="<= 50 MB",
                        ok=v <= 50)
        v = median(peak)
        self.report.add(f"4. RSS with {p.mem_streams} open streams, 1 token/s", f"{v:.1f} MB",
                        baseline=f"VmHWM {median(hwm):.1f} MB; "
                                 f"{median(retried):.0f} refused by the shedder, retried",
                        spread=spread(peak, lambda x: f"{x:.1f}"), target="<= 150 MB",
                        ok=v <= 150)

    # -- 7. an upstream that sends a huge JSON body ----------------------------------------

    async def hostile(self) -> None:
        """Peak RSS (VmHWM) of a fresh daemon while 20 attempts at once meet an upstream
        answering 200 application/json with a 2 GB body, each failing over to `up`."""
        p, n = self.p, 20
        evil = HostileUpstream(n)
        port = await evil.start()
        config = write_hostile_config(self.tmp, port, self.up.port)
        idle, peak, answered, taken = [], [], [], []
        try:
            for r in range(p.heavy_rounds):
                d = Daemon(config, self.tmp, f"hostile{r}")
                try:
                    d.start()
                    warm = await lg.closed_loop(d.target(), lg.chat("fast", stream=False),
                                                concurrency=1, total=1)
                    if not all(x.ok for x in warm):
                        raise BenchError("the hostile-upstream daemon did not serve route fast")
                    idle.append(proc_status_mb(d.pid, "VmHWM"))
                    evil.reset()
                    res = await lg.closed_loop(d.target(), lg.chat("hostile", stream=False),
                                               concurrency=n, total=n, timeout_s=60)
                    peak.append(proc_status_mb(d.pid, "VmHWM"))
                    answered.append(sum(x.ok for x in res))
                    taken += evil.sent
                    log(f"  round {r}: VmHWM {idle[-1]:.1f} -> {peak[-1]:.1f} MB, "
                        f"{answered[-1]}/{n} answered by the fallback, {evil.waiting} attempts "
                        f"met the body at once")
                finally:
                    d.stop()
        finally:
            evil.stop()
        v, base = median(peak), median(idle)
        self.report.add(f"7. peak RSS, {n} attempts at once meeting a 2 GB JSON body",
                        f"{v:.1f} MB", baseline=f"{base:.1f} MB before (+{v - base:.0f} MB); "
                        f"{median(answered):.0f}/{n} failed over; the upstream got "
                        f"{median(taken) / 2**20:.1f} MiB out before the daemon hung up",
                        spread=spread(peak, lambda x: f"{x:.0f}"), target="<= +150 MB",
                        ok=v - base <= 150)

    # -- all ------------------------------------------------------------------------------

    async def run(self, only: set[str]) -> None:
        p = self.p
        if "startup" in only:
            await self.phase("start-up", self.startup, ["6. start-up"])
        main_phases = [
            ("cpu", "CPU per request", self.cpu_requests, ["1. CPU / request"]),
            ("metrics", "what metrics cost", self.metrics_cost, ["1. metrics"]),
            ("c1", "added latency c=1", self.latency_c1, ["2. added TTFB c=1"]),
            ("chunks", "CPU per chunk", self.cpu_chunks, ["1. CPU / chunk"]),
            ("c64", f"added latency c={p.sessions}", self.latency_c64,
             [f"2. added TTFB c={p.sessions}"]),
            ("gaps", "inter-chunk gaps", self.gaps, ["2. added inter-chunk gap"]),
            ("recovery", "recovery", self.recovery, ["5. failover"]),
            ("throughput", "throughput + overload", self.throughput, ["3. throughput"]),
        ]
        if any(key in only for key, *_ in main_phases):
            self.d = Daemon(self.config, self.tmp, "main")
            self.d.start()
            self.dt = self.d.target()
            log(f"failoverd pid {self.d.pid}, upstream pid {self.up.proc.pid} port "
                f"{self.up.port}")
            await self.phase("sanity + warm-up", self.sanity, [])
            for key, name, fn, figures in main_phases:
                if key in only:
                    await self.phase(name, fn, figures)
            self.d.stop()
            self.d = None
        if "memory" in only:
            await self.phase("memory", self.memory, ["4. memory"])
        if "hostile" in only:
            await self.phase("hostile upstream", self.hostile, ["7. peak RSS"])


def machine() -> list[str]:
    out = [f"nproc: {os.cpu_count()}", f"python: {platform.python_version()} ({PYTHON})"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        out += [line for line in lscpu.splitlines()[:12]]
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        out.append(f"loadavg at start: {f.read().strip()}")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", ROOT]
        head = subprocess.run([*git, "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "failoverd.py"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out.append(f"git HEAD: {head[:90]}"
                   f"{' (failoverd.py has uncommitted changes)' if dirty else ''}")
    return out


PINNING = False
PHASES = ("startup", "cpu", "metrics", "c1", "chunks", "c64", "gaps", "recovery", "throughput",
          "memory", "hostile")


def main() -> int:
    global PINNING
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    ap.add_argument("--markdown", metavar="PATH",
                    help="also write the machine, the command and the table to PATH")
    ap.add_argument("--daemon-file", metavar="PATH", default=os.path.join(ROOT, "failoverd.py"),
                    help="measure this version of failoverd.py (e.g. from `git show "
                         "HEAD~1:failoverd.py`) instead of the working copy")
    ap.add_argument("--wait-quiet", metavar="S", type=float, default=0,
                    help="first wait up to S seconds for the machine to be idle")
    ap.add_argument("--only", metavar="PHASES", default=",".join(PHASES),
                    help=f"comma-separated subset of: {','.join(PHASES)}")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(PHASES):
        ap.error(f"unknown phase(s) {','.join(sorted(only - set(PHASES)))}")
    p = QUICK if args.quick else Params()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * p.mem_streams + 2048
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
        print(f"warning: RLIMIT_NOFILE is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, "
              f"the memory phase needs ~{want}", file=sys.stderr)
    PINNING = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if PINNING:
        os.sched_setaffinity(0, {1})
    else:
        print("warning: fewer than 2 CPUs or no taskset: nothing is pinned", file=sys.stderr)
    if subprocess.run([PYTHON, "-c", "import failoverd, h11, httpx2, trio"],
                      capture_output=True).returncode:
        print(f"error: {PYTHON} cannot import failoverd; run the bench with the python of the "
              f"venv failoverd is installed in (`pip install -e .` in {ROOT})", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    info = machine()
    busy = wait_quiet(args.wait_quiet)
    info.append(f"other load just before the run: {busy:.2f} cores busy (of "
                f"{os.cpu_count()})")
    pre_note = f"other processes used {busy:.2f} cores in the second before the run"
    if busy > 0.15:
        print(f"warning: the machine is busy ({busy:.2f} cores in use by other processes); "
              "figures will be noisy", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="failoverd-bench-")
    started = time.perf_counter()
    bench: Bench | None = None
    code = 0
    try:
        info.append(f"failoverd.py measured: {snapshot_daemon(tmp, args.daemon_file)}")
        up = Upstream()
        config = write_config(tmp, up.port, p)
        bench = Bench(p, tmp, up, config)
        bench.report.notes.append(pre_note)
        limit = 300 if args.quick else 900
        try:
            asyncio.run(asyncio.wait_for(bench.run(only), limit))
        except TimeoutError:
            raise BenchError(f"the benchmark did not finish within {limit} s") from None
    except BenchError as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    finally:
        for child in reversed(_children):
            _kill(child)
        shutil.rmtree(tmp, ignore_errors=True)
    if bench is not None and bench.report.rows:
        took = time.perf_counter() - started
        v = [x for x in bench.speed if not math.isnan(x)]
        if v:
            bench.report.notes.append(
                f"machine speed: a fixed Python loop on core 0 took {median(v):.0f} ms "
                f"(min {min(v):.0f}, max {max(v):.0f} over {len(v)} checks between phases; a "
                "wide range means the host was noisy and CPU figures move with it)")
        bench.report.notes.append(f"total run time {took:.0f} s; medians over rounds; "
                                  "failoverd pinned to core 0, load generator and fake "
                                  "upstream to core 1" if PINNING else "nothing pinned")
        table = bench.report.render()
        print()
        print(table)
        if args.markdown:
            cmd = " ".join(["python", "bench/run.py", *sys.argv[1:]])
            with open(args.markdown, "w") as f:
                f.write("# failoverd benchmark results\n\n## Machine\n\n```\n"
                        + "\n".join(info) + "\n```\n\n## Command\n\n```sh\n"
                        + f"cd {ROOT} && {cmd}\n```\n\n## Table\n\n```\n"
                        + table + "\n```\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
