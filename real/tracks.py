"""Prediction tracks of a recorded run and the recall of live and trace-only predictors.

A track is one predictor's float16 scores [T, L, D, E] for the experts of layers l+1..l+D at every
recorded token, computed from the hidden states the engine recorded (``OffloadEngine(record_hidden_steps=N)``
then ``real.record.routing_trace``), so the simulator replays exactly what the live predictor said.
Recall rows (``RECALL_COLUMNS``) give, per predictor and distance d, the fraction of the routed top-k
at layer l+d found in the predicted top-k, averaged over tokens and source layers with l+d < L.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from policies.affinity import AffinityPredictor
from real.checkpoint import load_checkpoint
from real.model import MoEModel
from real.predictors import TRACK_CHUNK, track_recall
from traces import Trace, load_trace

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
                         f"OffloadEngine(record_hidden_steps=N) (python -m experiments.record)")
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
    """Raises ValueError unless ``trace`` was recorded with a model of ``model``'s layers, experts, top-k and
    hidden size (tracks and gates read its hidden states through ``model``'s routers)."""
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
