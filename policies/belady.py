"""Belady's MIN: evict the resident expert whose next use is farthest in the future.

With on-demand fetching it maximises hits at every cache size, which makes it the bound the other
eviction policies are measured against (``belady_hit_fraction``). Needs the run's future: in the
simulator the trace; in the engine a recorded run.
"""
from __future__ import annotations

from offload.policy import LayerAccess, Policy, PolicyContext
from offload.cache import CacheView


class Belady(Policy):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        self._oracle = ctx.oracle
        # key -> its next use after the latest step routed, for every key: resident or not, so an expert
        # prefetched before its first access already has its next use. Starts at each key's first use;
        # an access moves it on to that access's next use (no use of the key lies between).
        self._next: list[int] = self._oracle.first_uses()
        self._token, self._rows = -1, []     # the token routed now, and its rows of next steps

    def on_access(self, access: LayerAccess, index: int, key: int, hit: bool) -> None:
        if access.token != self._token:
            self._token, self._rows = access.token, self._oracle.next_steps(access.token)
        self._next[key] = self._rows[access.layer][index]

    def next_use(self, key: int) -> int:
        return self._next[key]

    def choose_victim(self, scope, cache: CacheView, job):
        nxt = self._next
        best, best_next = None, -1
        for key in cache.evictable(scope):
            n = nxt[key]
            if n > best_next or (n == best_next and key < best):
                best, best_next = key, n
        if best is not None and not job.demand and best_next <= job.need_step:
            return None       # the victim is needed before the prefetched expert: not worth it
        return best
