"""On-demand fetching, evicting the expert that entered the cache first (hits do not refresh it)."""
from __future__ import annotations

from offload.policy import LayerAccess
from policies.lru import LRU


class FIFO(LRU):
    def on_access(self, access: LayerAccess, index: int, key: int, hit: bool) -> None:
        pass
