"""Timing rules of the simulator at the points its other tests leave open.

- A copy that lands exactly when the compute stream frees is not waited for: its expert starts at once,
  with no ``copy_wait`` and no stall (hand-computed, both clocks and the fast path's closed form).
- A layer's experts wait for their copies in the order the copies land.
- A prefetch is never stamped before the host has taken the decision that queued it: the decision comes
  ``decision`` after the host reaches it, and the host reaches it only after issuing the layer's demand
  copies (``miss_latency``), whether ``miss_latency`` is longer or shorter than ``prefetch_latency``.
"""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from hardware.profile import MeasuredCompute, load_hardware
from offload.session import RunSettings
from policies.lru import LRU
from policies.registry import resolve_policy
from sim import simulator
from sim.simulator import simulate
from traces import synthetic_trace

EXPERT_BYTES = 2**20
BASE = load_hardware("h100-pcie5").with_overrides(pcie_GBps=10.0, copy_latency_us=10.0)
COPY_NS = BASE.copy.copy_ns(EXPERT_BYTES)


def _measured(trace, **fields):
    values = dict(router_us=3.0, expert_us=20.0, layer_overhead_us=11.0, token_overhead_us=100.0, copy_wait_us=6.0)
    values.update(fields)
    measured = MeasuredCompute("bf16", ((0, 40.0), (4096, 40.0)), **values)
    return dataclasses.replace(BASE, measured_compute=((trace.model.name, measured),))


@pytest.mark.parametrize("window", [None, 1, 2])
def test_a_copy_landing_as_the_compute_stream_frees_is_not_waited_for(window):
    """One layer, top-2, two slots: from token 1 on, expert 0 hits and the other misses. The hit computes
    for exactly one copy's time, so the miss's copy lands the instant the hit ends: the miss computes from
    then, with no copy_wait and no stall. Token 0 (two misses on one engine) waits for its first copy only."""
    trace = synthetic_trace(num_tokens=4, num_layers=1, num_experts=3, top_k=2, popularity_skew=0,
                            temporal_locality=0, seed=3, expert_bytes=EXPERT_BYTES)
    trace.experts[:, 0, :] = [[0, 1], [0, 2], [0, 1], [0, 2]]
    hw = _measured(trace, expert_us=COPY_NS / 1000.0)
    cost = hw.compute_cost(trace.model, "bf16")
    E, cw = cost.expert_ns, cost.copy_wait_ns
    assert E == COPY_NS and cw > 0
    head = cost.token_overhead_ns + cost.attention_ns(0) + cost.layer_overhead_ns + cost.router_ns
    settings = RunSettings(cache_slots=2, copies_in_flight=window)
    ref = simulate(trace, LRU, hw, settings, record_timeline=True, path="reference")
    # token 0: the first miss waits for its copy (E after the router) and copy_wait; the second copy landed
    # at 2E, before the first expert ends
    first = head + COPY_NS + cw + 2 * E
    later = head + 2 * E
    assert ref.token_ns == [first, later, later, later]
    assert ref.metrics["stall_ms_per_token"] == pytest.approx((COPY_NS + cw) / 4 / 1e6)
    for t in range(1, 4):
        hit, miss = sorted((c for c in ref.timeline.compute if c.token == t), key=lambda c: c.start_ns)
        assert hit.key == 0 and miss.start_ns == hit.end_ns
    fast = simulate(trace, LRU, hw, settings, path="fast")
    assert fast.token_ns == ref.token_ns and fast.metrics == ref.metrics


def _observe_decisions(monkeypatch):
    """Per layer turn, (the host's time as it reaches its decision, the time the decision is stamped)."""
    reached, stamped = [], []

    def decide(clock, token, layer, _original=simulator._Clock.decide):
        reached.append(clock.now_ns())
        return _original(clock, token, layer)

    def decided_ns(clock, _original=simulator._Clock.decided_ns):
        stamped.append(_original(clock))
        return stamped[-1]
    monkeypatch.setattr(simulator._Clock, "decide", decide)
    monkeypatch.setattr(simulator._Clock, "decided_ns", decided_ns)
    return reached, stamped


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("miss_us, prefetch_us", [(80.0, 15.0), (15.0, 80.0), (40.0, 0.0)])
def test_a_prefetch_is_never_stamped_before_the_host_has_decided_it(window, miss_us, prefetch_us, monkeypatch):
    decision_us = 9.0
    reached, stamped = _observe_decisions(monkeypatch)
    oracle = resolve_policy("oracle")
    prefetches = 0
    for seed in range(3):
        trace = synthetic_trace(num_tokens=16, num_layers=3, num_experts=8, top_k=2, seed=seed,
                                temporal_locality=0.4, expert_bytes=EXPERT_BYTES)
        hw = _measured(trace, miss_latency_us=miss_us, prefetch_latency_us=prefetch_us,
                       decision_us=((oracle.__name__, decision_us),))
        D = hw.compute_cost(trace.model, "bf16").decision_ns(oracle)
        assert D == 9000
        reached.clear(), stamped.clear()
        run = simulate(trace, oracle, hw, RunSettings(cache_slots=3, copies_in_flight=window),
                       train_trace=trace, record_timeline=True, path="reference")
        assert len(reached) == len(stamped) == trace.num_tokens * trace.num_layers
        for host, at in zip(reached, stamped):
            assert at >= host + D, (host, at)
        decisions = set(stamped)
        for c in run.timeline.copies:
            if not c.demand:
                prefetches += 1
                assert c.queued_ns in decisions and c.start_ns >= c.queued_ns
    assert prefetches


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([None, 1, 2, 3]), st.integers(1, 2), st.integers(1, 3),
       st.sampled_from(["oracle", "affinity", "lru"]))
def test_a_layer_waits_for_its_copies_in_the_order_they_land(seed, window, engines, depth, policy):
    """Resident experts first, then the copies waited for in landing order: the compute stream never waits
    for a copy while one that landed earlier sits behind it (in-flight prefetches, promoted ones and new
    misses mixed in one layer)."""
    trace = synthetic_trace(num_tokens=12, num_layers=3, num_experts=8, top_k=3, seed=seed, temporal_locality=0.3)
    hw = BASE.with_overrides(pcie_GBps=2.0, copy_engines=engines)
    run = simulate(trace, resolve_policy(policy), hw,
                   RunSettings(cache_slots=4, prefetch_depth=depth, copies_in_flight=window),
                   train_trace=trace, record_timeline=True, path="reference")
    for token, layer, waits in run.timeline.layer_waits:
        landed = [end for _, end in waits]
        assert landed == sorted(landed), (token, layer, waits)
    computed = {}
    for c in run.timeline.compute:
        computed.setdefault((c.token, c.layer), []).append(c.start_ns)
    assert all(starts == sorted(starts) for starts in computed.values())
