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

Every value is checked before the model loads (the files, the checkpoint's config.json, the recording's hidden
states and shape against it, ``--depth`` at most the model's layers - 1: deeper rows would predict no layer);
a bad one is refused with one line naming the argument and the fix, exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from real.bench.args import (check_kernel_switches, DTYPES, add_device_arg, checked_config, checkpoint_errors_exit, device_default,
                             existing_dir, existing_file, non_negative_int, positive_int)
from real.bench.text import load_text
from real.corpus import DEFAULT_CORPUS_DIR
from real.hidden_capture import capture_hidden_states
from real.lookahead_gate import LookaheadGate
from real.predictors import LookaheadGatePredictor, PreGate, QuasiHiddenPreGate, default_vectors
from real.tracks import (AFFINITY_TRAIN_FRACTION, RECALL_COLUMNS, affinity_recall, check_model_matches,
                         compute_tracks, load_model, recorded_tokens)
from traces import TraceError, load_trace, save_trace
from traces.io import atomic_write, output_problem


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, type=existing_file, help="engine recording with hidden states")
    p.add_argument("--model", required=True, type=existing_dir, help="the checkpoint it was recorded with")
    p.add_argument("--gate", type=existing_dir, help="a trained lookahead gate (experiments.train_gate --out)")
    p.add_argument("--depth", type=positive_int, default=3,
                   help="tracks for layers l+1..l+DEPTH (at most the model's layers - 1)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--recall-csv", type=Path)
    p.add_argument("--affinity-trace", type=existing_file, help="add affinity's recall on this trace to the CSV")
    p.add_argument("--train-tokens", type=non_negative_int, default=0,
                   help="default vectors from this many tokens of the corpus's training split (0: from the recording)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR, help="with --train-tokens: the corpus")
    add_device_arg(p)
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every value, before the model loads: ``p.error`` naming the argument and the fix. Sets ``args.trace_obj``
    (the recorded tokens that have hidden states) and ``args.config`` (the checkpoint's ``MoEConfig``)."""
    device_default(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu)")
    check_kernel_switches(p, args)
    for flag, path in (("--out", args.out), ("--recall-csv", args.recall_csv)):
        if path is not None and (problem := output_problem(path, "file")):
            p.error(f"{flag} {path}: {problem}")
    args.config = checked_config(p, args.model)
    layers = args.config.num_layers
    if layers < 2:
        p.error(f"--model {args.model}: has {layers} layer, so no later layer to predict; tracks need a model of "
                f"at least 2 layers")
    if args.depth > layers - 1:
        p.error(f"--depth {args.depth}: {args.model} has {layers} layers, so a track looks at most {layers - 1} "
                f"layer(s) ahead; use --depth 1..{layers - 1}")
    try:
        args.trace_obj = recorded_tokens(load_trace(args.trace), args.trace)
        # the recording against the checkpoint's config (all check_model_matches reads of a model)
        check_model_matches(args.trace_obj, SimpleNamespace(config=args.config), args.trace, args.model)
    except ValueError as err:       # TraceError included: a truncated or broken file, no hidden states
        p.error(f"--trace {' '.join(str(err).split())}")
    if args.affinity_trace is not None:
        try:
            _, test = load_trace(args.affinity_trace).split(AFFINITY_TRAIN_FRACTION)
        except TraceError as err:   # a broken file: the message names it, the field and the fix
            p.error(f"--affinity-trace {' '.join(str(err).split())}")
        except ValueError as err:   # split: affinity learns from the first requests, is scored on the rest
            p.error(f"--affinity-trace {args.affinity_trace}: {err}; give a trace of several requests")
        if args.depth > test.num_layers - 1:
            p.error(f"--depth {args.depth}: --affinity-trace {args.affinity_trace} has {test.num_layers} layers; "
                    f"use --depth 1..{test.num_layers - 1} with it")
    if args.train_tokens:           # the default vectors come from the corpus, through the model's tokenizer
        if not args.corpus.is_dir():
            p.error(f"--corpus {args.corpus}: no such folder (--train-tokens reads its training split); pass a copy "
                    f"of shared/data/corpus/")
        try:
            load_text(args.model, args.corpus)
        except FileNotFoundError as err:        # load_corpus: the files the folder lacks, and --corpus
            p.error(" ".join(str(err).split()))
        except (OSError, ValueError) as err:    # transformers: no tokenizer files in the checkpoint folder
            p.error(f"--model {args.model}: no tokenizer loads from it ({type(err).__name__}), and --train-tokens "
                    f"needs one; save the model's tokenizer into the folder, or drop --train-tokens")


def _refuse(message: str):
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    trace = args.trace_obj
    with checkpoint_errors_exit():          # the weights (config.json was checked with the arguments)
        model = load_model(args.model, args.device, args.dtype)
    gate = None
    if args.gate:
        try:
            gate = LookaheadGate.load(args.gate, model)
        except (OSError, ValueError) as err:        # files missing, another format, another model's gate
            _refuse(f"--gate {err}")
        if gate.depth < args.depth:
            _refuse(f"--gate {args.gate}: the gate looks {gate.depth} layers ahead, not --depth {args.depth}; "
                    f"retrain it with --depth {args.depth}, or pass --depth {gate.depth}")
    hidden = trace.hidden_states
    if args.train_tokens:
        vector_hidden = capture_hidden_states(args.model, args.train_tokens, args.corpus, device=args.device,
                                              dtype=model.dtype)
    else:
        vector_hidden = hidden
    predictors = {"pregate": PreGate(model, args.depth),
                  "quasi": QuasiHiddenPreGate(model, default_vectors(model, vector_hidden), args.depth)}
    if gate is not None:
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
    # the input's other tracks stay in the output (compute_tracks merges): say so, or a user reads them as dropped
    kept = sorted(set(out.predictions) - set(predictors))
    print(f"-> {args.out} ({trace.num_tokens} tokens, tracks computed {sorted(predictors)}"
          + (f", kept from {args.trace}: {kept}" if kept else "") + f") in {time.perf_counter() - t0:.1f}s")
    return rows


if __name__ == "__main__":
    main()
