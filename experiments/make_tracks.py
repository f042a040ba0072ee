"""Compute prediction tracks from a recorded run, so the simulator replays the live predictors.

    python -m experiments.make_tracks --trace RECORDED.npz --model CHECKPOINT_DIR [--gate GATE_DIR] \
        --depth 3 --out TRACED.npz [--recall-csv gate_recall.csv] [--affinity-trace SAMPLE.npz]

``--train-tokens N`` computes Madan et al.'s default vectors from N tokens of the corpus's training
split (``real.hidden_capture``) rather than from the recording itself, so that the quasi track is
scored on text its vectors never saw. RECORDED.npz is an engine recording with hidden states
(``python -m experiments.record``); the tracks and recall are computed by ``real.tracks``. The output
holds the tokens that have hidden states (the first N steps), with the tracks ``pregate`` (multi-layer
pre-gate, D rows), ``quasi`` (Madan et al.'s quasi-hidden state, default vectors from the same recorded
tokens) and, with ``--gate``, ``lookahead``: float16 [T, L, D, E] probabilities for the experts of
layers l+1..l+D. The recall CSV has one row per predictor and distance: the fraction of the routed top-k at layer l+d found in the predicted top-k, averaged over
tokens and source layers with l+d < L. ``--affinity-trace`` adds the trace-only affinity predictor
(``policies.affinity``), trained on the first 25 % of that trace's requests and scored on the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch

from real.corpus import DEFAULT_CORPUS_DIR
from real.hidden_capture import capture_hidden_states
from real.lookahead_gate import LookaheadGate
from real.predictors import LookaheadGatePredictor, PreGate, QuasiHiddenPreGate, default_vectors
from real.tracks import (RECALL_COLUMNS, affinity_recall, check_model_matches, compute_tracks, load_model,
                         recorded_tokens)
from traces import load_trace, save_trace
from traces.io import atomic_write


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=Path, help="engine recording with hidden states")
    p.add_argument("--model", required=True, type=Path, help="the checkpoint it was recorded with")
    p.add_argument("--gate", type=Path, help="a trained lookahead gate (experiments.train_gate --out)")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--recall-csv", type=Path)
    p.add_argument("--affinity-trace", type=Path, help="add affinity's recall on this trace to the CSV")
    p.add_argument("--train-tokens", type=int, default=0,
                   help="default vectors from this many tokens of the corpus's training split (0: from the recording)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR, help="with --train-tokens: the corpus")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    args = p.parse_args(argv)
    if args.depth < 1:
        p.error(f"--depth {args.depth}: must be at least 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    trace = recorded_tokens(load_trace(args.trace), args.trace)
    model = load_model(args.model, args.device, args.dtype)
    check_model_matches(trace, model, args.trace, args.model)
    hidden = trace.hidden_states
    if args.train_tokens:
        vector_hidden = capture_hidden_states(args.model, args.train_tokens, args.corpus, device=args.device,
                                              dtype=model.dtype)
    else:
        vector_hidden = hidden
    predictors = {"pregate": PreGate(model, args.depth),
                  "quasi": QuasiHiddenPreGate(model, default_vectors(model, vector_hidden), args.depth)}
    if args.gate:
        gate = LookaheadGate.load(args.gate, model)
        if gate.depth < args.depth:
            raise ValueError(f"{args.gate}: the gate looks {gate.depth} layers ahead, not --depth {args.depth}; "
                             f"retrain it with --depth {args.depth}")
        predictors["lookahead"] = LookaheadGatePredictor(gate)
    out, rows = compute_tracks(trace, predictors, args.depth, str(args.trace))
    if args.affinity_trace:
        rows.extend(affinity_recall(args.affinity_trace, args.depth))
    extra = dict(out.meta.extra, tracks={"model": str(args.model), "gate": str(args.gate) if args.gate else None,
                                         "depth": args.depth})
    out = dataclasses.replace(out, meta=dataclasses.replace(out.meta, extra=extra))
    save_trace(out, args.out)
    table = pd.DataFrame(rows, columns=RECALL_COLUMNS)
    if args.recall_csv:
        atomic_write(args.recall_csv, lambda f: table.to_csv(f, index=False))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"-> {args.out} ({trace.num_tokens} tokens, tracks {sorted(predictors)}) in {time.perf_counter() - t0:.1f}s")
    return rows


if __name__ == "__main__":
    main()
