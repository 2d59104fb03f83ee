"""Replay benchmark for learned deadlines: `python bench/deadlines.py [--seed N] [--days D]`.

No daemon: synthetic traffic for three models shaped like the field's seed table (issue
11) is replayed in simulated time through failoverd's DeadlineLearner, the same code the
daemon runs, and through fixed deadlines (failoverd's defaults: first token 30 s, stall
60 s). The same attempts go through both. Per model it prints the share of healthy
answers each policy would have cut (false kills), how long a real hang held its client
(median, p99), and the client's worst wait against client_cliff_s. Seeded and
deterministic. See bench/README.md.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgspec  # noqa: E402

import failoverd as fo  # noqa: E402

DAY = 86400.0
HOUR = 3600.0
TIMING = fo.Timing()  # the defaults: what a route gets without a deadline of its own
CLIFF_S = fo.DaemonConfig().client_cliff_s
FIXED = (TIMING.first_token_timeout_s, TIMING.stall_timeout_s)
# The events every model goes through (simulated time from the start of the run).
BURST = (DAY + 10 * HOUR, 60.0, 4.0)  # start, length, first tokens x4: one slow minute
DEGRADED = (2 * DAY + 14 * HOUR, HOUR, 2.5)  # a degraded hour: first tokens x2.5
WARMUP_S = 6 * HOUR  # "steady" figures leave out the first hours (cold start, learning)
REFERENCE_TOKENS = 16_000  # the band whose learned deadline is followed (8k-32k)
UNBOUNDED = fo.DeadlineBounds(0.0, math.inf)


@dataclass
class Shape:
    """One model's synthetic traffic. First tokens are lognormal (median, sigma) plus a
    prefill time per 1k prompt tokens; a `think` share of requests think first (a
    second lognormal); `outliers` of healthy answers come log-uniform in 10..168 s."""

    name: str
    per_min: float
    ttft: tuple[float, float]
    prefill_per_1k: float
    gap: tuple[float, float]  # longest gap between outputs: lognormal (median, sigma)
    gen: tuple[float, float]  # first token to the end: lognormal (median, sigma)
    ft_hangs: float  # share of attempts that never produce a token
    stall_hangs: float  # share that stop for good after some output
    think: tuple[float, float, float] = (0.0, 1.0, 0.1)  # share, median, sigma
    outliers: float = 0.0


SHAPES = [
    # grok-like: first-token p99 ~2 s (the issue's "fast model whose first-token p99 is
    # 2 s"), latency p50 ~3 s / p90 ~7 s, an answer now and then that takes minutes.
    Shape("fast", per_min=6, ttft=(0.8, 0.4), prefill_per_1k=0.01, gap=(0.4, 0.6),
          gen=(2.2, 0.7), ft_hangs=0.01, stall_hangs=0.005, outliers=0.001),
    # A thinking model on a chat wire: nothing streams until the first content token;
    # 6 % think for about a minute (first-token p99 ~90 s, 20 s would cut ~6 %).
    Shape("thinker", per_min=1, ttft=(3.0, 0.6), prefill_per_1k=0.05, gap=(0.5, 0.6),
          gen=(12.0, 0.8), ft_hangs=0.005, stall_hangs=0.005, think=(0.06, 52.0, 0.55)),
    # minimax-like: long-tailed, prefill that grows steeply with the prompt (150k tokens
    # add ~38 s), latency p50 ~16 s / p90 ~90 s, and real hangs (3 % + 1 %).
    Shape("longtail", per_min=3, ttft=(5.0, 0.8), prefill_per_1k=0.25, gap=(1.5, 0.9),
          gen=(9.0, 1.5), ft_hangs=0.03, stall_hangs=0.01),
]


@dataclass
class Attempt:
    t: float
    tokens: int
    kind: str  # "ok" | "ft_hang" | "stall_hang"
    ttft: float  # when the healthy first token would come
    gap: float  # the healthy longest gap
    gen: float


def slowdown(t: float) -> float:
    for start, length, factor in (BURST, DEGRADED):
        if start <= t < start + length:
            return factor
    return 1.0


def traffic(shape: Shape, days: float, rng: random.Random) -> list[Attempt]:
    out, t, end = [], 0.0, days * DAY
    while True:
        t += rng.expovariate(shape.per_min / 60)
        if t >= end:
            return out
        tokens = int(math.exp(rng.uniform(math.log(1_000), math.log(150_000))))
        median, sigma = shape.ttft
        share, t_median, t_sigma = shape.think
        if rng.random() < share:
            median, sigma = t_median, t_sigma
        ttft = rng.lognormvariate(math.log(median), sigma) + shape.prefill_per_1k * tokens / 1000
        if rng.random() < shape.outliers:
            ttft = math.exp(rng.uniform(math.log(10), math.log(168)))
        u = rng.random()
        kind = ("ft_hang" if u < shape.ft_hangs else
                "stall_hang" if u < shape.ft_hangs + shape.stall_hangs else "ok")
        out.append(Attempt(t, tokens, kind, ttft * slowdown(t),
                           rng.lognormvariate(math.log(shape.gap[0]), shape.gap[1]),
                           rng.lognormvariate(math.log(shape.gen[0]), shape.gen[1])))


@dataclass
class Result:
    healthy: int = 0
    cut_first: int = 0
    cut_stall: int = 0
    cut_steady: int = 0
    healthy_steady: int = 0
    cut_events: int = 0  # in the burst minute and the degraded hour
    healthy_events: int = 0
    ft_hang_waits: list[float] = field(default_factory=list)
    stall_hang_waits: list[float] = field(default_factory=list)
    worst_wait: float = 0.0
    max_first_token: float = 0.0
    track: list[tuple[float, float, float]] = field(default_factory=list)  # t, raw, applied
    answered: int = 0


def in_event(t: float) -> bool:
    return slowdown(t) != 1.0


class Policy:
    name = "?"

    def deadlines(self, model: str, tokens: int, now: float) -> tuple[float, float]:
        raise NotImplementedError

    def answer(self, model: str, a: Attempt, now: float) -> None:
        pass

    def timeout(self, model: str, kind: str, waited: float, tokens: int, now: float) -> None:
        pass


class Fixed(Policy):
    name = "fixed"

    def deadlines(self, model: str, tokens: int, now: float) -> tuple[float, float]:
        return FIXED


class Adaptive(Policy):
    name = "adaptive"

    def __init__(self) -> None:
        self.learner = fo.DeadlineLearner()
        sd = fo.slot_deadlines(TIMING, fo.ModelConfig())
        self.sd = sd
        self.calls = 0
        self.ns = 0

    def deadlines(self, model: str, tokens: int, now: float) -> tuple[float, float]:
        sd, remaining = self.sd, TIMING.total_timeout_s
        t0 = time.perf_counter_ns()
        first = self.learner.first_token_deadline(model, tokens, sd.first_token_s,
                                                  sd.first_token, remaining)
        stall = self.learner.stall_deadline(model, sd.stall_s, sd.stall, remaining)
        self.ns += time.perf_counter_ns() - t0
        self.calls += 2
        return first, stall

    def answer(self, model: str, a: Attempt, now: float) -> None:
        t0 = time.perf_counter_ns()
        self.learner.observe_answer(model, a.ttft, a.tokens, a.gap, now)
        self.ns += time.perf_counter_ns() - t0
        self.calls += 1

    def timeout(self, model: str, kind: str, waited: float, tokens: int, now: float) -> None:
        t0 = time.perf_counter_ns()
        self.learner.observe_timeout(model, kind, waited, tokens, now)  # type: ignore[arg-type]
        self.ns += time.perf_counter_ns() - t0
        self.calls += 1


def replay(policy: Policy, model: str, attempts: list[Attempt]) -> Result:
    """Each attempt is the first slot of its request (the whole total_timeout_s left).
    An attempt's outcome reaches the policy when it would have ended, not when it began."""
    r = Result()
    pending: list[tuple[float, int, str, float]] = []  # (when, index, kind, waited)
    for i, a in enumerate(attempts):
        while pending and pending[0][0] <= a.t:
            when, j, kind, waited = heapq.heappop(pending)
            if kind == "ok":
                policy.answer(model, attempts[j], when)
                r.answered += 1
            else:
                policy.timeout(model, kind, waited, attempts[j].tokens, when)
        first, stall = policy.deadlines(model, a.tokens, a.t)
        r.max_first_token = max(r.max_first_token, first)
        if a.tokens >= 8_000 and a.tokens < 32_000 and isinstance(policy, Adaptive):
            state = policy.learner.models.get(model)
            raw = state and state.first_token_s(fo.token_band(REFERENCE_TOKENS), first, UNBOUNDED)
            r.track.append((a.t, raw or first, first))
        if a.kind == "ft_hang":
            r.ft_hang_waits.append(first)
            r.worst_wait = max(r.worst_wait, first)
            heapq.heappush(pending, (a.t + first, i, "first_token", first))
            continue
        healthy = a.kind == "ok"
        steady = a.t >= WARMUP_S and not in_event(a.t)
        r.healthy += healthy
        r.healthy_steady += healthy and steady
        r.healthy_events += healthy and in_event(a.t)
        if a.ttft > first:  # cut before the first token (a hang-to-be too, if stall_hang)
            r.worst_wait = max(r.worst_wait, first)
            r.cut_first += healthy
            r.cut_steady += healthy and steady
            r.cut_events += healthy and in_event(a.t)
            if not healthy:
                r.ft_hang_waits.append(first)
            heapq.heappush(pending, (a.t + first, i, "first_token", first))
            continue
        r.worst_wait = max(r.worst_wait, a.ttft)
        if not healthy:  # output began, then nothing more
            r.stall_hang_waits.append(stall)
            heapq.heappush(pending, (a.t + a.ttft + a.gen / 2 + stall, i, "stall", stall))
        elif a.gap > stall:
            r.cut_stall += 1
            r.cut_steady += steady
            r.cut_events += in_event(a.t)
            heapq.heappush(pending, (a.t + a.ttft + a.gen / 2 + stall, i, "stall", stall))
        else:
            heapq.heappush(pending, (a.t + a.ttft + a.gen, i, "ok", 0.0))
    return r


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def share(n: int, of: int) -> str:
    return f"{100 * n / of:.2f} %" if of else "-"


