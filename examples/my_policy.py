"""A user policy in its own file: `python -m experiments.sweep policy=examples/my_policy.py:PopularNextLayer`."""
from policies import PrefetchRequest
from policies.lru import LRU


class PopularNextLayer(LRU):
    """LRU eviction; after each layer, prefetch the next layer's top-k most used experts so far."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.uses = [[0] * ctx.num_experts for _ in range(ctx.num_layers)]

    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        self.uses[access.layer][access.experts[index]] += 1

    def prefetch(self, access):
        nxt = access.layer + 1
        if nxt >= self.ctx.num_layers:
            return []
        counts = self.uses[nxt]
        top = sorted(range(len(counts)), key=counts.__getitem__, reverse=True)[: self.ctx.top_k]
        base = nxt * self.ctx.num_experts
        return [PrefetchRequest(base + e, access.step + 1) for e in top]
