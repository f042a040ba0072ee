"""mixtral-offloading (Eliseev & Mazur 2023): per-layer LRU plus, after each layer, a prefetch of the
next layer's top-k as its own gate scores them on the current hidden state (track "pregate").

The baseline as published: depth 1, no eviction protection, no depth limit.
"""
from __future__ import annotations

from policies.speculative import SpeculativePrefetch


class MixtralOffloading(SpeculativePrefetch):
    track = "pregate"
    max_depth = 1
    protect = False
    limit_depth = False
