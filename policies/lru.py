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
        self._clock = clock = self._clock + 1      # touch(key), inlined: once per routed expert
        self._stamp[key] = clock

    def on_insert(self, key: int) -> None:
        self._clock = clock = self._clock + 1      # touch(key), inlined: once per copy
        self._stamp[key] = clock

    def recency_order(self, scope: int, cache: CacheView) -> list[int]:
        """The evictable keys of ``scope``, least recently used first."""
        return sorted(cache.evictable(scope), key=self._stamp.__getitem__)

    def choose_victim(self, scope, cache: CacheView, job):
        stamp = self._stamp
        victim, oldest = None, 0
        for key in cache.evictable(scope):       # stamps are distinct: the order of the candidates is moot
            when = stamp[key]
            if victim is None or when < oldest:
                victim, oldest = key, when
        return victim
