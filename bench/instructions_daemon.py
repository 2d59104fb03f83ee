"""Instructions per relayed chunk, counted by valgrind (callgrind): a figure that does
not move with the host's speed, for the per-chunk path where CPU time is too noisy.

    .venv/bin/python bench/instructions_daemon.py                      # the working failoverd.py
    .venv/bin/python bench/instructions_daemon.py --daemon-file /tmp/old.py
    .venv/bin/python bench/instructions_daemon.py --relay raw          # the bare trio relay
    .venv/bin/python bench/instructions_daemon.py --profile out.txt    # also the hottest functions

The daemon (or a reference relay from relays.py) runs under `valgrind --tool=callgrind`
with collection on; the fake upstream and the load generator run outside it. Two bursts
of S paced streams, one of C deltas and one of B, are counted separately (callgrind's
counters are zeroed before and dumped after each burst), and the per-chunk figure is
(Ir_C / S - Ir_B / S) / (C - B), as in run.py's CPU figure. Unlike there, both bursts
last as long (the short one is paced C / B times slower), so work that follows time
rather than chunks (the daemon's 10 ms lag probe) cancels out: under valgrind the load
must be light (8 streams, a delta every 50 ms, one event per read as in the real run),
and the probe would otherwise count as a large part of each chunk. Only user-space
instructions are counted, not the kernel's. Instructions are not time (a cache miss
costs more than an add); they tell code paths apart, not machines.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loadgen as lg  # noqa: E402
import run  # noqa: E402


def callgrind_total(path: str) -> int:
    """The instructions (Ir) in one callgrind dump."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


class Counted:
    """A process under callgrind whose counters are zeroed and dumped on demand."""

    def __init__(self, argv: list[str], out_dir: str, env: dict[str, str] | None) -> None:
        self.out = os.path.join(out_dir, "callgrind.out")
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}.%p",
             "--dump-instr=no", "--compress-strings=no", *argv],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(out_dir, "vg.log"), "wb"),  # noqa: SIM115
            env=env, preexec_fn=run._die_with_parent)
        run._children.append(self.proc)

    def control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.proc.pid)], check=True,
                       capture_output=True, timeout=120)

    def dumps(self) -> list[str]:
        return sorted(glob.glob(f"{self.out}.{self.proc.pid}.*"), key=os.path.getmtime)

    def dump(self) -> tuple[int, str]:
        before = set(self.dumps())
        self.control("-d")
        for _ in range(600):
            new = [p for p in self.dumps() if p not in before]
            if new:
                time.sleep(0.2)  # let it finish writing
                return callgrind_total(new[-1]), new[-1]
            time.sleep(0.1)
        raise RuntimeError("callgrind did not dump")


async def burst(target: lg.Target, model: str, streams: int, pace_ms: int) -> int:
    b = lg.Burst(target, lg.chat(model, stream=True), streams, spread_s=pace_ms / 1000)
    await b.connect()
    await b.send()
    res = await b.wait(600)
    b.close()
    return sum(r.ok for r in res)


