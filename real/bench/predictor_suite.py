"""The live predictors the engine's predictive policies consult, trained and scored: Madan et al.'s
default vectors and two lookahead gates (plain, and one that also reads the previous token's residual,
scored offline only) learn from hidden states of training-split text; every predictor's recall is
scored on the recorded (held-out) decode and on held-out text teacher-forced; the recorded trace gets
one prediction track per live predictor, so the simulator replays exactly what they say."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from real.hidden_capture import CAPTURE_WINDOW, capture_hidden_states
from real.lookahead_gate import VAL_TOKENS, LookaheadGate, train_lookahead_gate
from real.model import MoEModel
from real.predictors import LookaheadGatePredictor, PreGate, QuasiHiddenPreGate, default_vectors
from real.tracks import RECALL_COLUMNS, affinity_recall, compute_tracks, text_recall
from traces import DEFAULT_TRACE, Trace
from traces.io import atomic_write


@dataclass(frozen=True)
class PredictorSettings:
    """How the predictors are trained and scored. ``depth``: layers ahead they predict;
    ``gate_train_tokens`` and ``gate_val_tokens``: training-split tokens the gates train on and, apart,
    pick their best step on; ``vector_tokens``: of the training tokens, those the default vectors
    average; ``recall_tokens``: held-out tokens every predictor's recall is scored on; ``gate_steps``,
    ``gate_rank``, ``gate_lr``, ``gate_batch`` (tokens per step): the gates' optimisation."""
    depth: int = 3
    gate_train_tokens: int = 131072
    gate_val_tokens: int = VAL_TOKENS
    vector_tokens: int = 4096
    recall_tokens: int = 8192
    gate_steps: int = 4000
    gate_rank: int = 64
    gate_lr: float = 1e-3
    gate_batch: int = 1024
    seed: int = 0


def live_predictors(host: MoEModel, vectors, gate: LookaheadGate | None, depth: int) -> Callable[[int], dict]:
    """``at(d)``: the live predictors for a policy that looks ``d`` layers ahead (pre-gate, quasi-hidden
    pre-gate from ``vectors``, and the lookahead gate when there is one), built once per depth used. A
    one-layer policy gets one-layer predictors: the live cost of the deeper ones (three chained
    quasi-hidden steps, a [3E, H] matvec) would be paid for rows it never reads."""
    def at_depth(d: int) -> dict:
        predictors = {"pregate": PreGate(host, d), "quasi": QuasiHiddenPreGate(host, vectors, d)}
        if gate is not None:
            predictors["lookahead"] = LookaheadGatePredictor(gate)
        return predictors

    built = {depth: at_depth(depth), 1: at_depth(1)}
    return lambda d: built[1] if d == 1 else built[depth]


def train_predictors(host: MoEModel, model_dir: Path, corpus: Path, recorded: Trace, settings: PredictorSettings,
                     name: str, out: Path, work: Path) -> tuple[Callable[[int], dict], Trace]:
    """Train and score the live predictors of ``host`` (the checkpoint at ``model_dir``). Returns
    (``live_predictors``' ``at``, ``recorded`` with their tracks). Writes OUT/gate_recall.csv (recall per
    predictor and distance, with the trained gates' size, FLOPs per token and training time) and the
    plain gate to WORK/<name>-gate."""
    s = settings
    # The gate's validation text (for keeping its best step) is carved from the training split: the text
    # recall is scored on must not choose the gate.
    captured = capture_hidden_states(model_dir, s.gate_train_tokens + s.gate_val_tokens, corpus,
                                     device=str(host.device), dtype=host.dtype, seed=s.seed, window=CAPTURE_WINDOW)
    n_train = (len(captured) - s.gate_val_tokens) // CAPTURE_WINDOW * CAPTURE_WINDOW    # whole windows each
    train_h, val_h = captured[:n_train], captured[n_train:]
    text_h = capture_hidden_states(model_dir, s.recall_tokens, corpus, device=str(host.device), dtype=host.dtype,
                                   seed=s.seed, split="held_out", window=CAPTURE_WINDOW)
    vectors = default_vectors(host, train_h[:s.vector_tokens])
    gates, gate_s = {}, {}
    for key, context in (("lookahead", False), ("lookahead-context", True)):
        start = time.perf_counter()
        print(f"training {key}", flush=True)
        gates[key] = train_lookahead_gate(host, train_h, s.depth, s.gate_rank, s.gate_steps, s.gate_lr, s.seed,
                                          host.device, s.gate_batch, log_every=max(s.gate_steps // 20, 1),
                                          val_hidden_states=val_h, keep_best=True, context=context,
                                          window=CAPTURE_WINDOW)
        gate_s[key] = round(time.perf_counter() - start, 2)
        print(f"{key}: trained in {gate_s[key]} s", flush=True)
    gate = gates["lookahead"]
    del captured, train_h, val_h
    at = live_predictors(host, vectors, gate, s.depth)
    predictors = at(s.depth)
    tracked, recall = compute_tracks(recorded, predictors, s.depth, f"{name}: held-out decode")
    # The context gate scores offline only (the engine keeps no previous-token state yet): text rows only.
    offline = {**predictors, "lookahead-context": LookaheadGatePredictor(gates["lookahead-context"], CAPTURE_WINDOW)}
    recall.extend(text_recall(offline, text_h, s.depth, f"{name}: held-out text, teacher-forced"))
    del text_h
    recall.extend(affinity_recall(DEFAULT_TRACE, s.depth))
    table = pd.DataFrame(recall, columns=RECALL_COLUMNS)
    # The trained gates' own size and cost on their rows; the other predictors have no parameters.
    table["gate_parameters"] = table["predictor"].map(lambda k: gates[k].num_parameters if k in gates else 0)
    table["gate_flops_per_token"] = table["predictor"].map(lambda k: gates[k].flops_per_token() if k in gates else 0)
    table["gate_train_s"] = table["predictor"].map(lambda k: gate_s.get(k, 0.0))
    atomic_write(Path(out) / "gate_recall.csv", lambda f: table.to_csv(f, index=False))
    print(table.to_string(index=False), flush=True)
    gate.save(Path(work) / f"{name}-gate", extra={"train_tokens": s.gate_train_tokens, "steps": s.gate_steps,
                                                  "train_s": gate_s["lookahead"], "recall": recall})
    return at, tracked
