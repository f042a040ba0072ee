"""``prefetch_latency``: a prefetch a layer decides starts no earlier than that long plus the policy's decision
time after the layer's routing (the engine's host launches the layer's experts and the next layer's attention
before deciding), while the layer itself is not held. Both clocks of the reference; on-demand policies, the
fast path's domain, unchanged; the fit from the engine's stamps; the engine's stamps themselves."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import calibration_timed_by_the_simulator, lru_engine_counting_copies

from hardware.profile import MeasuredCompute, hardware_from_dict, load_hardware
from offload.session import RunSettings
from policies.registry import resolve_policy
from sim.simulator import simulate
from traces import synthetic_trace

BASE = load_hardware("h100-pcie5").with_overrides(pcie_GBps=10.0, copy_latency_us=10.0)
EXPERT_BYTES = 2**20
ATTENTION_US, OVERHEAD_US, ROUTER_US = 40.0, 11.0, 3.0


def _hardware(trace, prefetch_latency_us, decision_us=0.0, miss_latency_us=0.0):
    decisions = tuple((name, decision_us) for name in ("OraclePrefetch", "AffinityPrefetch")) if decision_us else ()
    measured = MeasuredCompute("bf16", ((0, ATTENTION_US), (4096, ATTENTION_US)), router_us=ROUTER_US,
                               expert_us=20.0, layer_overhead_us=OVERHEAD_US, token_overhead_us=100.0,
                               copy_wait_us=6.0, decision_us=decisions, miss_latency_us=miss_latency_us,
                               prefetch_latency_us=prefetch_latency_us)
    return dataclasses.replace(BASE, measured_compute=((trace.model.name, measured),))


@pytest.mark.parametrize("window", [None, 1, 2])
@pytest.mark.parametrize("decision_us", [0.0, 9.0])
def test_a_prefetch_starts_no_earlier_than_routing_plus_latency_plus_decision(window, decision_us, monkeypatch):
    """Each layer's decision lies ``prefetch_latency + decision`` after its routing (the layer's start plus
    attention, overhead and router) or later, exactly then on some layers; every copy that started as a
    prefetch started at or after its decision, and some exactly then (the link was free), in both clocks."""
    from sim import simulator
    decided = []     # (the deciding layer's start, its decision), in decode order

    def recording(clock, _original=simulator._Clock.decided_ns):
        decided.append((clock.timeline.layer_start_ns[-1][2], _original(clock)))
        return decided[-1][1]
    monkeypatch.setattr(simulator._Clock, "decided_ns", recording)
    pl_us = 70.0
    head = round((ATTENTION_US + OVERHEAD_US + ROUTER_US) * 1000)
    latency = round(pl_us * 1000) + round(decision_us * 1000)
    tight_decisions = tight_copies = prefetches = 0
    for seed in range(4):
        trace = synthetic_trace(num_tokens=24, num_layers=3, num_experts=8, top_k=2, seed=seed,
                                temporal_locality=0.5, expert_bytes=EXPERT_BYTES)
        hw = _hardware(trace, pl_us, decision_us)
        for policy in ("oracle", "affinity"):
            decided.clear()
            run = simulate(trace, resolve_policy(policy), hw, RunSettings(cache_slots=3, copies_in_flight=window),
                           train_trace=trace, record_timeline=True, path="reference")
            assert len(decided) == trace.num_tokens * trace.num_layers
            for start, at in decided:
                assert at >= start + head + latency, (policy, start, at)
                tight_decisions += at == start + head + latency
            decisions = {at for _, at in decided}
            for c in run.timeline.copies:
                if not c.demand:
                    prefetches += 1
                    assert c.queued_ns in decisions and c.start_ns >= c.queued_ns, (policy, c)
                    tight_copies += c.start_ns == c.queued_ns
    assert prefetches and tight_decisions and tight_copies


@pytest.mark.parametrize("window", [None, 2])
def test_the_latency_delays_prefetches_only(window):
    """A prefetching policy's copies start later with the latency, so the oracle is no faster; an on-demand
    policy's run is identical to the nanosecond (nothing it copies is decided at ``decided_ns``), and the
    fast path, which serves it, stays equal to the reference."""
    trace = synthetic_trace(num_tokens=40, num_layers=4, num_experts=8, top_k=2, seed=5, temporal_locality=0.4,
                            expert_bytes=EXPERT_BYTES)
    settings = RunSettings(cache_slots=3, copies_in_flight=window)
    without, with_latency = _hardware(trace, 0.0, miss_latency_us=30.0), _hardware(trace, 120.0, miss_latency_us=30.0)
    for policy in ("lru", "belady", "lfu"):
        cls = resolve_policy(policy)
        a = simulate(trace, cls, without, settings, path="reference")
        b = simulate(trace, cls, with_latency, settings, path="reference")
        assert a.token_ns == b.token_ns and a.stats == b.stats
        assert simulate(trace, cls, with_latency, settings, path="fast").token_ns == b.token_ns
    oracle = resolve_policy("oracle")
    fast = simulate(trace, oracle, without, settings, train_trace=trace, path="reference")
    slow = simulate(trace, oracle, with_latency, settings, train_trace=trace, path="reference")
    assert sum(slow.token_ns) > sum(fast.token_ns)


def test_the_fit_takes_the_hits_patterns_decide_median_without_its_first_step():
    def hits_extra(shape):
        first = [500.0] * shape.num_layers                      # a first step's first touches, left out
        return {"decide_us": first + [52.0 + d for d in (-4.0, 0.0, 3.0)] * (23 * shape.num_layers // 3 + 1)}
    entry, notes, fitted = calibration_timed_by_the_simulator({"layer_overhead_us": 70.0, "copy_wait_us": 8.0},
                                                              hits_extra=hits_extra)
    assert entry["prefetch_latency_us"] == 52.0 and notes["prefetch_latency_us_raw"] == 52.0
    assert entry["copy_wait_us"] == pytest.approx(8.0, abs=0.01)       # the misses' fit does not move
    measured = [m for _, m in hardware_from_dict(fitted, "fitted").measured_compute]
    assert [m.prefetch_latency_us for m in measured] == [52.0]
    older, older_notes, _ = calibration_timed_by_the_simulator({"layer_overhead_us": 70.0, "copy_wait_us": 8.0})
    assert "prefetch_latency_us" not in older and "prefetch_latency_us_raw" not in older_notes


ENGINE_DEVICES = ["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else [])


@pytest.mark.parametrize("device", ENGINE_DEVICES)
def test_the_engine_stamps_its_decision_on_every_layer_without_a_demand_copy(device):
    """The engine's host clock from the routing read-back to the prefetch decision: one value per layer that
    issued no demand copy, none for a layer that did; the calibration's hits pattern returns it."""
    from real.calibration import run_pattern
    model, shape, engine, layers_with_a_copy = lru_engine_counting_copies(device)
    assert 0 < len(engine.decide_ns) == layers_with_a_copy.count(False) < len(layers_with_a_copy)
    assert len(engine.decide_ns) + len(engine.miss_issue_ns) == len(layers_with_a_copy)
    assert all(ns > 0 for ns in engine.decide_ns)
    steps = 5
    hits = run_pattern(model, shape, "hits", steps).to_dict()
    assert len(hits["decide_us"]) == (steps - 1) * shape.num_layers and min(hits["decide_us"]) > 0
    misses = run_pattern(model, shape, "misses", steps).to_dict()
    assert misses["decide_us"] == []                               # every layer of it copies on demand
