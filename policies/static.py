"""Static placement: pin each layer's most frequently chosen experts, learned from a training slice.

``cache_slots - top_k`` experts per layer are pinned; the remaining ``top_k`` slots serve the misses
(LRU), since a layer's chosen experts must be resident together. All slots start filled (the pinned
experts, then the next most frequent), as a deployment would load them with the model.
"""
from __future__ import annotations

import numpy as np

from offload.cache import CacheMode
from offload.policy import PolicyContext
from policies.lru import LRU


class Static(LRU):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        train = ctx.require_train_trace("static")
        L, E, K = ctx.num_layers, ctx.num_experts, ctx.top_k
        counts = np.zeros((L, E), dtype=np.int64)
        for layer in range(L):
            counts[layer] = np.bincount(train.experts[:, layer, :].ravel(), minlength=E)[:E]
        # Ties broken by expert id so the choice is deterministic.
        keys = np.arange(L * E).reshape(L, E)
        if ctx.cache_mode is CacheMode.PER_LAYER:
            ranked = [keys[l][np.lexsort((np.arange(E), -counts[l]))].tolist() for l in range(L)]
            self._preload = [(k, i < ctx.cache_slots - K)
                             for layer_keys in ranked for i, k in enumerate(layer_keys[:ctx.cache_slots])]
        else:
            flat = counts.ravel()
            ranked = keys.ravel()[np.lexsort((np.arange(L * E), -flat))].tolist()
            total = ctx.cache_slots * L
            self._preload = [(k, i < total - K) for i, k in enumerate(ranked[:total])]

    def preload(self) -> list[tuple[int, bool]]:
        return self._preload
