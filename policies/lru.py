"""On-demand fetching with least-recently-used eviction (mixtral-offloading's cache)."""
from __future__ import annotations

from collections import OrderedDict

from policies.base import LayerAccess, Policy, PolicyContext
from policies.cache import ExpertCache


class LRU(Policy):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        n_scopes = ctx.num_layers if ctx.cache_mode.value == "per_layer" else 1
        self._order = [OrderedDict() for _ in range(n_scopes)]   # least recent first
        self._per_layer = n_scopes > 1
        self._E = ctx.num_experts

    def _scope(self, key: int) -> OrderedDict:
        return self._order[key // self._E if self._per_layer else 0]

    def on_access(self, access: LayerAccess, index: int, key: int, hit: bool) -> None:
        order = self._scope(key)
        if key in order:
            order.move_to_end(key)

    def on_insert(self, key: int) -> None:
        self._scope(key)[key] = None

    def on_evict(self, key: int) -> None:
        del self._scope(key)[key]

    def choose_victim(self, scope, cache: ExpertCache, job):
        is_evictable = cache.is_evictable
        for key in self._order[scope]:
            if is_evictable(key):
                return key
        return None
