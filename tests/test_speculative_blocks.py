"""The speculative policies' replayed path (``SpeculativePrefetch._chosen_replayed``: the top-k of a block of
tokens from one sort of a recorded track) decides exactly as sorting each decision's scores on its own
(``_chosen``, the path a live predictor takes)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, strategies as st

from hardware.profile import load_hardware
from offload.policy import PolicyContext
from offload.predictors import TrackPredictor
from offload.session import RunSettings
from policies.registry import resolve_policy
from policies.speculative import SpeculativePrefetch
from sim.simulator import simulate
from traces import synthetic_trace

SPECULATIVE = ("lookahead", "mixtral-offloading", "speculating-experts", "speculating-experts-lossy")
TRACKS = ("lookahead", "pregate", "quasi")


def with_tied_tracks(trace, depth: int, seed: int):
    """Every prediction track of ``trace``'s shape, scores drawn from a few values: ties are common, and a
    block must break them as one decision's sort does (the lower expert id first)."""
    rng = np.random.default_rng(seed)
    T, L, E = trace.num_tokens, trace.num_layers, trace.model.num_experts
    tracks = {name: rng.integers(0, 3, size=(T, L, depth, E)).astype(np.float32) for name in TRACKS}
    return dataclasses.replace(trace, predictions=tracks)


@given(layers=st.integers(2, 5), experts=st.integers(2, 8), top_k=st.integers(1, 2), depth=st.integers(1, 4),
       tokens=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_a_block_of_tokens_chooses_as_each_decision_does(layers, experts, top_k, depth, tokens, seed):
    top_k = min(top_k, experts)
    trace = with_tied_tracks(synthetic_trace(num_tokens=tokens, num_layers=layers, num_experts=experts, top_k=top_k,
                                             num_requests=1, seed=seed % 97), depth, seed)
    predictor = TrackPredictor(trace, "lookahead", depth)
    policy = resolve_policy("lookahead")(PolicyContext(trace.model, top_k, "per_layer", depth, trace,
                                                       predictor=predictor))
    assert policy._track is not None
    for t in range(tokens):
        for layer in range(layers):
            for d in range(1, min(policy.depth, layers - 1 - layer) + 1):
                rows = predictor.track[t, layer, :d]
                assert policy._chosen_replayed(t, layer, d) == policy._chosen(rows), (t, layer, d)


def _per_decision(self, token: int, layer: int, depth: int) -> list[list[int]]:
    """``_chosen_replayed`` as the reference: each decision's rows sorted on their own."""
    return self._chosen(self._track[token, layer, :depth])


@pytest.mark.parametrize("policy", SPECULATIVE)
@pytest.mark.parametrize("slots,depth,window", [(2, 1, 2), (3, 3, 1), (4, 2, None), (5, 3, 2)])
def test_replayed_blocks_give_the_results_of_per_decision_sorts(policy, slots, depth, window, monkeypatch):
    trace = with_tied_tracks(synthetic_trace(num_tokens=120, num_layers=5, num_experts=8, top_k=2, num_requests=3,
                                             seed=5, cross_layer_locality=0.6), depth, seed=slots * 10 + depth)
    hw = load_hardware("h100-pcie5")
    settings = RunSettings(cache_slots=slots, prefetch_depth=depth, copies_in_flight=window)
    block = simulate(trace, resolve_policy(policy), hw, settings, path="reference")
    monkeypatch.setattr(SpeculativePrefetch, "_chosen_replayed", _per_decision)
    each = simulate(trace, resolve_policy(policy), hw, settings, path="reference")
    assert block.stats == each.stats
    assert block.token_ns == each.token_ns
    assert block.metrics == each.metrics
    assert block.stats.prefetches > 0


def test_min_score_and_live_predictors_decide_one_by_one():
    trace = with_tied_tracks(synthetic_trace(num_tokens=8, num_layers=3, num_experts=4, top_k=2), 2, seed=1)
    ctx = PolicyContext(trace.model, 2, "per_layer", 2, trace, predictor=TrackPredictor(trace, "lookahead", 2),
                        params={"min_score": 1.0})
    assert resolve_policy("lookahead")(ctx)._track is None

    class Live:          # a predictor that is not a recorded track (the engine's)
        depth = 2

        def scores(self, access):
            return np.zeros((2, 4), dtype=np.float32)

    live = dataclasses.replace(ctx, params={}, predictor=Live())
    assert resolve_policy("lookahead")(live)._track is None
