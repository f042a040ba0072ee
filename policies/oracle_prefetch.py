"""The bound: Belady eviction plus perfect prefetch of the next ``prefetch_depth`` layers' experts.

No real predictor knows the future routing; this shows how fast any policy could be with the same
cache and link, so a policy's gap to it is the room left.
"""
from __future__ import annotations

from offload.policy import LayerAccess, PrefetchRequest
from policies.belady import Belady


class OraclePrefetch(Belady):
    def prefetch(self, access: LayerAccess) -> list[PrefetchRequest]:
        L, E = self.ctx.num_layers, self.ctx.num_experts
        requests = []
        for step in range(access.step + 1, access.step + 1 + self.ctx.prefetch_depth):
            token, layer = divmod(step, L)
            routes = self._oracle.routes(token)
            if routes is None:
                break
            base = layer * E
            requests.extend(PrefetchRequest(base + e, step) for e in routes[layer])
        return requests
