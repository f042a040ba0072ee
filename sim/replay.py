"""Replay without a clock: the same controller, every copy finishing the instant it starts.

Hit counts of on-demand policies do not depend on timing (a layer's demand fetches all finish
before the next layer routes), so this gives them cheaply; ``belady_hit_fraction`` divides a
policy's hits by Belady's from here.
"""
from __future__ import annotations

from offload.policy import Policy, PolicyContext
from offload.cache import CacheMode, ExpertCache
from offload.controller import OffloadController, OffloadStats
from offload.predictors import track_predictor
from traces import Trace


def replay_untimed(trace: Trace, policy_cls: type[Policy], cache_slots: int,
                   cache_mode: CacheMode | str = CacheMode.PER_LAYER, prefetch_depth: int = 1,
                   train_trace: Trace | None = None, policy_params: dict | None = None) -> OffloadStats:
    shape = trace.model
    cache = ExpertCache(shape.num_layers, shape.num_experts, cache_slots, cache_mode, shape.top_k)
    params = dict(policy_params or {})
    # No clock, so no copy or compute estimates: predictive policies run without a depth limit.
    ctx = PolicyContext(shape, cache_slots, CacheMode(cache_mode), prefetch_depth, trace, train_trace,
                        params, predictor=track_predictor(policy_cls, trace, prefetch_depth, params))
    ctrl = OffloadController(policy_cls(ctx), cache, expert_bytes=1)
    ctrl.preload()
    L = trace.num_layers
    for t in range(trace.num_tokens):
        routes = trace.experts[t].tolist()
        weights = trace.weights[t].tolist()
        for layer in range(L):
            run = ctrl.executed_experts(t, layer, routes[layer], weights[layer])
            needs = ctrl.begin_layer(t, layer, run, weights[layer], 0)
            while (job := ctrl.next_copy(0)) is not None:    # this layer's demand fetches
                ctrl.copy_done(job, 0)
            ctrl.prefetch_layer(0)
            while (job := ctrl.next_copy(0)) is not None:    # then prefetches
                ctrl.copy_done(job, 0)
            ctrl.end_layer(needs)
    return ctrl.stats
