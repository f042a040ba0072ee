"""The live predictors the engine's predictive policies consult, trained and scored: Madan et al.'s
default vectors and two lookahead gates (plain, and one that also reads the previous token's residual,
scored offline only) learn from hidden states of training-split text; every predictor's recall is
scored on the recorded (held-out) decode and on held-out text teacher-forced; the recorded trace gets
one prediction track per live predictor, so the simulator replays exactly what they say.

Only what is asked is built: ``consulted(policies)`` names the live predictors the policies consult
(``offload.predictors.predictor_name``); ``train_predictors`` captures, trains and scores those (the
lookahead gate's minutes of training only when a policy consults it), and the whole suite (every live
predictor and the offline context gate) only when told to (``offline=True``; ``engine_bench live
--recall``)."""
from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from offload.predictors import predictor_name
from policies.registry import resolve_policy
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


# The live predictors the engine can give a policy, by the name a policy class's ``track`` says.
LIVE_PREDICTORS = ("pregate", "quasi", "lookahead")


def consulted(policies: Iterable[str]) -> set[str]:
    """The live predictors ``policies`` (registry names, ``file.py:Class`` or ``module:Class``) consult: each
    class's ``offload.predictors.predictor_name``; empty when none is predictive (LRU, Belady, ...)."""
    return {n for n in (predictor_name(resolve_policy(p), {}) for p in policies) if n is not None}


def live_predictors(host: MoEModel, vectors, gate: LookaheadGate | None, depth: int,
                    names: Collection[str] | None = None) -> Callable[[int], dict]:
    """``at(d)``: the live predictors for a policy that looks ``d`` layers ahead (pre-gate, quasi-hidden
    pre-gate from ``vectors``, and the lookahead gate when there is one), built once per depth used; only
    those in ``names`` (default: all three; the quasi-hidden one needs ``vectors``, the gate ``gate``). A
    one-layer policy gets one-layer predictors: the live cost of the deeper ones (three chained
    quasi-hidden steps, a [3E, H] matvec) would be paid for rows it never reads."""
    names = set(LIVE_PREDICTORS if names is None else names)

    def at_depth(d: int) -> dict:
        predictors = {}
        if "pregate" in names:
            predictors["pregate"] = PreGate(host, d)
        if "quasi" in names and vectors is not None:
            predictors["quasi"] = QuasiHiddenPreGate(host, vectors, d)
        if "lookahead" in names and gate is not None:
            predictors["lookahead"] = LookaheadGatePredictor(gate)
        return predictors

    built = {depth: at_depth(depth), 1: at_depth(1)}
    return lambda d: built[1] if d == 1 else built[depth]