async def per_request(counted: Counted, target: lg.Target, model: str,
                      p: argparse.Namespace) -> list[float]:
    """Instructions per non-streaming request (closed loop, 8 connections)."""
    req = lg.chat(model, stream=False)
    await lg.closed_loop(target, req, concurrency=8, total=p.requests // 2)  # warm-up
    out = []
    for _ in range(p.rounds):
        await asyncio.sleep(1.0)
        counted.control("-z")
        res = await lg.closed_loop(target, req, concurrency=8, total=p.requests)
        total, _ = counted.dump()
        ok = sum(r.ok for r in res)
        out.append(total / max(1, ok))
        print(f"  round: {out[-1]:,.0f} instructions per request ({ok} ok)", file=sys.stderr)
    return out


async def measure(counted: Counted, target: lg.Target, models: tuple[str, str],
                  p: argparse.Namespace) -> list[float]:
    for _ in range(2):  # warm-up: imports, pools, caches
        await burst(target, models[0], p.streams, p.pace)
    per_chunk = []
    for _ in range(p.rounds):
        totals = []
        for model in models:
            await asyncio.sleep(1.0)
            counted.control("-z")
            ok = await burst(target, model, p.streams, p.pace)
            if ok < p.streams:
                print(f"warning: {p.streams - ok} of {p.streams} {model} streams failed",
                      file=sys.stderr)
            total, _ = counted.dump()
            totals.append(total / max(1, ok))
        per_chunk.append((totals[0] - totals[1]) / (p.chunks - p.base))
        print(f"  round: {per_chunk[-1]:,.0f} instructions per chunk "
              f"({totals[0]:,.0f} / {totals[1]:,.0f} per stream)", file=sys.stderr)
    return per_chunk


def profile(dump: str, top: int) -> str:
    """callgrind_annotate's inclusive view of the last burst, hottest functions first."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", dump], capture_output=True,
                         text=True, timeout=300).stdout
    lines = [ln for ln in out.splitlines() if re.match(r"\s*[\d,]+ ", ln)]
    return "\n".join(lines[:top])


async def main_async(p: argparse.Namespace, tmp: str) -> int:
    up = run.Upstream()
    models = (f"bench-paced-{p.chunks}-{p.pace}",
              f"bench-paced-{p.base}-{p.pace * p.chunks // p.base}")
    if p.relay:
        sock = os.path.join(tmp, "relay.sock")
        counted = Counted([run.PYTHON, os.path.join(run.BENCH, "relays.py"), p.relay,
                           str(up.port), sock], tmp, None)
        target = lg.Target("relay", unix=sock)
        label = f"{p.relay} relay"
    else:
        source = run.snapshot_daemon(tmp, p.daemon_file)
        params = run.Params(chunk_count=p.chunks, chunk_base=p.base, pace_ms=p.pace)
        config = never_shed(run.write_config(tmp, up.port, params))
        sock = os.path.join(tmp, "fo.sock")
        # valgrind runs the interpreter, with the `failoverd` script or `-m failoverd`
        entry = run.FAILOVERD if run.FAILOVERD[0] == run.PYTHON else [run.PYTHON, *run.FAILOVERD]
        counted = Counted([*entry, "serve", "--config", config, "--quiet"],
                          tmp, run.DAEMON_ENV)
        target = lg.Target("failoverd", unix=sock)
        models = (f"up/{models[0]}", f"up/{models[1]}")  # PROVIDER/MODEL: a one-slot route
        label = source
    for _ in range(1200):  # start-up under valgrind takes a while
        if ready(sock, bool(p.relay)):
            break
        await asyncio.sleep(0.1)
    else:
        raise run.BenchError("the process under valgrind did not start")
    if p.requests:
        fast = "up/bench-fast-4" if not p.relay else "bench-fast-4"
        v = statistics.median(await per_request(counted, target, fast, p))
        print(f"{label}: {v:,.0f} instructions per non-streaming request (bench-fast-4, "
              f"closed loop c=8, median of {p.rounds} rounds of {p.requests})")
        return 0
    per_chunk = await measure(counted, target, models, p)
    v = sorted(per_chunk)[len(per_chunk) // 2]
    print(f"{label}: {v:,.0f} instructions per relayed chunk (median of {len(per_chunk)} "
          f"rounds: {', '.join(f'{x:,.0f}' for x in per_chunk)}); {p.streams} streams x "
          f"{p.chunks} chunks @ {p.pace} ms vs {p.base} @ {p.pace * p.chunks // p.base} ms")
    if p.profile:
        p.profile_text = profile(counted.dumps()[-2], p.top)
    return 0


def never_shed(config: str) -> str:
    """Under valgrind the event loop always runs late: switch the shedder off."""
    with open(config) as f:
        text = f.read().replace("[daemon]\n", "[daemon]\nshed_lag_s = 0\n", 1)
    with open(config, "w") as f:
        f.write(text)
    return config


def ready(sock: str, relay: bool) -> bool:
    if not relay:
        return run._healthz(sock)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        return True
    except OSError:
        return False
    finally:
        s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--daemon-file", default=os.path.join(run.ROOT, "failoverd.py"))
    ap.add_argument("--relay", choices=("raw", "httpx2"), help="count a reference relay instead")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--base", type=int, default=10)
    ap.add_argument("--pace", type=int, default=50, help="ms between deltas")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=0, metavar="N",
                    help="count per non-streaming request instead (N per round)")
    ap.add_argument("--profile", metavar="PATH", help="write callgrind_annotate's top functions")
    ap.add_argument("--top", type=int, default=60)
    p = ap.parse_args()
    if not shutil.which("valgrind"):
        print("error: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="failoverd-instr-")
    try:
        code = asyncio.run(main_async(p, tmp))
        if p.profile:
            with open(p.profile, "w") as f:
                f.write(p.profile_text + "\n")
        return code
    finally:
        for child in reversed(run._children):
            run._kill(child, 10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
