"""`failoverd tail -n 10` on a 10,000-row and a 1,000,000-row ledger: wall time and peak
RSS of the whole command, next to the floor every `failoverd` command pays (starting
Python and importing failoverd), and the tail's own work measured in this process.

    python bench/tail.py            # 7 rounds; --rounds N; --keep DIR keeps the files

Each figure is the median over rounds with the min .. max range. The ledgers are real
ledger rows (the daemon's encoder), ~430 bytes each as the daemon writes them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import msgspec  # noqa: E402

import failoverd as fo  # noqa: E402

# The failoverd installed next to the interpreter this runs under (its venv).
FAILOVERD = os.path.join(os.path.dirname(sys.executable), "failoverd")
SIZES = (10_000, 1_000_000)


def build_ledger(path: str, rows: int) -> None:
    """Attempt rows and request rows in the daemon's own encoding, 2 attempts per request."""
    attempt = msgspec.json.encode(fo.AttemptRow(
        ts="2026-01-02T03:04:05.678Z", request_id="REQUESTID0000000", route="desk", attempt=0,
        provider="xai", model="grok-4.3", outcome="first_token_timeout", status=None,
        error="no output within first_token_timeout_s = 30 s", latency_ms=30001.2, stream=True,
        client_pid=4242, client_uid=1000, first_token_deadline_s=30.0, stall_deadline_s=60.0))
    ok = msgspec.json.encode(fo.AttemptRow(
        ts="2026-01-02T03:04:35.678Z", request_id="REQUESTID0000000", route="desk", attempt=1,
        provider="openrouter", model="minimax/minimax-m3", outcome="ok", status=200,
        ttft_ms=812.4, latency_ms=3857.1, max_gap_ms=120.3, committed=True, tokens_in=1843,
        tokens_out=212, cost_usd=0.000807, stream=True, client_pid=4242, client_uid=1000,
        first_token_deadline_s=30.0, stall_deadline_s=60.0))
    request = msgspec.json.encode(fo.RequestRow(
        ts="2026-01-02T03:04:39.535Z", request_id="REQUESTID0000000", route="desk",
        outcome="ok", served_by="openrouter/minimax/minimax-m3", attempts=2,
        total_ms=33858.0, ttft_ms=30813.0, status=200, stream=True, client_pid=4242,
        client_uid=1000, total_timeout_s=300.0, client_cliff_s=660.0))
    templates = (attempt, ok, request)
    with open(path, "wb", buffering=1 << 20) as f:
        for i in range(rows):
            rid = b"%016x" % (i // 3)
            f.write(templates[i % 3].replace(b"REQUESTID0000000", rid) + b"\n")


def run_child(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command, its output discarded. Spawned with
    posix_spawn (no copy of this process, which holds the ledgers it built: a forked
    child's peak RSS would start at this process's size)."""
    with open(os.devnull, "wb") as null, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, null.fileno(), 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t
        code = os.waitstatus_to_exitcode(status)
        if code:
            err.seek(0)
            raise SystemExit(f"{argv} exited {code}: {err.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def in_process(path: str) -> tuple[float, float]:
    """(seconds, peak MB allocated) of the tail itself: 10 rows, formatted."""
    out: list[str] = []
    tracemalloc.start()
    t = time.perf_counter()
    fo._tail(path, 10, False, lambda line, row: out.append(fo.format_row(row)))
    took = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert len(out) == 10
    return took, peak


def summary(values: list[float], unit: str, scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):8.1f} {unit}  ({min(v):.1f} .. {max(v):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--keep", metavar="DIR", help="build the ledgers in DIR and keep them")
    args = ap.parse_args()
    # What an installed failoverd imports is its compiled .pyc; where Python is told not
    # to write one (PYTHONDONTWRITEBYTECODE), every child would compile the file again.
    # (In a child: compiling the big file would leave this process, which forks the
    # measured ones, larger.)
    subprocess.run([sys.executable, "-m", "py_compile", fo.__file__], check=True)
    if not os.path.exists(FAILOVERD):
        print(f"error: {FAILOVERD} not found; run this with the python of the venv failoverd is "
              f"installed in (`pip install -e .` in {ROOT})", file=sys.stderr)
        return 1
    workdir = args.keep or tempfile.mkdtemp(prefix="failoverd-tail-")
    os.makedirs(workdir, exist_ok=True)
    try:
        paths = {}
        for n in SIZES:
            paths[n] = os.path.join(workdir, f"ledger-{n}.jsonl")
            if not os.path.exists(paths[n]):
                t = time.perf_counter()
                build_ledger(paths[n], n)
                print(f"built {n:>9,} rows, {os.path.getsize(paths[n]) / 2**20:6.0f} MB "
                      f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        floor = [run_child([sys.executable, "-c", "import failoverd"])
                 for _ in range(args.rounds)]
        cmd = {n: [] for n in SIZES}
        work = {n: [] for n in SIZES}
        for _ in range(args.rounds):  # sizes alternate within a round
            for n in SIZES:
                cmd[n].append(run_child([FAILOVERD, "tail", "-n", "10", paths[n]]))
                work[n].append(in_process(paths[n]))
        print(f"failoverd tail -n 10, {args.rounds} rounds: median (min .. max)\n")
        print(f"{'':38} {'wall':>24} {'peak RSS':>26}")
        label = 'python -c "import failoverd"'
        print(f"{label:38} "
              f"{summary([w for w, _ in floor], 'ms', 1000)}  "
              f"{summary([r for _, r in floor], 'MB')}")
        for n in SIZES:
            print(f"{f'failoverd tail -n 10, {n:,} rows':38} "
                  f"{summary([w for w, _ in cmd[n]], 'ms', 1000)}  "
                  f"{summary([r for _, r in cmd[n]], 'MB')}")
        print(f"\n{'the tail itself (in process)':38} {'time':>24} {'peak allocated':>26}")
        for n in SIZES:
            print(f"{f'{n:,} rows':38} {summary([w for w, _ in work[n]], 'ms', 1000)}  "
                  f"{summary([m for _, m in work[n]], 'MB')}")
        big, small = SIZES[-1], SIZES[0]
        ratio = statistics.median(w for w, _ in cmd[big]) / statistics.median(
            w for w, _ in cmd[small])
        print(f"\nwall time {big:,} rows / {small:,} rows: {ratio:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
