"""A/B of the engine's host scheduling: tokens/s of the same policies, on random weights of the trained
model's shape (16 layers, 8 experts, top-2, hidden 1024), for whichever code tree is on the path.

Run it once from a checkout of each commit to compare, on one GPU machine in one go:

    git worktree add /tmp/before <commit>
    (cd /tmp/before && python /path/to/experiments/bench_host_overlap.py before --out OUT)
    python -m experiments.bench_host_overlap after --out OUT

Random weights give random routing and poor predictions, so the hit rates say nothing about the
predictors; what the comparison shows is the host time each policy costs the decode loop. Each run's
greedy tokens are checked against the all-resident run's (lossless policies must not change them).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from policies.registry import resolve_policy
from offload.predictors import policy_depth
from hardware import load_hardware
from offload.session import RunSettings
from real.engine import OffloadEngine
from real.lookahead_gate import LookaheadGate
from real.predictors import FrozenRouters, LookaheadGatePredictor, PreGate
from real.record import routing_trace
from real.shape_model import random_model
from real.train_lm import SIZES
from traces import ModelShape

MOE_LM = SIZES["h100"].shape                                     # the trained model's shape
TINY = ModelShape("tiny", 4, 8, 2, 32, 48, 4, 2, 8, 8192)      # a CPU smoke run


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tag", help="the name of this code tree in the CSV (e.g. before / after)")
    p.add_argument("--out", required=True)
    p.add_argument("--policies", default="lru,oracle,mixtral-offloading,lookahead")
    p.add_argument("--slots", default="2,6")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hardware", default="h100-pcie5-measured",
                   help="profile whose copy and layer estimates limit the predictive policies' depth")
    args = p.parse_args(argv)
    hardware = load_hardware(args.hardware)
    cuda = args.device == "cuda"
    shape = MOE_LM if cuda else TINY
    model = random_model(shape, args.device, torch.bfloat16 if cuda else torch.float32, seed=0, max_len=256)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, shape.vocab_size, 16).tolist() for _ in range(args.prompts)]

    def settings(slots: int) -> RunSettings:
        return RunSettings(cache_slots=slots, prefetch_depth=3)

    base = OffloadEngine(model, shape, resolve_policy("lru"), settings(shape.num_experts),
                         hardware=hardware).generate(prompts, args.new_tokens)
    future = routing_trace(base, shape, "bench_host_overlap", args.device, "all resident")
    predictors = {d: {"pregate": PreGate(model, d),
                      "lookahead": LookaheadGatePredictor(LookaheadGate(FrozenRouters(model), d))} for d in (1, 3)}
    rows = []
    for policy in args.policies.split(","):
        cls = resolve_policy(policy)
        for slots in [int(s) for s in args.slots.split(",")]:
            engine = OffloadEngine(model, shape, cls, settings(slots), hardware=hardware, future=future,
                                   train_trace=future, predictors=predictors[policy_depth(cls, 3)])
            r = engine.generate(prompts, args.new_tokens)
            if r.generated != base.generated:
                raise SystemExit(f"error: {policy} at {slots} slots changed the greedy tokens")
            rows.append({"tree": args.tag, "policy": policy, "cache_slots": slots,
                         "tokens_per_s": r.metrics["tokens_per_s"], "hit_rate": r.metrics["hit_rate"]})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"host_overlap_{args.tag}.csv", index=False)
    return table


if __name__ == "__main__":
    main()
