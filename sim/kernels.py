"""Compiled hit/miss kernels for the built-in on-demand eviction policies (LRU, LFU, FIFO, static,
Belady), in both cache modes.

For a policy that only fetches on demand, which accesses hit does not depend on time (every copy a
layer asks for lands before the next layer routes), so the whole run's hit/miss sequence follows
from the trace alone. ``replay`` walks the trace once, as ``sim.replay.replay_untimed`` does with
the controller and the policy objects, and must decide exactly as they do:

- within a layer every chosen expert is looked up first (hits and misses, in router order, each one
  told to the policy), then the misses are fetched in router order, each taking a free slot of its
  scope or evicting the policy's victim;
- the layer's chosen experts are protected (never victims) until the layer ends; pinned experts
  (static) never are;
- victims: LRU the least recently accessed or inserted; FIFO the earliest inserted; LFU the fewest
  accesses since the run started (resident or not), then the least recent access step, then the
  lowest key; static is LRU over the slots its pins leave; Belady the farthest next use, then the
  lowest key.

LRU, FIFO and static keep their evictable experts in a recency list (a victim is found within the
layer's top-k protected ones); LFU and Belady scan the scope's residents.

Kernels are compiled by numba on first use and cached on disk (``cache=True``): the first call of a
fresh checkout compiles for a few seconds, later processes load the compiled code.
"""
from __future__ import annotations

import numba
import numpy as np

# Belady's next-use table is the shared core's, built once per routing and cached there: the kernel
# reads the table the reference's Belady reads (``NEVER``: its sentinel for an expert not used again).
from offload.next_use import NEVER, next_use_table  # noqa: F401

# Kernel codes, one per built-in on-demand policy.
LRU, LFU, FIFO, STATIC, BELADY = range(5)
KERNELS = {"lru": LRU, "lfu": LFU, "fifo": FIFO, "static": STATIC, "belady": BELADY}

def replay(experts: np.ndarray, num_experts: int, cache_slots: int, global_mode: bool, kernel: int,
           preload: np.ndarray, preload_pinned: np.ndarray,
           next_use: np.ndarray | None) -> tuple[np.ndarray, int, int]:
    """The hit/miss sequence of one on-demand run.

    ``preload``: int64 keys placed before decode, in order (``Policy.preload``); ``preload_pinned``
    (bool) marks the pinned ones. ``next_use``: ``next_use_table`` of the same trace, Belady only.
    Returns (misses per (token, layer) as uint8 [T, L], total hits, total evictions).
    """
    if next_use is None:
        next_use = np.empty((0, 0, 0), dtype=np.int32)
    misses = np.empty(experts.shape[:2], dtype=np.uint8)
    hits, evictions = _replay(experts, num_experts, cache_slots, global_mode, kernel,
                              preload, preload_pinned, next_use, misses)
    return misses, int(hits), int(evictions)


def compile_counts() -> tuple[int, int]:
    """(the replay kernel's signatures compiled by this process, those it loaded from numba's disk cache):
    how a cold start spent its time (``experiments.bench_sim``)."""
    return sum(_replay.stats.cache_misses.values()), sum(_replay.stats.cache_hits.values())


@numba.njit(cache=True, inline="always")
def _unlink(key, prv, nxt, head, tail, scope):
    p, n = prv[key], nxt[key]
    if p >= 0:
        nxt[p] = n
    else:
        head[scope] = n
    if n >= 0:
        prv[n] = p
    else:
        tail[scope] = p


@numba.njit(cache=True, inline="always")
def _append(key, prv, nxt, head, tail, scope):
    last = tail[scope]
    prv[key] = last
    nxt[key] = -1
    if last >= 0:
        nxt[last] = key
    else:
        head[scope] = key
    tail[scope] = key


@numba.njit(cache=True)
def _replay(experts, num_experts, cache_slots, global_mode, kernel, preload, preload_pinned,
            next_use, misses):
    T, L, K = experts.shape
    E = num_experts
    n_keys = L * E
    n_scopes = 1 if global_mode else L
    capacity = cache_slots * L if global_mode else cache_slots
    resident = np.empty((n_scopes, capacity), dtype=np.int64)   # scope -> its keys, by slot
    n_resident = np.zeros(n_scopes, dtype=np.int64)
    where = np.full(n_keys, -1, dtype=np.int64)                  # key -> its index in resident, or -1
    in_use = np.zeros(n_keys, dtype=np.bool_)
    pinned = np.zeros(n_keys, dtype=np.bool_)
    # The recency list (LRU, FIFO, static): unpinned residents, least recent at the head.
    prv = np.full(n_keys, -1, dtype=np.int64)
    nxt = np.full(n_keys, -1, dtype=np.int64)
    head = np.full(n_scopes, -1, dtype=np.int64)
    tail = np.full(n_scopes, -1, dtype=np.int64)
    listed = kernel == LRU or kernel == FIFO or kernel == STATIC
    count = np.zeros(n_keys, dtype=np.int64)                     # LFU: accesses since the start
    last = np.full(n_keys, -1, dtype=np.int64)                   # LFU: step of the latest access
    next_step = np.zeros(n_keys, dtype=np.int64)                 # Belady: next use after the latest access
    missed = np.empty(K, dtype=np.int64)

    for j in range(preload.shape[0]):
        key = preload[j]
        scope = 0 if global_mode else key // E
        where[key] = n_resident[scope]
        resident[scope, n_resident[scope]] = key
        n_resident[scope] += 1
        if preload_pinned[j]:
            pinned[key] = True
        elif listed:
            _append(key, prv, nxt, head, tail, scope)

    hits = 0
    evictions = 0
    for t in range(T):
        for layer in range(L):
            base = layer * E
            scope = 0 if global_mode else layer
            step = t * L + layer
            m = 0
            for i in range(K):
                key = base + experts[t, layer, i]
                in_use[key] = True
                hit = where[key] >= 0
                if hit:
                    hits += 1
                else:
                    missed[m] = key
                    m += 1
                if kernel == LFU:
                    count[key] += 1
                    last[key] = step
                elif kernel == BELADY:
                    next_step[key] = next_use[t, layer, i]
                elif hit and not pinned[key] and (kernel == LRU or kernel == STATIC):
                    _unlink(key, prv, nxt, head, tail, scope)     # an access refreshes recency
                    _append(key, prv, nxt, head, tail, scope)
            for j in range(m):
                key = missed[j]
                n = n_resident[scope]
                if n < capacity:
                    index = n
                    n_resident[scope] = n + 1
                else:
                    if listed:
                        victim = head[scope]
                        while in_use[victim]:
                            victim = nxt[victim]
                        _unlink(victim, prv, nxt, head, tail, scope)
                    else:
                        victim = -1
                        for r in range(n):
                            k = resident[scope, r]
                            if in_use[k]:
                                continue
                            if victim < 0:
                                victim = k
                            elif kernel == LFU:
                                if (count[k] < count[victim] or (count[k] == count[victim] and (
                                        last[k] < last[victim] or (last[k] == last[victim] and k < victim)))):
                                    victim = k
                            elif (next_step[k] > next_step[victim]
                                  or (next_step[k] == next_step[victim] and k < victim)):
                                victim = k
                    index = where[victim]
                    where[victim] = -1
                    evictions += 1
                resident[scope, index] = key
                where[key] = index
                if listed:
                    _append(key, prv, nxt, head, tail, scope)   # an insert refreshes recency
            for i in range(K):
                in_use[base + experts[t, layer, i]] = False
            misses[t, layer] = m
    return hits, evictions