def describe(shape: Shape, attempts: list[Attempt]) -> str:
    ok = [a for a in attempts if a.kind == "ok" and not in_event(a.t)]
    ttft = [a.ttft for a in ok]
    latency = [a.ttft + a.gen for a in ok]
    small = [a.ttft for a in ok if a.tokens < 2_000]
    large = [a.ttft for a in ok if a.tokens >= 128_000]
    hangs = sum(a.kind != "ok" for a in attempts)
    return (f"  {shape.name:<9} n={len(attempts):>6}  first token p50 {pct(ttft, 50):5.1f} "
            f"p90 {pct(ttft, 90):5.1f} p99 {pct(ttft, 99):5.1f} max {max(ttft):5.0f} s "
            f"(<2k p99 {pct(small, 99):5.1f}, >=128k p99 {pct(large, 99):5.1f})  latency p50 "
            f"{pct(latency, 50):5.1f} p90 {pct(latency, 90):5.1f} max {max(latency):4.0f} s  "
            f"hangs {hangs} ({share(hangs, len(attempts))})")


def around(track: list[tuple[float, float, float]], start: float, end: float
           ) -> tuple[float, float]:
    """The learned (raw) deadline just before `start`, and its maximum in [start, end)."""
    before = [raw for t, raw, _ in track if t < start]
    during = [raw for t, raw, _ in track if start <= t < end]
    return (before[-1] if before else math.nan), (max(during) if during else math.nan)


