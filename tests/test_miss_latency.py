"""``miss_latency``: a demand copy starts that long after the host reaches the layer's copy start (the routing
read-back to the copy's issue, measured by the engine), the host busy meanwhile, the compute stream not.
Hand-computed cases in both clocks of the reference and the fast path; the profile's field and its layout."""
from __future__ import annotations

import dataclasses

import pytest
from conftest import calibration_timed_by_the_simulator, lru_engine_counting_copies

from hardware.profile import (
    MeasuredCompute,
    hardware_from_dict,
    hardware_to_dict,
    load_hardware,
)
from offload.session import RunSettings
from policies.lru import LRU
from policies.registry import resolve_policy
from sim.simulator import simulate
from traces import synthetic_trace

BASE = load_hardware("h100-pcie5").with_overrides(pcie_GBps=10.0, copy_latency_us=10.0)
EXPERT_BYTES = 2**20


def _hardware(trace, miss_latency_us, copy_wait_us=6.0, decision_us=0.0):
    measured = MeasuredCompute("bf16", ((0, 40.0), (4096, 40.0)), router_us=3.0, expert_us=20.0,
                               layer_overhead_us=11.0, token_overhead_us=100.0, copy_wait_us=copy_wait_us,
                               decision_us=(("LRU", decision_us),) if decision_us else (),
                               miss_latency_us=miss_latency_us)
    return dataclasses.replace(BASE, measured_compute=((trace.model.name, measured),))


def _one_hit_one_miss_trace():
    """One layer, 3 experts, top-2, 2 slots: token 0 copies experts 0 and 1; from token 1 on, expert 0 hits and
    the other misses (expert 0 is in use in its layer, so the victim is the other slot)."""
    trace = synthetic_trace(num_tokens=4, num_layers=1, num_experts=3, top_k=2, popularity_skew=0,
                            temporal_locality=0, seed=3, expert_bytes=EXPERT_BYTES)
    trace.experts[:, 0, :] = [[0, 1], [0, 2], [0, 1], [0, 2]]
    return trace


@pytest.mark.parametrize("window", [None, 1, 2])
def test_a_demand_copy_starts_miss_latency_after_the_router_and_the_hit_does_not_wait(window):
    trace = _one_hit_one_miss_trace()
    ml_us = 37.5
    hw = _hardware(trace, ml_us)
    cost = hw.compute_cost(trace.model, "bf16")
    assert cost.miss_latency_ns == 37_500
    copy, E, cw, ML = hw.copy.copy_ns(EXPERT_BYTES), cost.expert_ns, cost.copy_wait_ns, cost.miss_latency_ns
    head = cost.attention_ns(0) + cost.layer_overhead_ns + cost.router_ns     # the router's end, from the token's start
    assert copy > E + cw                                                        # the misses wait for their copies
    settings = RunSettings(cache_slots=2, copies_in_flight=window)
    ref = simulate(trace, LRU, hw, settings, record_timeline=True, path="reference")
    # token 0: two copies back to back on one engine from head + ML; the second expert waits for the second
    # copy (with a window of one, the host commits it when the first lands: the same start)
    first = cost.token_overhead_ns + head + ML + 2 * copy + cw + E
    # later tokens: the hit computes from the router's end; the miss's copy starts ML later
    later = cost.token_overhead_ns + head + ML + copy + cw + E
    assert ref.token_ns == [first, later, later, later]
    ends = [0] + [sum(ref.token_ns[:i + 1]) for i in range(4)]
    for t in range(1, 4):
        router_end = ends[t] + cost.token_overhead_ns + head
        (hit,) = [c for c in ref.timeline.compute if c.token == t and c.key == 0]
        assert hit.start_ns == router_end                      # the compute stream is not held by the host
        (cp,) = [c for c in ref.timeline.copies if c.key == trace.experts[t, 0, 1]
                 and ends[t] <= c.start_ns < ends[t + 1]]
        assert cp.demand and cp.start_ns == router_end + ML and cp.demand_since_ns == router_end
    assert simulate(trace, LRU, hw, settings, path="fast").token_ns == ref.token_ns
    # miss_latency 0: the copies start at the router's end, as before the split
    zero = simulate(trace, LRU, _hardware(trace, 0.0), settings, path="reference")
    assert zero.token_ns == [t - ML for t in ref.token_ns]


