"""Train a lookahead gate (``real.lookahead_gate``) on the hidden states of a recorded run.

    python -m experiments.train_gate --trace RECORDED.npz --model CHECKPOINT_DIR --depth 3 --out GATE_DIR \
        [--train-tokens 32768 [--corpus DIR]] [--steps 2000 --rank 64 --lr 1e-3 --device cpu|cuda --holdout 0.2]

Training data: with ``--train-tokens N``, the hidden states of N tokens of the corpus's *training* split
(``real.hidden_capture``: Hugging Face's batched forward with hooks), and the whole recording is the
held-out evaluation set; without it, the first (1 - holdout) of the recorded tokens. Then it reports,
on the held-out tokens, the recall
per distance (routed top-k at l+d found in the predicted top-k) and the KL to the true router
distribution for the untrained gate (which is the multi-layer pre-gate) and the trained one. Writes
the gate (``gate.safetensors`` + ``gate.json``, the report inside its ``extra``) to GATE_DIR.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from real.bench.args import (DTYPES, check_out, checked_config, checkpoint_errors_exit, non_negative_int,
                             positive_float, positive_int)
from real.corpus import DEFAULT_CORPUS_DIR
from real.hidden_capture import capture_hidden_states
from real.lookahead_gate import LookaheadGate, train_lookahead_gate, true_router_probs
from real.predictors import FrozenRouters, LookaheadGatePredictor, kl_to_router, track_recall
from real.tracks import check_model_matches, load_model, recorded_tokens
from traces import load_trace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=Path, help="engine recording with hidden states")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=non_negative_int, default=2000)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of the recorded tokens held out (the last ones)")
    p.add_argument("--train-tokens", type=int, default=0,
                   help="train on this many tokens of the corpus's training split instead (0: on the recording)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR, help="with --train-tokens: the corpus")
    args = p.parse_args(argv)
    if not 0.0 < args.holdout < 1.0:
        p.error(f"--holdout {args.holdout}: must be in (0, 1)")
    if args.depth < 1 or args.rank < 1 or args.steps < 0 or args.train_tokens < 0:
        p.error("--depth and --rank must be at least 1, --steps and --train-tokens at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu)")
    if not args.model.is_dir():
        p.error(f"--model {args.model}: no such folder")
    config = checked_config(p, args.model)
    if args.depth > config.num_layers - 1:      # as make_tracks: a deeper row would predict no layer (NaN recall)
        p.error(f"--depth {args.depth}: {args.model} has {config.num_layers} layers, so a gate looks at most "
                f"{config.num_layers - 1} layer(s) ahead; use --depth 1..{config.num_layers - 1}")
    try:        # as make_tracks: a truncated or broken file, no hidden states, another model's recording
        args.trace_obj = recorded_tokens(load_trace(args.trace), args.trace)
        check_model_matches(args.trace_obj, SimpleNamespace(config=config), args.trace, args.model)
    except ValueError as err:       # TraceError included
        p.error(f"--trace {' '.join(str(err).split())}")
    check_out(p, args.out)
    return args


def evaluate(gate: LookaheadGate, hidden: np.ndarray, experts: np.ndarray) -> dict:
    track = LookaheadGatePredictor(gate).track(hidden)
    with torch.no_grad():
        device = gate.routers.folded.device
        probs = true_router_probs(gate.routers, torch.as_tensor(hidden).to(device=device, dtype=torch.float32))
    return {"recall": track_recall(track, experts), "kl": kl_to_router(track, probs.cpu())}


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    trace = args.trace_obj
    with checkpoint_errors_exit():         # the weights (config.json was checked with the arguments)
        model = load_model(args.model, args.device, args.dtype)
    check_model_matches(trace, model, args.trace, args.model)
    hidden, experts = trace.hidden_states, trace.experts
    if args.train_tokens:
        train_h = capture_hidden_states(args.model, args.train_tokens, args.corpus, device=args.device,
                                        dtype=model.dtype, seed=args.seed)
        held_h, held_e = hidden, experts[:len(hidden)]
        source = f"{len(train_h)} tokens of the training split of {args.corpus}"
    else:
        n_train = int(round(len(hidden) * (1.0 - args.holdout)))
        if not 0 < n_train < len(hidden):
            raise ValueError(f"{args.trace}: {len(hidden)} recorded tokens cannot be split with --holdout "
                             f"{args.holdout}; record more steps")
        train_h, held_h, held_e = hidden[:n_train], hidden[n_train:], experts[n_train:len(hidden)]
        source = f"the first {n_train} tokens of {args.trace}"
    n_train = len(train_h)
    routers = FrozenRouters(model)
    routers.folded = routers.folded.to(args.device)
    untrained = LookaheadGate(routers, args.depth, args.rank, args.seed).eval()
    before = evaluate(untrained, held_h, held_e)
    t_train = time.perf_counter()
    gate = train_lookahead_gate(model, train_h, args.depth, args.rank, args.steps, args.lr, args.seed,
                                args.device, args.batch_size, log_every=max(args.steps // 10, 1),
                                val_hidden_states=held_h)
    train_s = time.perf_counter() - t_train
    after = evaluate(gate, held_h, held_e)
    report = {"trace": str(args.trace), "model": str(args.model), "train_tokens": n_train, "train_source": source,
              "held_out_tokens": len(held_h), "steps": args.steps, "lr": args.lr, "seed": args.seed,
              "device": args.device, "train_s": round(train_s, 2), "parameters": gate.num_parameters,
              "flops_per_token": gate.flops_per_token(), "held_out": {"pregate": before, "lookahead": after}}
    gate.save(args.out, extra=report)
    print(f"gate: {gate.num_parameters:,} parameters, {gate.flops_per_token():,} FLOPs per token, "
          f"trained {args.steps} steps in {train_s:.1f}s on {n_train} tokens")
    print(f"held out ({len(held_h)} tokens)   " + "  ".join(f"d={d}" for d in range(1, args.depth + 1)) + "   KL")
    for name, r in (("untrained (pre-gate)", before), ("lookahead gate", after)):
        print(f"  {name:22s} " + "  ".join(f"{x:.3f}" for x in r["recall"]) + f"   {r['kl']:.5f}")
    print(f"-> {args.out} in {time.perf_counter() - t0:.1f}s")
    print(json.dumps({"held_out": report["held_out"]}))
    return report


if __name__ == "__main__":
    main()
