"""A user policy in its own file: `python -m experiments.sweep policy=examples/my_policy.py:PreviousTokenPrefetch`."""
from policies import PrefetchRequest
from policies.lru import LRU


class PreviousTokenPrefetch(LRU):
    """LRU eviction; after each layer, prefetch what the next layer chose for the previous token."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.last = {}                                  # layer -> experts it chose last time

    def on_access(self, access, index, key, hit):
        super().on_access(access, index, key, hit)
        self.last[access.layer] = access.experts

    def prefetch(self, access):
        nxt = access.layer + 1
        if nxt >= self.ctx.num_layers or nxt not in self.last:
            return []
        base = nxt * self.ctx.num_experts
        return [PrefetchRequest(base + e, access.step + 1) for e in self.last[nxt]]
