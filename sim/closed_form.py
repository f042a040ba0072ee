"""The simulator's timing of an on-demand run, in closed form from its hit/miss sequence.

Why this is exact. With no prefetch, the copy queue only ever holds the current layer's demand
fetches, and the layer waits for all of them, so every copy engine is idle when a layer routes. A
layer of ``sim.simulator`` then runs as follows, from the moment ``C`` its router finishes
(attention, layer overhead and router after the previous layer's end):

- its m misses are queued in router order and start on the free engines once the host has issued them,
  the profile's ``miss_latency`` after ``C`` (the host is busy until then; the compute stream is not);
  each engine serves the queue in order, so with n engines and copies of ``copy_ns`` each, miss j
  (0-based) lands at ``C + miss_latency + (j // n + 1) * copy_ns``; with the engine's copy window
  (``landing_times``) the host commits them as the window allows, blocking for the oldest copy in flight;
- the K - m resident experts compute first, back to back, from ``C``;
- then miss j computes from max(the previous expert's end, its landing plus the profile's ``copy_wait``
  when it had to wait) for ``expert_ns``; the difference, when positive, is stall;
- the layer ends at the later of its last expert's end and the host's decision (the policy's
  ``decision`` time after the host has committed the layer's copies, or after the router's end when none
  missed).

Which experts miss does not matter, only how many: every copy takes the same time. So a layer costs
``attention(context) + layer_overhead + router + tail[m]``, and a token adds ``token_overhead``.
Tokens follow each other with no gap, and every copy has finished when the last token ends, so the
link was busy ``copies * copy_ns`` (``offload.metrics`` turns these into the reported figures).
"""
from __future__ import annotations

import numpy as np

from hardware.profile import ComputeCost


def landing_times(misses: int, copy_ns: int, copy_engines: int, window: int | None) -> tuple[list[int], int]:
    """(when each of a layer's ``misses`` demand copies lands, when the host has committed the last of them),
    ns after the router's end, all queued at once in router order. ``window`` None: the ideal link, copy j
    on the first free engine, landing at (j // engines + 1) * copy_ns. A window (``RunSettings.copies_in_flight``):
    the host commits copies while fewer than ``window`` are in flight, and to commit copy j >= window blocks
    until the oldest in-flight one lands (``real.copies.CopyFeeder.make_ready``); each committed copy starts on
    the engine that frees first."""
    if window is None:
        return [(j // copy_engines + 1) * copy_ns for j in range(misses)], 0
    lanes = [0] * copy_engines
    landed: list[int] = []
    in_flight: list[int] = []           # landing times of committed copies, oldest first
    host = 0
    for _ in range(misses):
        while len([t for t in in_flight if t > host]) >= window:
            host = min(t for t in in_flight if t > host)    # the feeder waits for its oldest copy
        in_flight = [t for t in in_flight if t > host]
        lane = min(range(copy_engines), key=lanes.__getitem__)
        lanes[lane] = max(host, lanes[lane]) + copy_ns
        landed.append(lanes[lane])
        in_flight.append(lanes[lane])
    return landed, host


def layer_tails(top_k: int, expert_ns: int, copy_ns: int, copy_engines: int, copy_wait_ns: int = 0,
                decision_ns: int = 0, window: int | None = None,
                miss_latency_ns: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tail, stall), int64 [top_k + 1] each, indexed by the number of misses m: the time from the
    router's end to the layer's end, and the part of it spent waiting for copies. A layer with misses has
    its host issue them ``miss_latency_ns`` after the router's end (every copy and host commit later by
    that; the resident experts start at once). An expert that waits for its copy starts ``copy_wait_ns``
    after the copy lands (counted as stall); the layer ends no earlier than the host's decision,
    ``decision_ns`` after the host has committed the layer's copies."""
    tail = np.empty(top_k + 1, dtype=np.int64)
    stall = np.empty(top_k + 1, dtype=np.int64)
    for m in range(top_k + 1):
        landed, host = landing_times(m, copy_ns, copy_engines, window)
        if m and miss_latency_ns:
            landed, host = [t + miss_latency_ns for t in landed], host + miss_latency_ns
        end, waited = (top_k - m) * expert_ns, 0
        for j in range(m):
            if landed[j] > end:
                waited += landed[j] - end + copy_wait_ns
                end = landed[j] + copy_wait_ns
            end += expert_ns
        tail[m], stall[m] = max(end, host + decision_ns), waited
    return tail, stall


def token_times(misses: np.ndarray, top_k: int, request_starts: np.ndarray, prompt_tokens: int,
                cost: ComputeCost, copy_ns: int, copy_engines: int, decision_ns: int = 0,
                window: int | None = None, layer_extra_ns: int = 0) -> tuple[np.ndarray, int]:
    """(token_ns int64 [T], total stall ns) from ``misses`` [T, L] (misses of the ``top_k`` chosen
    experts, per token and layer).

    Attention is charged at the token's context length: ``prompt_tokens`` plus its position in its
    request (``request_starts``, the trace's request boundaries). ``decision_ns``: the policy's host
    time per layer (``ComputeCost.decision_ns``); ``window``: the copy stream's (``landing_times``);
    ``layer_extra_ns``: the policy's own work per layer before routing (``ComputeCost.layer_extra_ns``)."""
    T, L = misses.shape
    tail, stall = layer_tails(top_k, cost.expert_ns, copy_ns, copy_engines, cost.copy_wait_ns, decision_ns, window,
                              cost.miss_latency_ns)
    starts = np.asarray(request_starts, dtype=np.int64)
    lengths = np.diff(starts)
    # One call of the cost model per position, as the simulator makes them (its floats, its rounding).
    before_experts = cost.layer_overhead_ns + cost.router_ns + layer_extra_ns
    layer_head = np.array([cost.attention_ns(prompt_tokens + i) + before_experts
                           for i in range(int(lengths.max()))], dtype=np.int64)
    position = np.arange(T, dtype=np.int64) - np.repeat(starts[:-1], lengths)
    token_ns = (cost.token_overhead_ns + L * layer_head[position]
                + tail[misses].sum(axis=1, dtype=np.int64))
    stall_ns = int(np.bincount(misses.ravel(), minlength=len(stall)) @ stall)
    return token_ns, stall_ns
