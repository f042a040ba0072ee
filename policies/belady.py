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
        self._next: dict[int, int] = {}      # key -> its next use after the last time we saw it
        self._E = ctx.num_experts
        self._step = -1

    def on_access(self, access: LayerAccess, index: int, key: int, hit: bool) -> None:
        self._step = access.step
        self._next[key] = self._oracle.next_steps(access.token)[access.layer][index]

    def on_insert(self, key: int) -> None:
        if key not in self._next:        # prefetched before any access: ask the oracle
            layer, expert = divmod(key, self._E)
            self._next[key] = self._oracle.next_use_after(layer, expert, self._step)

    def on_evict(self, key: int) -> None:
        self._next.pop(key, None)

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
