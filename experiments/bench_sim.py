"""Simulator speed: simulated layer-steps per wall second on one core.

    python -m experiments.bench_sim                 # the default trace, a few policies and sizes
    python -m experiments.bench_sim --profile lru:4  # and where the time goes, for one of them

A benchmark, not a test: it prints its figures and never fails on them.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

from policies.registry import resolve_policy
from hardware.profile import load_hardware
from sim.simulator import SimSettings, simulate
from traces import DEFAULT_TRACE, load_trace

CASES = [("lru", 4), ("lru", 8), ("lru", 16), ("lru", 32), ("belady", 8), ("oracle", 8), ("affinity", 8)]


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
    print(f"{'policy':>10} {'slots':>5} {'hit_rate':>8} {'copies/step':>11} {'wall_s':>7} {'layer-steps/s':>14}")
    for policy, slots in CASES:
        best = None
        for _ in range(args.repeat):
            r = simulate(trace, resolve_policy(policy), hardware, SimSettings(cache_slots=slots), train_trace=train)
            best = r if best is None or r.wall_s < best.wall_s else best
        m = best.metrics
        print(f"{policy:>10} {slots:>5} {m['hit_rate']:8.3f} {m['copies'] / steps:11.2f} "
              f"{best.wall_s:7.2f} {best.layer_steps_per_wall_s:14,.0f}")
    if args.profile:
        policy, slots = args.profile.split(":")
        profiler = cProfile.Profile()
        profiler.enable()
        simulate(trace, resolve_policy(policy), hardware, SimSettings(cache_slots=int(slots)), train_trace=train)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())


if __name__ == "__main__":
    main()
