"""Predictors: what policies consult to guess the experts of later layers.

One interface, two kinds of source. In the simulator a predictor reads a *prediction track* that
was computed from a recorded run (``trace.predictions[name]``, [T, L, D, E]); in the engine the same
policy gets a live predictor (``real.predictors``) that reads the hidden state of the run itself.
Either way a policy sees ``scores(access)``: one row of E scores for each of the layers
``access.layer + 1 .. access.layer + depth`` (rows past the last layer are meaningless).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from policies.base import LayerAccess


class Predictor(Protocol):
    depth: int

    def scores(self, access: LayerAccess) -> np.ndarray:
        """[depth, num_experts] scores for the experts of layers l+1..l+depth (higher = likelier)."""
        ...


class TrackPredictor:
    """Reads a prediction track recorded in the trace being replayed."""

    def __init__(self, trace, name: str, depth: int | None = None):
        if name not in trace.predictions:
            have = ", ".join(sorted(trace.predictions)) or "none"
            raise ValueError(f"trace {trace.model.name!r} has no prediction track {name!r} (it has: {have}); "
                             f"compute tracks from a recorded run with hidden states "
                             f"(python -m experiments.make_tracks)")
        self.track = trace.predictions[name]                      # [T, L, D, E]
        available = self.track.shape[2]
        self.depth = available if depth is None else depth
        if self.depth > available:
            raise ValueError(f"prediction track {name!r} looks {available} layers ahead, not {self.depth}; "
                             f"use prefetch_depth <= {available}")

    def scores(self, access: LayerAccess) -> np.ndarray:
        return self.track[access.token, access.layer, :self.depth]


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest scores, best first (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")
    return order[:k].tolist()