def train_predictors(host: MoEModel, model_dir: Path, corpus: Path, recorded: Trace, settings: PredictorSettings,
                     name: str, out: Path, work: Path, names: Collection[str] = LIVE_PREDICTORS,
                     offline: bool = True) -> tuple[Callable[[int], dict], Trace]:
    """Train and score the live predictors ``names`` of ``host`` (the checkpoint at ``model_dir``; of
    ``LIVE_PREDICTORS``, e.g. ``consulted(policies)``) and, with ``offline``, the context gate (scored on
    held-out text only). Returns (``live_predictors``' ``at`` for ``names``, ``recorded`` with their
    tracks). Training-split hidden states are captured for what needs them: the gates'
    ``gate_train_tokens`` + ``gate_val_tokens`` when a gate is trained, else ``vector_tokens`` for the
    quasi-hidden pre-gate's default vectors (a draw of their own, as ``experiments.measure_policies``
    draws them; with a gate, the first ``vector_tokens`` of the gate's), else none. Writes OUT/gate_recall.csv (recall per predictor
    and distance, with the trained gates' size, FLOPs per token and training time; the affinity
    baseline's rows beside them) and the plain gate, when trained, to WORK/<name>-gate. With no names and
    not ``offline`` nothing is captured, trained or written: (no predictors, ``recorded``)."""
    s = settings
    unknown = set(names) - set(LIVE_PREDICTORS)
    if unknown:
        raise ValueError(f"no live predictor {sorted(unknown)}; the engine's are {', '.join(LIVE_PREDICTORS)}")
    names = [n for n in LIVE_PREDICTORS if n in set(names)]
    if not names and not offline:
        return live_predictors(host, None, None, s.depth, ()), recorded
    trained = (["lookahead"] if "lookahead" in names else []) + (["lookahead-context"] if offline else [])
    train_h = val_h = None
    if trained:
        # The gate's validation text (for keeping its best step) is carved from the training split: the
        # text recall is scored on must not choose the gate.
        captured = capture_hidden_states(model_dir, s.gate_train_tokens + s.gate_val_tokens, corpus,
                                         device=str(host.device), dtype=host.dtype, seed=s.seed, window=CAPTURE_WINDOW)
        n_train = (len(captured) - s.gate_val_tokens) // CAPTURE_WINDOW * CAPTURE_WINDOW    # whole windows each
        train_h, val_h = captured[:n_train], captured[n_train:]
        del captured
    elif "quasi" in names:
        train_h = capture_hidden_states(model_dir, s.vector_tokens, corpus, device=str(host.device),
                                        dtype=host.dtype, seed=s.seed, window=CAPTURE_WINDOW)
    text_h = capture_hidden_states(model_dir, s.recall_tokens, corpus, device=str(host.device), dtype=host.dtype,
                                   seed=s.seed, split="held_out", window=CAPTURE_WINDOW)
    vectors = default_vectors(host, train_h[:s.vector_tokens]) if "quasi" in names else None
    gates, gate_s = {}, {}
    for key in trained:
        start = time.perf_counter()
        print(f"training {key}", flush=True)
        gates[key] = train_lookahead_gate(host, train_h, s.depth, s.gate_rank, s.gate_steps, s.gate_lr, s.seed,
                                          host.device, s.gate_batch, log_every=max(s.gate_steps // 20, 1),
                                          val_hidden_states=val_h, keep_best=True,
                                          context=key == "lookahead-context", window=CAPTURE_WINDOW)
        gate_s[key] = round(time.perf_counter() - start, 2)
        print(f"{key}: trained in {gate_s[key]} s", flush=True)
    gate = gates.get("lookahead")
    del train_h, val_h
    at = live_predictors(host, vectors, gate, s.depth, names)
    predictors = at(s.depth)
    tracked, recall = compute_tracks(recorded, predictors, s.depth, f"{name}: held-out decode")
    # The context gate scores offline only (the engine keeps no previous-token state yet): text rows only.
    offline_predictors = dict(predictors)
    if "lookahead-context" in gates:
        offline_predictors["lookahead-context"] = LookaheadGatePredictor(gates["lookahead-context"], CAPTURE_WINDOW)
    recall.extend(text_recall(offline_predictors, text_h, s.depth, f"{name}: held-out text, teacher-forced"))
    del text_h
    recall.extend(affinity_recall(DEFAULT_TRACE, s.depth))
    table = pd.DataFrame(recall, columns=RECALL_COLUMNS)
    # The trained gates' own size and cost on their rows; the other predictors have no parameters.
    table["gate_parameters"] = table["predictor"].map(lambda k: gates[k].num_parameters if k in gates else 0)
    table["gate_flops_per_token"] = table["predictor"].map(lambda k: gates[k].flops_per_token() if k in gates else 0)
    table["gate_train_s"] = table["predictor"].map(lambda k: gate_s.get(k, 0.0))
    atomic_write(Path(out) / "gate_recall.csv", lambda f: table.to_csv(f, index=False))
    print(table.to_string(index=False), flush=True)
    if gate is not None:
        gate.save(Path(work) / f"{name}-gate", extra={"train_tokens": s.gate_train_tokens, "steps": s.gate_steps,
                                                      "train_s": gate_s["lookahead"], "recall": recall})
    return at, tracked
