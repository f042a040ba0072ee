"""On-demand fetching, evicting the least frequently used expert (ties: least recently used).

Frequencies count every access since the run started, resident or not ("perfect" LFU), so an
expert evicted and fetched again keeps its history.
"""
from __future__ import annotations

from offload.policy import LayerAccess, PolicyContext
from offload.cache import CacheView
from policies.lru import LRU


class LFU(LRU):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self._count: dict[int, int] = {}
        self._last: dict[int, int] = {}

    def on_access(self, access: LayerAccess, index: int, key: int, hit: bool) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = access.step
        super().on_access(access, index, key, hit)

    def choose_victim(self, scope, cache: CacheView, job):
        count, last = self._count, self._last
        candidates = cache.evictable(scope)
        if not candidates:
            return None
        return min(candidates, key=lambda k: (count.get(k, 0), last.get(k, -1), k))
