"""Next-use tables: for every access of a trace, the step at which that expert is used next.

libCacheSim's Belady reader precomputes each access's next use in one backward pass, so that an
eviction decision is a lookup rather than a scan of the future. Here the pass is a stable sort per layer
(numpy sorts small integer ids in linear time) and the result is a compact array: int32, 4 bytes per
expert access (int64 for traces past 2**31 - 1 layer-steps). The per-expert use lists behind
``NextUse.next_use_after`` take 4 bytes per access more and are built only if a policy asks.

Tables are cached per process by the digest of the routing they come from: every run a sweep worker
makes on one trace (Belady and the oracle on the reference path, Belady's kernel on the fast path, the
Belady bound of each row) shares one table instead of building its own.
"""
from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import OrderedDict

import numpy as np

NEVER = int(np.iinfo(np.int32).max)   # next use of an expert the trace does not use again (int32 tables)

_CACHED_TABLES = 2                     # routings whose tables a process keeps (a sweep uses one or two)
_tables: OrderedDict[tuple, "_Tables"] = OrderedDict()


class _Tables:
    """The arrays of one routing, shared by every ``NextUse`` of it."""

    def __init__(self, experts: np.ndarray, num_experts: int):
        T, L, K = experts.shape
        self.num_experts = num_experts
        self.dtype = np.int32 if T * L < NEVER else np.int64
        self.never = int(np.iinfo(self.dtype).max)
        self.next_step = np.empty((T, L, K), dtype=self.dtype)
        self.first_use = np.full(L * num_experts, self.never, dtype=self.dtype)
        self._experts = experts
        self._uses: tuple[np.ndarray, np.ndarray] | None = None
        token = np.repeat(np.arange(T, dtype=self.dtype), K)           # token of each (t, k), t-major
        for layer in range(L):
            ids, order, steps = self._sorted_uses(layer, token)
            same = ids[1:] == ids[:-1]
            nxt = np.full(T * K, self.never, dtype=self.dtype)
            nxt[:-1][same] = steps[1:][same]
            flat = np.empty_like(nxt)
            flat[order] = nxt
            self.next_step[:, layer, :] = flat.reshape(T, K)
            first = np.flatnonzero(np.r_[True, ~same])
            self.first_use[layer * num_experts + ids[first].astype(np.int64)] = steps[first]

    def _sorted_uses(self, layer: int, token: np.ndarray):
        """Layer ``layer``'s accesses sorted by expert, then step: (expert ids, the sort order over the
        t-major (t, k) positions, steps)."""
        L = self._experts.shape[1]
        ids = self._experts[:, layer, :].reshape(-1)
        order = np.argsort(ids, kind="stable")        # stable: a key's uses stay in step order
        return ids[order], order, token[order] * L + layer

    def uses(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, offsets): the steps at which key k is used are ``steps[offsets[k]:offsets[k + 1]]``."""
        if self._uses is None:
            T, L, K = self._experts.shape
            E = self.num_experts
            token = np.repeat(np.arange(T, dtype=self.dtype), K)
            steps = np.empty(T * L * K, dtype=self.dtype)
            counts = np.zeros(L * E, dtype=np.int64)
            at = 0
            for layer in range(L):
                ids, _, layer_steps = self._sorted_uses(layer, token)
                steps[at:at + len(layer_steps)] = layer_steps
                at += len(layer_steps)
                counts[layer * E:(layer + 1) * E] = np.bincount(ids, minlength=E)[:E]
            self._uses = steps, np.concatenate(([0], np.cumsum(counts)))
        return self._uses


def _routing_digest(experts: np.ndarray, num_experts: int) -> tuple:
    h = hashlib.blake2b(np.ascontiguousarray(experts).data, digest_size=16)
    return h.hexdigest(), experts.shape, experts.dtype.str, num_experts


def tables_for(experts: np.ndarray, num_experts: int) -> _Tables:
    """The tables of this routing: built on first use, then shared (keyed by the routing's digest)."""
    key = _routing_digest(experts, num_experts)
    tables = _tables.get(key)
    if tables is None:
        tables = _tables[key] = _Tables(experts, num_experts)
        while len(_tables) > _CACHED_TABLES:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return tables


def next_use_table(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, L, K]: for each access, the decode step (token * L + layer) at which the same expert is
    chosen next, or the dtype's maximum (``NEVER`` for int32). Shared: do not write to it."""
    return tables_for(experts, num_experts).next_step


class NextUse:
    """The future of one run's routing, as policies read it (``PolicyContext.oracle``)."""

    _ROUTE_ROWS = 64    # tokens whose routing is kept as lists (a prefetch window spans a few)

    def __init__(self, experts: np.ndarray, num_experts: int):
        tables = tables_for(experts, num_experts)
        self._tables = tables
        self._next_step = tables.next_step
        self.never = tables.never
        self.num_layers = experts.shape[1]
        self._num_experts = num_experts
        self._experts = experts
        self._row_t = -1
        self._row: list[list[int]] = []
        self._routes: dict[int, list[list[int]]] = {}
        self._route_keys: dict[int, list[list[int]]] = {}
        self._layer_base = (np.arange(self.num_layers, dtype=np.int64) * num_experts)[:, None]

    def next_steps(self, token: int) -> list[list[int]]:
        """[layer][k] -> next step of that access. One token's rows as lists: scalar numpy
        indexing is slow in the hot path, and whole-trace lists would not fit for long traces."""
        if token != self._row_t:
            self._row_t, self._row = token, self._next_step[token].tolist()
        return self._row

    def first_uses(self) -> list[int]:
        """[key] -> the first step at which key (layer * num_experts + expert) is used, or ``never``."""
        return self._tables.first_use.tolist()

    def routes(self, token: int) -> list[list[int]] | None:
        """[layer][k] -> the expert the trace chose, or None past the end of the trace."""
        rows = self._routes.get(token)
        return rows if rows is not None else self._row_lists(self._routes, token, 0)

    def route_keys(self, token: int) -> list[list[int]] | None:
        """``routes`` as keys: [layer][k] -> layer * num_experts + the expert the trace chose, or None
        past the end of the trace."""
        rows = self._route_keys.get(token)
        return rows if rows is not None else self._row_lists(self._route_keys, token, self._layer_base)

    def _row_lists(self, cache: dict, token: int, offset) -> list[list[int]] | None:
        """Token ``token``'s routing (+ ``offset`` per layer) as lists, kept in ``cache`` with the
        ``_ROUTE_ROWS`` most recently converted tokens; None past the end of the trace."""
        if token >= len(self._experts):
            return None
        if len(cache) >= self._ROUTE_ROWS:
            del cache[next(iter(cache))]     # the oldest converted
        rows = cache[token] = (self._experts[token] + offset).tolist()
        return rows

    def next_use_after(self, layer: int, expert: int, step: int) -> int:
        """First step > ``step`` at which (layer, expert) is used, or ``never``."""
        steps, offsets = self._tables.uses()
        key = layer * self._num_experts + expert
        lo, hi = int(offsets[key]), int(offsets[key + 1])
        i = bisect_right(steps, step, lo, hi)
        return int(steps[i]) if i < hi else self.never
