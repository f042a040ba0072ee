"""Simulator speed: simulated layer-steps per wall second on one core.

    python -m experiments.bench_sim                 # the default trace, a few policies and sizes
    python -m experiments.bench_sim --profile lru:4  # and where the time goes, for one of them

Each case runs on the SimPy reference (``sim.simulator.simulate``) and, where the policy has a
kernel, on the exact fast path (``sim.fast_path``). The fast path's cold start (importing numba, and
the first call: compiling its kernels, or loading them from numba's disk cache) is reported apart
from its warm runs.

A benchmark, not a test: it prints its figures and never fails on them.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from policies.registry import resolve_policy
from hardware.profile import load_hardware
from offload.session import RunSettings
from sim.simulator import simulate
from traces import DEFAULT_TRACE, load_trace

CASES = [("lru", 4), ("lru", 8), ("lru", 16), ("lru", 32), ("lfu", 8), ("fifo", 8), ("static", 8),
         ("belady", 8), ("oracle", 8), ("affinity", 8)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--hardware", default="h100-pcie5")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    parser.add_argument("--profile", metavar="POLICY:SLOTS", help="cProfile one case, top functions")
    args = parser.parse_args(argv)

    train, trace = load_trace(args.trace).split(0.25)
    hardware = load_hardware(args.hardware)
    steps = trace.num_tokens * trace.num_layers
    print(f"trace {args.trace}: {trace.num_tokens} tokens x {trace.num_layers} layers = {steps} layer-steps")
    fast_simulate = _fast_cold_start(trace, hardware, train)
    print(f"{'policy':>10} {'slots':>5} {'hit_rate':>8} {'copies/step':>11} {'wall_s':>7} {'layer-steps/s':>14}  path")
    for policy, slots in CASES:
        settings = RunSettings(cache_slots=slots)
        best = None
        for _ in range(args.repeat):
            r = simulate(trace, resolve_policy(policy), hardware, settings, train_trace=train, path="reference")
            best = r if best is None or r.wall_s < best.wall_s else best
        m = best.metrics
        print(f"{policy:>10} {slots:>5} {m['hit_rate']:8.3f} {m['copies'] / steps:11.2f} "
              f"{best.wall_s:7.2f} {best.layer_steps_per_wall_s:14,.0f}  reference")
        fast = fast_simulate(trace, policy, hardware, settings, train)   # also the untimed warm-up
        if fast is None:
            print(f"{policy:>10} {slots:>5} {'':>8} {'':>11} {'':>7} {'':>14}  fast: no kernel, reference only")
            continue
        wall_s = min(_seconds(fast_simulate, trace, policy, hardware, settings, train)
                     for _ in range(max(args.repeat, 5)))   # ms per run: a few more repeats cost nothing
        same = "identical" if fast.metrics == m and fast.token_ns == best.token_ns else "DIFFERENT"
        print(f"{policy:>10} {slots:>5} {fast.metrics['hit_rate']:8.3f} {fast.metrics['copies'] / steps:11.2f} "
              f"{wall_s:7.4f} {steps / wall_s:14,.0f}  fast, warm ({same} to the reference)")
    if args.profile:
        policy, slots = args.profile.split(":")
        profiler = cProfile.Profile()
        profiler.enable()
        simulate(trace, resolve_policy(policy), hardware, RunSettings(cache_slots=int(slots)), train_trace=train,
                 path="reference")
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _fast_cold_start(trace, hardware, train):
    """Import the fast path and run its first case, timing both; returns ``fast_simulate``."""
    start = time.perf_counter()
    from sim import fast_path, kernels   # imported here so that numba's import time is measured
    import_s = time.perf_counter() - start
    steps = trace.num_tokens * trace.num_layers
    lines = []
    for policy in ("lru", "belady"):       # the replay kernel, then Belady's next-use table
        first_s = _seconds(fast_path.fast_simulate, trace, policy, hardware, RunSettings(cache_slots=8), train)
        lines.append(f"first {policy} run {first_s:.2f} s")
    stats = [kernels._replay.stats]
    compiled = sum(sum(s.cache_misses.values()) for s in stats)
    loaded = sum(sum(s.cache_hits.values()) for s in stats)
    print(f"fast path cold start: import {import_s:.2f} s, {', '.join(lines)} "
          f"({compiled} kernel(s) compiled, {loaded} loaded from numba's disk cache; "
          f"warm: {steps} layer-steps in the rows below)")
    return fast_path.fast_simulate


if __name__ == "__main__":
    main()
