"""Predictors: what policies consult to guess the experts of later layers.

One interface, two kinds of source. In the simulator a predictor reads a *prediction track* that
was computed from a recorded run (``trace.predictions[name]``, [T, L, D, E]); in the engine the same
policy gets a live predictor (``real.predictors``) that reads the hidden state of the run itself.
Either way a policy sees ``scores(access)``: one row of E scores for each of the layers
``access.layer + 1 .. access.layer + depth`` (rows past the last layer are meaningless).
"""
from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np

from offload.access import LayerAccess


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


def predictor_name(policy_cls: type, params: Mapping) -> str | None:
    """The predictor ``policy_cls`` consults: the one its ``track`` names (``predictor=<name>`` in
    ``params`` overrides it); None for a policy that names none. The simulator reads the trace's
    prediction track of that name, the engine the live predictor of that name: one name, two sources."""
    name = getattr(policy_cls, "track", None)
    return None if name is None else params.get("predictor", name)


def policy_depth(policy_cls: type, prefetch_depth: int) -> int:
    """How far ahead ``policy_cls`` looks: ``prefetch_depth``, capped by the class's ``max_depth``."""
    max_depth = getattr(policy_cls, "max_depth", None)
    return prefetch_depth if max_depth is None else min(prefetch_depth, max_depth)


def predictor_for(policy_cls: type, params: Mapping, prefetch_depth: int, *, trace=None,
                  live: Mapping[str, Predictor] | None = None) -> Predictor | None:
    """The predictor a run gives ``policy_cls``, None for a policy that names none
    (``predictor_name``). With ``live`` (the engine: live predictors by name) the one of that name;
    otherwise (the simulator, the untimed replay) a reader of ``trace``'s prediction track of that
    name, looking as far ahead as the policy will. Raises ValueError naming what is missing."""
    name = predictor_name(policy_cls, params)
    if name is None:
        return None
    if live is None:
        return TrackPredictor(trace, name, policy_depth(policy_cls, prefetch_depth))
    if name not in live:
        have = ", ".join(sorted(live)) or "none"
        raise ValueError(f"policy {policy_cls.__name__} consults the predictor {name!r}, but the engine was "
                         f"given {have}; pass predictors={{{name!r}: ...}} (real.predictors; a lookahead gate "
                         f"comes from python -m experiments.train_gate)")
    return live[name]