@pytest.mark.parametrize("window", [None, 2])
def test_the_host_is_busy_for_miss_latency_before_its_decision(window):
    """A long host decision dominates the layer: it starts after the miss's issue, so a miss layer ends
    ``ML + decision`` after the router and a hit layer ``decision`` after it."""
    trace = synthetic_trace(num_tokens=4, num_layers=1, num_experts=2, top_k=1, popularity_skew=0,
                            temporal_locality=0, seed=3, expert_bytes=EXPERT_BYTES)
    trace.experts[:, 0, 0] = [0, 0, 1, 1]      # miss, hit, miss, hit
    hw = _hardware(trace, 40.0, decision_us=900.0)
    cost = hw.compute_cost(trace.model, "bf16")
    head = cost.token_overhead_ns + cost.attention_ns(0) + cost.layer_overhead_ns + cost.router_ns
    decision, ML = cost.decision_ns(LRU), cost.miss_latency_ns
    assert decision > ML + hw.copy.copy_ns(EXPERT_BYTES) + cost.copy_wait_ns + cost.expert_ns
    settings = RunSettings(cache_slots=1, copies_in_flight=window)
    for path in ("reference", "fast"):
        assert simulate(trace, LRU, hw, settings, path=path).token_ns == [head + ML + decision, head + decision] * 2


def test_a_late_prefetch_promoted_to_demand_waits_miss_latency_too():
    """Prefetching policies: every copy that was a queued demand fetch when it started (a new miss or a prefetch
    promoted by ``begin_layer`` before it started) starts no earlier than its promotion plus ``miss_latency``, in
    both clocks; some start exactly then, and some promoted prefetches are among them."""
    promoted_seen = tight_seen = 0
    for seed in range(6):
        trace = synthetic_trace(num_tokens=30, num_layers=3, num_experts=8, top_k=2, seed=seed,
                                temporal_locality=0.5, expert_bytes=EXPERT_BYTES)
        for ml_us in (0.0, 55.0):
            hw = _hardware(trace, ml_us).with_overrides(copy_engines=1 + seed % 2)
            ML = round(ml_us * 1000)
            for policy in ("oracle", "affinity"):
                for window in (None, 1, 2):
                    run = simulate(trace, resolve_policy(policy), hw, RunSettings(cache_slots=3, copies_in_flight=window),
                                   train_trace=trace, record_timeline=True, path="reference")
                    for c in run.timeline.copies:
                        if c.demand and c.start_order > c.demand_order:    # a demand fetch when it started
                            assert c.start_ns >= c.demand_since_ns + ML, (policy, window, c)
                            tight_seen += c.start_ns == c.demand_since_ns + ML
                            promoted_seen += ML > 0 and c.queued_ns < c.demand_since_ns
    assert tight_seen and promoted_seen


@pytest.mark.parametrize("field, bad", [("miss_latency_us", -1.0), ("prefetch_latency_us", float("nan"))])
def test_the_profile_keeps_its_layout_without_the_host_latencies(field, bad):
    """``miss_latency_us`` and ``prefetch_latency_us`` (tests/test_prefetch_latency.py) are written only when
    measured, read back as given, and checked."""
    profile = load_hardware("h100-pcie5-measured")
    data = hardware_to_dict(profile)
    assert all(field not in e for by_p in data["measured_compute"].values() for e in by_p.values())
    model, precision = "moe-lm", "bf16"
    data["measured_compute"][model][precision][field] = 61.25
    again = hardware_from_dict(data, "with-latency")
    assert hardware_to_dict(again)["measured_compute"][model][precision][field] == 61.25
    assert getattr(dict(again.measured_compute)[model], field) == 61.25
    data["measured_compute"][model][precision][field] = bad
    with pytest.raises(ValueError, match=field):
        hardware_from_dict(data, "bad")


