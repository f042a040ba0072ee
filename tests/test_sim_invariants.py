"""Invariants of the simulator and the shared controller, on hypothesis-generated traces.

Each check reads the event timeline (what was computed when, what was copied where) rather than the
controller's own counters, so a bookkeeping bug cannot hide behind itself.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

import pytest
from hypothesis import given, strategies as st

from policies.registry import resolve_policy
from hardware.profile import load_hardware
from sim.replay import replay_untimed
from offload.session import RunSettings
from sim.simulator import simulate
from traces import synthetic_trace

ON_DEMAND = ["lru", "lfu", "fifo", "belady"]
ALL = ON_DEMAND + ["static", "oracle", "affinity"]
H100 = load_hardware("h100-pcie5")


@st.composite
def traces(draw, max_tokens=24, max_layers=3, max_experts=8):
    layers = draw(st.integers(1, max_layers))
    experts = draw(st.integers(2, max_experts))
    top_k = draw(st.integers(1, min(3, experts)))
    tokens = draw(st.integers(2, max_tokens))
    return synthetic_trace(
        num_tokens=tokens, num_layers=layers, num_experts=experts, top_k=top_k,
        num_requests=draw(st.integers(1, min(3, tokens))),
        popularity_skew=draw(st.sampled_from([0.0, 1.0, 2.0])),
        temporal_locality=draw(st.sampled_from([0.0, 0.5, 0.9])),
        cross_layer_locality=draw(st.sampled_from([0.0, 0.7])),
        seed=draw(st.integers(0, 2**16)), expert_bytes=draw(st.sampled_from([2**16, 2**20, 2**24])))


@st.composite
def scenarios(draw, policies=ALL):
    trace = draw(traces())
    shape = trace.model
    mode = draw(st.sampled_from(["per_layer", "global"]))
    # a global pool only has to hold one layer's top-k: fewer slots per layer than top-k are allowed there
    least = shape.top_k if mode == "per_layer" else -(-shape.top_k // shape.num_layers)
    slots = draw(st.integers(least, shape.num_experts))
    hardware = H100.with_overrides(pcie_GBps=draw(st.sampled_from([0.5, 5.0, 50.0])),
                                   copy_engines=draw(st.integers(1, 2)))
    settings = RunSettings(cache_slots=slots, cache_mode=mode,
                           prefetch_depth=draw(st.integers(1, 3)))
    return trace, draw(st.sampled_from(policies)), hardware, settings


def run(trace, policy, hardware=H100, settings=None, record=True):
    settings = settings or RunSettings(cache_slots=trace.model.top_k)
    # The invariants are the SimPy reference's; the fast path is held to it by tests/test_fast_path.py.
    return simulate(trace, resolve_policy(policy), hardware, settings, train_trace=trace,
                    record_timeline=record, path="reference")


@given(scenarios())
def test_every_chosen_expert_is_computed_exactly_once(scenario):
    trace, policy, hardware, settings = scenario
    result = run(trace, policy, hardware, settings)
    E, L = trace.num_experts, trace.num_layers
    expected = Counter((t, l, l * E + int(e)) for t in range(trace.num_tokens) for l in range(L)
                       for e in trace.experts[t, l])
    computed = Counter((c.token, c.layer, c.key) for c in result.timeline.compute)
    assert computed == expected


@given(scenarios())
def test_bytes_moved_equal_completed_copies_times_expert_bytes(scenario):
    trace, policy, hardware, settings = scenario
    result = run(trace, policy, hardware, settings)
    copies = result.timeline.copies
    assert result.metrics["bytes_moved"] == len(copies) * trace.model.expert_bytes(settings.precision)
    assert result.metrics["copies"] == len(copies)
    assert all(c.end_ns - c.start_ns == hardware.copy.copy_ns(trace.model.expert_bytes("bf16"))
               for c in copies)


@given(scenarios())
def test_no_expert_is_computed_before_its_copy_completes(scenario):
    trace, policy, hardware, settings = scenario
    result = run(trace, policy, hardware, settings)
    into_slot = defaultdict(list)
    for c in result.timeline.copies:
        into_slot[c.slot].append(c)
    for c in result.timeline.compute:
        # The slot's content while the expert computes: the last copy into it started before the
        # compute ends must be this expert, finished before the compute started.
        earlier = [cp for cp in into_slot[c.slot] if cp.start_ns < c.end_ns]
        if earlier:
            last = max(earlier, key=lambda cp: cp.start_order)
            assert last.key == c.key, f"slot {c.slot} holds {last.key} while {c.key} computes"
            assert last.end_ns <= c.start_ns
        else:
            assert result.timeline.preloaded.get(c.slot) == c.key
    # And no copy overwrote a slot while its expert was computing.
    for c in result.timeline.compute:
        for cp in into_slot[c.slot]:
            assert not (c.start_ns < cp.start_ns < c.end_ns)


@given(scenarios())
def test_demand_fetch_never_waits_behind_a_queued_prefetch(scenario):
    trace, policy, hardware, settings = scenario
    copies = run(trace, policy, hardware, settings).timeline.copies
    demands = [c for c in copies if c.demand]
    for p in (c for c in copies if not c.demand):
        # No demand fetch was waiting (demanded before p started, started after it).
        assert not any(d.demand_order < p.start_order < d.start_order for d in demands)


@given(scenarios())
def test_same_config_gives_identical_metrics(scenario):
    trace, policy, hardware, settings = scenario
    a = run(trace, policy, hardware, settings, record=False).metrics
    b = run(trace, policy, hardware, settings, record=False).metrics
    assert repr(a) == repr(b)


@given(scenarios(policies=ON_DEMAND + ["static"]))
def test_on_demand_hits_do_not_depend_on_the_clock(scenario):
    """The SimPy clock and the untimed replay drive the same controller: same hits."""
    trace, policy, hardware, settings = scenario
    timed = run(trace, policy, hardware, settings, record=False).stats
    untimed = replay_untimed(trace, resolve_policy(policy), settings, train_trace=trace, path="reference")
    assert (timed.hits, timed.misses, timed.copies) == (untimed.hits, untimed.misses, untimed.copies)


@given(traces(), st.data())
def test_belady_hits_at_least_every_other_eviction_policy(trace, data):
    mode = data.draw(st.sampled_from(["per_layer", "global"]))
    slots = data.draw(st.integers(trace.model.top_k, trace.num_experts))
    belady = replay_untimed(trace, resolve_policy("belady"), RunSettings(slots, mode)).hits
    # static is left out: it preloads its slots, which a cold-started Belady does not.
    for policy in ("lru", "lfu", "fifo"):
        assert belady >= replay_untimed(trace, resolve_policy(policy), RunSettings(slots, mode)).hits, policy


def brute_force_max_hits(steps: list[set[int]], slots: int) -> int:
    """Most hits any eviction schedule achieves when each step's set must be resident together."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def best(i: int, cache: frozenset) -> int:
        if i == len(steps):
            return 0
        need = steps[i]
        hits = len(need & cache)
        missing = need - cache
        overflow = len(cache) + len(missing) - slots
        if overflow <= 0:
            return hits + best(i + 1, cache | missing)
        choices = sorted(cache - need)
        return hits + max(best(i + 1, (cache - set(victims)) | missing)
                          for victims in combinations(choices, overflow))
    return best(0, frozenset())


