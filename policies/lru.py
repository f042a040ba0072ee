"""On-demand fetching with least-recently-used eviction (mixtral-offloading's cache).

Recency is a counter stamped on every access and every insert; the victim is the evictable expert
with the oldest stamp. The candidates come from the cache itself (``cache.evictable``), so the policy
keeps no list of what is resident.
"""
from __future__ import annotations

from offload.cache import CacheView
from offload.policy import LayerAccess, Policy, PolicyContext


class LRU(Policy):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self._stamp: dict[int, int] = {}    # key -> when it was last used or inserted
        self._clock = 0

    def touch(self, key: int) -> None:
        """Make ``key`` the most recently used."""
        self._clock += 1
        self._stamp[key] = self._clock

    def on_access(self, access: LayerAccess, index: int, key: int, hit: bool) -> None:
        self.touch(key)

    def on_insert(self, key: int) -> None:
        self.touch(key)

    def recency_order(self, scope: int, cache: CacheView) -> list[int]:
        """The evictable keys of ``scope``, least recently used first."""
        return sorted(cache.evictable(scope), key=self._stamp.__getitem__)

    def choose_victim(self, scope, cache: CacheView, job):
        candidates = cache.evictable(scope)
        return min(candidates, key=self._stamp.__getitem__) if candidates else None