def _calibration_timed_by_the_simulator(miss_latency_us, copy_wait_us, issue_us):
    """``conftest.calibration_timed_by_the_simulator`` with these host costs, the misses pattern carrying
    ``issue_us(shape)`` as its ``miss_issue_us`` (None: a calibration from before it)."""
    return calibration_timed_by_the_simulator(
        {"layer_overhead_us": 70.0, "copy_wait_us": copy_wait_us, "miss_latency_us": miss_latency_us},
        None if issue_us is None else (lambda shape: {"miss_issue_us": issue_us(shape)}))


def test_the_fit_splits_the_misses_residual_into_miss_latency_and_copy_wait():
    # one value per layer and step: the first step's (first touches, left out) far off, the rest around 45 us
    def issue(shape):
        first = [400.0] * shape.num_layers
        return first + [45.0 + d for d in (-2.0, 0.0, 1.5)] * (23 * shape.num_layers // 3 + 1)
    entry, notes, fitted = _calibration_timed_by_the_simulator(45.0, 8.0, issue)
    assert entry["miss_latency_us"] == 45.0 and notes["miss_latency_us_raw"] == 45.0
    assert entry["copy_wait_us"] == pytest.approx(8.0, abs=0.01)
    assert notes["copy_wait_us_raw"] == pytest.approx(8.0, abs=0.01)
    assert hardware_from_dict(fitted, "fitted")   # the fitted profile loads, miss_latency in it


def test_a_calibration_without_miss_issue_keeps_the_single_copy_wait():
    """Older calibrations (the committed bundles) fit as before: no miss_latency, and copy_wait holds the whole
    miss cost; for an on-demand pattern the two models give the same total."""
    entry, notes, fitted = _calibration_timed_by_the_simulator(45.0, 8.0, None)
    assert "miss_latency_us" not in entry and "miss_latency_us_raw" not in notes
    assert entry["copy_wait_us"] == pytest.approx(53.0, abs=0.01)
    measured = [m for _, m in hardware_from_dict(fitted, "fitted").measured_compute]
    assert [m.miss_latency_us for m in measured] == [0.0]


def test_a_negative_miss_issue_median_is_kept_at_zero_and_reported():
    entry, notes, _ = _calibration_timed_by_the_simulator(0.0, 8.0, lambda shape: [-3.0] * (24 * shape.num_layers))
    assert entry["miss_latency_us"] == 0.0 and notes["miss_latency_us_raw"] == -3.0
    assert entry["copy_wait_us"] == pytest.approx(8.0, abs=0.01)


ENGINE_DEVICES = ["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else [])


@pytest.mark.parametrize("device", ENGINE_DEVICES)
def test_the_engine_stamps_one_miss_issue_per_layer_with_a_demand_copy(device):
    """The engine's host clock from the routing read-back to the layer's first demand copy's issue: one value
    per layer that issued a demand copy, none for a layer of hits; the calibration's misses pattern returns it."""
    from real.calibration import run_pattern
    model, shape, engine, layers_with_a_copy = lru_engine_counting_copies(device)
    assert 0 < len(engine.miss_issue_ns) == sum(layers_with_a_copy) < len(layers_with_a_copy)
    assert all(ns > 0 for ns in engine.miss_issue_ns)
    steps = 5
    misses = run_pattern(model, shape, "misses", steps).to_dict()
    assert len(misses["miss_issue_us"]) == steps * shape.num_layers and min(misses["miss_issue_us"]) > 0
    hits = run_pattern(model, shape, "hits", steps).to_dict()
    assert len(hits["miss_issue_us"]) == shape.num_layers        # only the first step copies