def report_events(name: str, track: list[tuple[float, float, float]]) -> str:
    quiet = [raw for t, raw, _ in track if BURST[0] - 12 * HOUR <= t < BURST[0]]
    b0, b1 = around(track, BURST[0], BURST[0] + 2 * HOUR)
    d0, d1 = around(track, DEGRADED[0], DEGRADED[0] + DEGRADED[1] + HOUR)
    after = [raw for t, raw, _ in track if t >= DEGRADED[0] + DEGRADED[1] + 6 * HOUR]
    return (f"  {name:<9} 12 h before the slow minute: {min(quiet):6.1f} .. {max(quiet):6.1f} s;"
            f"  slow minute: {b0:6.1f} -> max {b1:6.1f} s in 2 h (x{b1 / b0:.2f});"
            f"  degraded hour: {d0:6.1f} -> max {d1:6.1f} s (x{d1 / d0:.2f}), "
            f"{after[0] if after else math.nan:6.1f} s 6 h after it")


def run(seed: int, days: float) -> tuple[list[tuple[Shape, list[Attempt]]],
                                         dict[tuple[str, str], Result], Adaptive]:
    rng = random.Random(seed)
    work = [(s, traffic(s, days, random.Random(rng.random()))) for s in SHAPES]
    adaptive = Adaptive()
    results = {}
    for shape, attempts in work:
        for policy in (Fixed(), adaptive):
            results[shape.name, policy.name] = replay(policy, shape.name, attempts)
    return work, results, adaptive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--days", type=float, default=3.0)
    ap.add_argument("--sweep", type=int, default=0, metavar="N",
                    help="then also N more seeds (seed+1 ...): only their targets")
    args = ap.parse_args()
    print(f"bench/deadlines.py: seed {args.seed}, {args.days:g} simulated days; fixed = "
          f"first token {FIXED[0]:g} s, stall {FIXED[1]:g} s; adaptive = failoverd's defaults "
          f"(cold start {FIXED[0]:g} / {FIXED[1]:g} s for {fo.DEADLINE_COLD_START} answers, "
          f"bounds first token {TIMING.first_token_min_s:g}-{TIMING.first_token_max_s:g} s, "
          f"stall {TIMING.stall_min_s:g}-{TIMING.stall_max_s:g} s, total "
          f"{TIMING.total_timeout_s:g} s)")
    print(f"events: one slow minute at {BURST[0] / HOUR:g} h (first tokens x{BURST[2]:g}), "
          f"a degraded hour at {DEGRADED[0] / HOUR:g} h (x{DEGRADED[2]:g}); 'steady' leaves "
          f"out the first {WARMUP_S / HOUR:g} h and both events")
    work, results, adaptive = run(args.seed, args.days)
    print("\ntraffic (healthy answers outside the events; seconds):")
    for shape, attempts in work:
        print(describe(shape, attempts))
    print_table(results)
    print("\nlearned first-token deadline, 8k-32k band (raw, before the bounds):")
    for shape, _ in work:
        print(report_events(shape.name, results[shape.name, "adaptive"].track))
    print_chain(results)
    print_cost(adaptive.learner, args.days * DAY)
    print("\ntargets:")
    verdict(args.seed, results)
    for seed in range(args.seed + 1, args.seed + 1 + args.sweep):
        verdict(seed, run(seed, args.days)[1])


