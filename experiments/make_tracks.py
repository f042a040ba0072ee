"""Compute prediction tracks from a recorded run, so the simulator replays the live predictors.

    python -m experiments.make_tracks --trace RECORDED.npz --model CHECKPOINT_DIR [--gate GATE_DIR] \
        --depth 3 --out TRACED.npz [--recall-csv gate_recall.csv] [--affinity-trace SAMPLE.npz]

``--train-tokens N`` computes Madan et al.'s default vectors from N tokens of the corpus's training
split (``real.hidden_capture``) rather than from the recording itself, so that the quasi track is
scored on text its vectors never saw. RECORDED.npz is an engine recording with hidden states (``OffloadEngine(record_hidden_steps=N)`` then
``real.record.routing_trace``). The output holds the tokens that have hidden states (the first N steps),
with the tracks ``pregate`` (multi-layer pre-gate, D rows), ``quasi`` (Madan et al.'s quasi-hidden
state, default vectors from the same recorded tokens) and, with ``--gate``, ``lookahead``: float16
[T, L, D, E] probabilities for the experts of layers l+1..l+D. The recall CSV has one row per predictor
and distance: the fraction of the routed top-k at layer l+d found in the predicted top-k, averaged over
tokens and source layers with l+d < L. ``--affinity-trace`` adds the trace-only affinity predictor
(``policies.affinity``), trained on the first 25 % of that trace's requests and scored on the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from policies.affinity import AffinityPredictor
from real.checkpoint import load_checkpoint
from real.corpus import DEFAULT_CORPUS_DIR
from real.hidden_capture import capture_hidden_states
from real.lookahead_gate import LookaheadGate
from real.model import MoEModel
from real.predictors import (TRACK_CHUNK, LookaheadGatePredictor, PreGate, QuasiHiddenPreGate, default_vectors,
                             track_recall)
from traces import Trace, load_trace, save_trace
from traces.io import atomic_write

AFFINITY_TRAIN_FRACTION = 0.25
RECALL_COLUMNS = ["predictor", "distance", "recall", "tokens", "source"]


def load_model(path, device: str, dtype: str | None = None) -> MoEModel:
    """The checkpoint with its experts on the host (the tracks need only routers and, once, each expert)."""
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    config, tensors = load_checkpoint(path, dtype)
    return MoEModel(config, tensors, device=device, dtype=dtype, experts_device="cpu", max_len=1)


def recorded_tokens(trace: Trace, path) -> Trace:
    """The leading tokens that have hidden states, as a trace of their own (every track must cover every
    token). Engine recordings hold steps 0..N-1; anything else is refused here, at the boundary."""
    if trace.hidden_states is None or len(trace.hidden_token_index) == 0:
        raise ValueError(f"{path}: hidden_states: none recorded; record the run with "
                         f"OffloadEngine(record_hidden_steps=N) (experiments.engine_bench --hidden-steps N)")
    index = trace.hidden_token_index
    N = len(index)
    if not np.array_equal(index, np.arange(N)):
        raise ValueError(f"{path}: hidden_token_index: not the leading steps 0..{N - 1}; tracks need hidden "
                         f"states for a contiguous prefix, as the engine records them")
    starts = [int(s) for s in trace.request_starts if s < N] + [N]
    text_bytes = text_offsets = None
    if trace.text_offsets is not None:
        text_offsets = trace.text_offsets[:N + 1]
        text_bytes = trace.text_bytes[:int(text_offsets[-1])]
    return dataclasses.replace(
        trace, experts=trace.experts[:N], weights=trace.weights[:N],
        request_starts=np.asarray(starts, dtype=np.int64),
        router_probs=None if trace.router_probs is None else trace.router_probs[:N],
        predictions={k: v[:N] for k, v in trace.predictions.items()},
        timings={k: v[:N] for k, v in trace.timings.items()},
        text_bytes=text_bytes, text_offsets=text_offsets)


def check_model_matches(trace: Trace, model: MoEModel, trace_path, model_path) -> None:
    c, s = model.config, trace.model
    want = (c.num_layers, c.num_experts, c.top_k, c.hidden_size)
    got = (s.num_layers, s.num_experts, s.top_k, s.hidden_size)
    if want != got:
        raise ValueError(f"{trace_path}: __meta__.model (layers, experts, top_k, hidden) = {got}, but "
                         f"{model_path} has {want}; pass the checkpoint the trace was recorded with")


@torch.no_grad()
def text_recall(predictors: dict, hidden: np.ndarray, depth: int, source: str) -> list[dict]:
    """Recall of each live predictor on teacher-forced text: ``hidden`` [N, L, H] is h_l captured by
    ``real.hidden_capture`` (held-out split), and the routing that happened is each layer's own router
    top-k on its h_l. Thousands of tokens in one batched forward, where a decode recording gives hundreds."""
    routers = next(iter(predictors.values())).routers
    hs = torch.as_tensor(np.asarray(hidden))
    N, L = hs.shape[:2]
    experts = np.zeros((N, L, routers.top_k), dtype=np.int64)
    for start in range(0, N, TRACK_CHUNK):
        chunk = hs[start:start + TRACK_CHUNK].to(device=routers.folded.device, dtype=torch.float32)
        for layer in range(L):
            experts[start:start + len(chunk), layer] = routers.choose(routers.logits(layer, chunk[:, layer]))[0].cpu().numpy()
    rows = []
    for name, predictor in predictors.items():
        track = predictor.track(hidden)[:, :, :depth]
        rows.extend({"predictor": name, "distance": d, "recall": r, "tokens": N, "source": source}
                    for d, r in enumerate(track_recall(track, experts), start=1))
    return rows


def affinity_recall(path, depth: int) -> list[dict]:
    """Recall of ``policies.affinity.AffinityPredictor`` learnt on the first 25 % of the requests of the
    trace at ``path`` and scored on the rest."""
    train, test = load_trace(path).split(AFFINITY_TRAIN_FRACTION)
    E = test.num_experts
    predictor = AffinityPredictor(train.experts, E, depth)
    T, L, K = test.experts.shape
    experts = test.experts.tolist()
    track = np.zeros((T, L, depth, E), dtype=np.float32)
    for t in range(T):
        for layer in range(L):
            for d in range(1, min(depth, L - 1 - layer) + 1):
                track[t, layer, d - 1] = predictor.scores(layer, experts[t][layer], d)
    return [{"predictor": "affinity", "distance": d, "recall": r, "tokens": T, "source": str(path)}
            for d, r in enumerate(track_recall(track, test.experts), start=1)]


def compute_tracks(trace: Trace, predictors: dict, depth: int, source: str) -> tuple[Trace, list[dict]]:
    """``trace`` (every token with hidden states) plus one prediction track per predictor, float16
    [T, L, depth, E], and the recall rows of each track against the routing that happened."""
    tracks, rows = {}, []
    for name, predictor in predictors.items():
        tracks[name] = predictor.track(trace.hidden_states)[:, :, :depth].astype(np.float16)
        # recall of the stored (float16) scores: what the simulator will replay, ties included
        for d, r in enumerate(track_recall(tracks[name], trace.experts), start=1):
            rows.append({"predictor": name, "distance": d, "recall": r, "tokens": trace.num_tokens,
                         "source": source})
    return dataclasses.replace(trace, predictions={**trace.predictions, **tracks}), rows


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
