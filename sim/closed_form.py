"""The simulator's timing of an on-demand run, in closed form from its hit/miss sequence.

Why this is exact. With no prefetch, the copy queue only ever holds the current layer's demand
fetches, and the layer waits for all of them, so every copy engine is idle when a layer routes. A
layer of ``sim.simulator`` then runs as follows, from the moment ``C`` its router finishes
(attention, layer overhead and router after the previous layer's end):

- its m misses are queued in router order and start at once on the free engines; each engine serves
  the queue in order, so with n engines and copies of ``copy_ns`` each, miss j (0-based) lands at
  ``C + (j // n + 1) * copy_ns``;
- the K - m resident experts compute first, back to back, from ``C``;
- then miss j computes from max(the previous expert's end, its landing plus the profile's ``copy_wait``
  when it had to wait) for ``expert_ns``; the difference, when positive, is stall;
- the layer ends at the later of its last expert's end and the host's decision (the policy's
  ``decision`` time after the router's end).

Which experts miss does not matter, only how many: every copy takes the same time. So a layer costs
``attention(context) + layer_overhead + router + tail[m]``, and a token adds ``token_overhead``.
Tokens follow each other with no gap, and every copy has finished when the last token ends, so the
link was busy ``copies * copy_ns`` (``offload.metrics`` turns these into the reported figures).
"""
from __future__ import annotations

import numpy as np

from hardware.profile import ComputeCost


def layer_tails(top_k: int, expert_ns: int, copy_ns: int, copy_engines: int, copy_wait_ns: int = 0,
                decision_ns: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tail, stall), int64 [top_k + 1] each, indexed by the number of misses m: the time from the
    router's end to the layer's end, and the part of it spent waiting for copies. An expert that waits
    for its copy starts ``copy_wait_ns`` after the copy lands (counted as stall); the layer ends no
    earlier than the host's decision, ``decision_ns`` after the router's end."""
    tail = np.empty(top_k + 1, dtype=np.int64)
    stall = np.empty(top_k + 1, dtype=np.int64)
    for m in range(top_k + 1):
        end, waited = (top_k - m) * expert_ns, 0
        for j in range(m):
            landed = (j // copy_engines + 1) * copy_ns
            if landed > end:
                waited += landed - end + copy_wait_ns
                end = landed + copy_wait_ns
            end += expert_ns
        tail[m], stall[m] = max(end, decision_ns), waited
    return tail, stall


def token_times(misses: np.ndarray, top_k: int, request_starts: np.ndarray, prompt_tokens: int,
                cost: ComputeCost, copy_ns: int, copy_engines: int, decision_ns: int = 0) -> tuple[np.ndarray, int]:
    """(token_ns int64 [T], total stall ns) from ``misses`` [T, L] (misses of the ``top_k`` chosen
    experts, per token and layer).

    Attention is charged at the token's context length: ``prompt_tokens`` plus its position in its
    request (``request_starts``, the trace's request boundaries). ``decision_ns``: the policy's host
    time per layer (``ComputeCost.decision_ns``)."""
    T, L = misses.shape
    tail, stall = layer_tails(top_k, cost.expert_ns, copy_ns, copy_engines, cost.copy_wait_ns, decision_ns)
    starts = np.asarray(request_starts, dtype=np.int64)
    lengths = np.diff(starts)
    # One call of the cost model per position, as the simulator makes them (its floats, its rounding).
    before_experts = cost.layer_overhead_ns + cost.router_ns
    layer_head = np.array([cost.attention_ns(prompt_tokens + i) + before_experts
                           for i in range(int(lengths.max()))], dtype=np.int64)
    position = np.arange(T, dtype=np.int64) - np.repeat(starts[:-1], lengths)
    token_ns = (cost.token_overhead_ns + L * layer_head[position]
                + tail[misses].sum(axis=1, dtype=np.int64))
    stall_ns = int(np.bincount(misses.ravel(), minlength=len(stall)) @ stall)
    return token_ns, stall_ns