def print_table(results: dict[tuple[str, str], Result]) -> None:
    print("\n                     false kills (healthy answers cut)                "
          "first-token hang held   stall hang held    client's worst wait")
    print("  model     policy    all        steady     events     first/stall  "
          "n     median   p99        median   p99       s     cliff margin")
    for (model, policy), r in results.items():
        cut = r.cut_first + r.cut_stall
        ft, st = r.ft_hang_waits, r.stall_hang_waits
        print(f"  {model:<9} {policy:<9} {share(cut, r.healthy):<10} "
              f"{share(r.cut_steady, r.healthy_steady):<10} "
              f"{share(r.cut_events, r.healthy_events):<10} "
              f"{f'{r.cut_first}/{r.cut_stall}':<12} {len(ft):<5} "
              f"{statistics.median(ft) if ft else 0:6.1f}  {pct(ft, 99):6.1f}     "
              f"{statistics.median(st) if st else 0:6.1f}  {pct(st, 99):6.1f}    "
              f"{r.worst_wait:6.1f}  {CLIFF_S - r.worst_wait:6.1f}")


def print_chain(results: dict[tuple[str, str], Result]) -> None:
    models = [s.name for s in SHAPES]
    print()
    for policy in ("fixed", "adaptive"):
        worst = sum(results[m, policy].max_first_token for m in models)
        clipped = min(worst, TIMING.total_timeout_s)
        print(f"chain {' -> '.join(models)} ({policy}): every slot hanging to its longest "
              f"first-token deadline of the run: {worst:g} s, clipped by total_timeout_s to "
              f"{clipped:g} s; client cliff {CLIFF_S:g} s, margin {CLIFF_S - clipped:g} s")


