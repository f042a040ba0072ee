"""Next-use oracle: for every access of a trace, the step at which that expert is used next.

One backward pass per layer (vectorised as a sort), as libCacheSim's Belady reader does, so that an
eviction decision is a lookup rather than a scan of the future.
"""
from __future__ import annotations

from bisect import bisect_right

import numpy as np

NEVER = np.iinfo(np.int64).max


class NextUse:
    def __init__(self, experts: np.ndarray, num_experts: int):
        T, L, K = experts.shape
        self.num_layers = L
        E = num_experts
        steps = (np.arange(T, dtype=np.int64)[:, None] * L + np.arange(L)[None, :])  # [T, L]
        steps = np.broadcast_to(steps[:, :, None], (T, L, K)).reshape(-1)
        keys = (np.arange(L, dtype=np.int64)[None, :, None] * E + experts.astype(np.int64)).reshape(-1)
        order = np.lexsort((steps, keys))         # by key, then step
        sk, ss = keys[order], steps[order]
        nxt = np.full(sk.shape, NEVER, dtype=np.int64)
        same = sk[1:] == sk[:-1]
        nxt[:-1][same] = ss[1:][same]
        flat = np.empty_like(nxt)
        flat[order] = nxt
        self._next_step = flat.reshape(T, L, K)
        self._experts = experts
        self._row_t = -1
        self._row: list[list[int]] = []
        self._routes_t = -1
        self._routes: list[list[int]] = []
        self._num_experts = E
        bounds = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1], True])
        self._uses: dict[int, list[int]] = {
            int(sk[a]): ss[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])}

    def next_steps(self, token: int) -> list[list[int]]:
        """[layer][k] -> next step of that access. One token's rows as lists: scalar numpy
        indexing is slow in the hot path, and whole-trace lists would not fit for long traces."""
        if token != self._row_t:
            self._row_t, self._row = token, self._next_step[token].tolist()
        return self._row

    def routes(self, token: int) -> list[list[int]] | None:
        """[layer][k] -> the expert the trace chose, or None past the end of the trace."""
        if token >= len(self._experts):
            return None
        if token != self._routes_t:
            self._routes_t, self._routes = token, self._experts[token].tolist()
        return self._routes

    def next_use_after(self, layer: int, expert: int, step: int) -> int:
        """First step > ``step`` at which (layer, expert) is used, or NEVER."""
        uses = self._uses.get(layer * self._num_experts + expert)
        if not uses:
            return int(NEVER)
        i = bisect_right(uses, step)
        return uses[i] if i < len(uses) else int(NEVER)