@given(traces(max_tokens=7, max_layers=1, max_experts=5), st.data())
def test_belady_equals_brute_force_optimum_on_tiny_traces(trace, data):
    slots = data.draw(st.integers(trace.model.top_k, trace.num_experts))
    steps = [set(map(int, trace.experts[t, 0])) for t in range(trace.num_tokens)]
    for path in ("reference", "auto"):       # the SimPy walk and the compiled kernel
        assert replay_untimed(trace, resolve_policy("belady"), RunSettings(slots), path=path).hits == \
            brute_force_max_hits(steps, slots)


def reference_lru_hits(trace, slots: int) -> int:
    """Textbook LRU per layer, a list ordered least recent first; a layer's chosen set is protected."""
    hits = 0
    for layer in range(trace.num_layers):
        order: list[int] = []
        for t in range(trace.num_tokens):
            chosen = [int(e) for e in trace.experts[t, layer]]
            for e in chosen:
                if e in order:
                    hits += 1
                    order.remove(e)
                    order.append(e)
            for e in chosen:
                if e not in order:
                    if len(order) == slots:
                        order.remove(next(x for x in order if x not in chosen))
                    order.append(e)
    return hits


@given(traces(), st.data())
def test_lru_matches_reference_implementation(trace, data):
    slots = data.draw(st.integers(trace.model.top_k, trace.num_experts))
    for path in ("reference", "auto"):
        assert replay_untimed(trace, resolve_policy("lru"), RunSettings(slots), path=path).hits == \
            reference_lru_hits(trace, slots)
    assert run(trace, "lru", settings=RunSettings(cache_slots=slots), record=False).stats.hits == \
        reference_lru_hits(trace, slots)


@given(traces())
def test_all_experts_resident_means_no_stalls(trace):
    result = run(trace, "static", settings=RunSettings(cache_slots=trace.num_experts), record=False)
    m = result.metrics
    assert m["copies"] == 0 and m["misses"] == 0 and m["stall_ms_per_token"] == 0
    assert m["hit_rate"] == 1.0


@given(scenarios(policies=ON_DEMAND + ["static"]), st.floats(0.1, 0.9))
def test_lower_bandwidth_never_raises_tokens_per_s(scenario, factor):
    trace, policy, hardware, settings = scenario
    fast = hardware.with_overrides(pcie_GBps=20.0)
    slow = hardware.with_overrides(pcie_GBps=20.0 * factor)
    assert run(trace, policy, slow, settings, record=False).metrics["tokens_per_s"] <= \
        run(trace, policy, fast, settings, record=False).metrics["tokens_per_s"]


def test_stall_time_is_accounted_on_a_known_case():
    """One layer, one expert per token, one slot, every token a different expert: each token waits
    for exactly one copy after its router; the time per token is known in closed form."""
    trace = synthetic_trace(num_tokens=6, num_layers=1, num_experts=2, top_k=1, popularity_skew=0,
                            temporal_locality=0, seed=3, expert_bytes=2**20)
    # Force alternation so every access misses.
    trace.experts[:, 0, 0] = [0, 1, 0, 1, 0, 1]
    hw = H100.with_overrides(pcie_GBps=10.0, copy_latency_us=10.0)
    result = run(trace, "lru", hw, RunSettings(cache_slots=1), record=False)
    cost = hw.compute_cost(trace.model, "bf16")
    copy = hw.copy.copy_ns(2**20)
    per_token = [cost.token_overhead_ns + cost.attention_ns(i) + cost.layer_overhead_ns + cost.router_ns
                 + copy + cost.expert_ns for i in range(6)]
    assert result.token_ns == per_token
    assert result.metrics["stall_ms_per_token"] == pytest.approx(copy / 1e6)