def print_cost(learner: fo.DeadlineLearner, now: float, rounds: int = 5, n: int = 2000) -> None:
    """CPU time per learner call on the learner the run left (process CPU clock: the
    machine may be shared), medians over rounds, against a fixed loop in the same rounds."""
    sd = fo.slot_deadlines(TIMING, fo.ModelConfig())
    calls = {
        "first_token_deadline": lambda i, t: learner.first_token_deadline(
            "longtail", 16_000, sd.first_token_s, sd.first_token, 300.0),
        "stall_deadline": lambda i, t: learner.stall_deadline(
            "longtail", sd.stall_s, sd.stall, 300.0),
        "observe_answer": lambda i, t: learner.observe_answer(
            "longtail", 5.0 + i % 7, 16_000, 1.5, t),
        "observe_timeout": lambda i, t: learner.observe_timeout(
            "longtail", "first_token", 120.0, 16_000, t),
    }
    figures: dict[str, list[float]] = {name: [] for name in [*calls, "reference"]}
    for r in range(rounds):
        t0 = time.process_time_ns()
        for _ in range(100_000):
            pass
        figures["reference"].append((time.process_time_ns() - t0) / 1e6)
        for name, call in calls.items():
            t0 = time.process_time_ns()
            for i in range(n):
                call(i, now + r * n + i)
            figures[name].append((time.process_time_ns() - t0) / n / 1000)
    saved = msgspec.json.encode(learner.to_saved(now))
    print(f"\ncost (CPU per call, median of {rounds} rounds [min .. max], on the 'longtail' "
          "state the run left):")
    for name, values in figures.items():
        unit = "ms per 100k empty loop iterations (reference)" if name == "reference" else "us"
        print(f"  {name:<21} {statistics.median(values):6.2f} [{min(values):.2f} .. "
              f"{max(values):.2f}] {unit}")
    print(f"  state: {len(saved) / len(learner.models) / 1024:.1f} KiB per model in the state "
          f"file; fixed memory per model: {len(fo.DEADLINE_BAND_LABELS)} size histograms + 2 "
          f"learned deadlines (answers and timeouts) of {fo.DEADLINE_BINS} bins")


def verdict(seed: int, results: dict[tuple[str, str], Result]) -> None:
    parts = []
    ok = True
    for s in SHAPES:
        r = results[s.name, "adaptive"]
        cut = r.cut_first + r.cut_stall
        ok &= r.cut_steady <= 0.005 * r.healthy_steady
        steady = share(r.cut_steady, r.healthy_steady)
        parts.append(f"{s.name} {share(cut, r.healthy)} (steady {steady})")
    fixed, adaptive = results["fast", "fixed"], results["fast", "adaptive"]
    ratio = statistics.median(fixed.ft_hang_waits) / statistics.median(adaptive.ft_hang_waits)
    print(f"  seed {seed:<3} adaptive false kills: {', '.join(parts)} "
          f"[{'ok' if ok else 'MISSED'}: steady <= 0.5 %]; fast model's first-token hangs "
          f"abandoned {ratio:.2f}x sooner than at {FIXED[0]:g} s "
          f"[{'ok' if ratio >= 3 else 'MISSED'}: >= 3x]")


if __name__ == "__main__":
    main()
