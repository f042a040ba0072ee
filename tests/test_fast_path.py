"""The fast path (``sim.fast_path``: compiled hit/miss kernels plus the closed-form timing) against
its reference, the SimPy simulator and the untimed replay, on generated traces and configurations:
identical counts (hits, misses, copies, evictions, bytes), integer-ns token times and metrics.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hardware.profile import MeasuredCompute, load_hardware
from offload.next_use import NEVER, NextUse
from offload.session import RunSettings
from policies.lru import LRU
from policies.registry import resolve_policy
from sim import kernels
from sim.fast_path import fast_replay_untimed, fast_simulate, kernel_for
from sim.replay import replay_untimed
from sim.simulator import simulate
from traces import DEFAULT_TRACE, load_trace, synthetic_trace

KERNEL_POLICIES = sorted(kernels.KERNELS)
PRECISIONS = ["bf16", "fp8", "mxfp4", "int4", "int3", "int2"]
ROOT = Path(__file__).resolve().parents[1]
PROFILES = {name: load_hardware(name) for name in ("h100-pcie5", "a100-pcie4", "h100-pcie5-measured")}


def assert_same_as_reference(trace, policy, hardware, run_settings, train):
    """Both paths on one configuration: everything the simulator and the replay report must agree."""
    fast = fast_simulate(trace, policy, hardware, run_settings, train)
    ref = simulate(trace, resolve_policy(policy), hardware, run_settings, train_trace=train, path="reference")
    assert fast.stats == ref.stats
    assert fast.token_ns == ref.token_ns
    assert fast.metrics == ref.metrics
    assert fast.layer_steps == ref.layer_steps
    assert fast_replay_untimed(trace, policy, run_settings, train) == replay_untimed(
        trace, resolve_policy(policy), run_settings, train, path="reference")


@st.composite
def configurations(draw):
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(2, 10))
    top_k = draw(st.integers(1, min(4, experts)))
    tokens = draw(st.integers(2, 40))

    def trace(seed):
        return synthetic_trace(
            num_tokens=tokens, num_layers=layers, num_experts=experts, top_k=top_k,
            num_requests=draw(st.integers(1, min(3, tokens))),
            popularity_skew=draw(st.sampled_from([0.0, 1.0, 2.0])),
            temporal_locality=draw(st.sampled_from([0.0, 0.5, 0.9])),
            cross_layer_locality=draw(st.sampled_from([0.0, 0.7])),
            seed=seed, expert_bytes=draw(st.sampled_from([2**16, 2**20, 2**24])))

    seed = draw(st.integers(0, 2**16))
    decode, train = trace(seed), trace(seed + 1)     # static learns its pins from another slice
    mode = draw(st.sampled_from(["per_layer", "global"]))
    # A global pool may hold more than one layer's experts per layer, or fewer than top-k per layer as long
    # as the pool holds a layer's top-k.
    slots = draw(st.integers(top_k, experts) if mode == "per_layer" else st.integers(-(-top_k // layers), experts + 2))
    hardware = PROFILES[draw(st.sampled_from(sorted(PROFILES)))]
    link = draw(st.sampled_from([None, 0.5, 5.0, 50.0]))
    hardware = hardware.with_overrides(copy_engines=draw(st.integers(1, 3)),
                                       **({} if link is None else {"pcie_GBps": link}))
    if draw(st.booleans()):
        # Measured compute for this shape: piecewise-linear attention with fractional microseconds.
        measured = MeasuredCompute(
            "bf16", ((0, draw(st.sampled_from([40.0, 186.08]))), (draw(st.sampled_from([64, 1024])), 190.19)),
            router_us=draw(st.sampled_from([0.0, 2.5])), expert_us=draw(st.sampled_from([21.89, 300.0])),
            layer_overhead_us=draw(st.sampled_from([0.0, 74.76])), token_overhead_us=174.54,
            # the host's costs: a copy's end to its waiting expert, and a policy's decision per layer,
            copy_wait_us=draw(st.sampled_from([0.0, 7.3, 250.0])),
            # and a demand copy's issue after the host reaches the layer's copy start
            miss_latency_us=draw(st.sampled_from([0.0, 4.2, 131.7])),
            decision_us=draw(st.sampled_from([(), tuple((resolve_policy(p).__name__, us) for p in KERNEL_POLICIES
                                                         for us in [draw(st.sampled_from([3.1, 900.0]))])])),
            layer_extra_us=draw(st.sampled_from([(), tuple((resolve_policy(p).__name__, 17.3) for p in KERNEL_POLICIES)])))
        hardware = dataclasses.replace(hardware, measured_compute=((decode.model.name, measured),))
    run_settings = RunSettings(cache_slots=slots, cache_mode=mode,
                               precision=draw(st.sampled_from(PRECISIONS)),
                               prompt_tokens=draw(st.sampled_from([0, 1, 37, 4096])),
                               copies_in_flight=draw(st.sampled_from([None, 1, 2, 3])))
    return decode, train, draw(st.sampled_from(KERNEL_POLICIES)), hardware, run_settings


@settings(max_examples=500)
@given(configurations())
def test_fast_path_equals_the_simulator_and_the_replay(configuration):
    decode, train, policy, hardware, run_settings = configuration
    assert_same_as_reference(decode, policy, hardware, run_settings, train)


@pytest.mark.parametrize("policy", KERNEL_POLICIES)
@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_fast_path_equals_the_simulator_on_recorded_routing(policy, mode):
    """Real routing: the committed gpt-oss sample (analytic compute, several links and precisions)
    and the H100 moe-lm trace with the profile's measured compute."""
    train, decode = load_trace(DEFAULT_TRACE).split(0.25)
    decode = decode.select_requests(1, 2)      # its shortest request but one (120 tokens): keeps it quick
    for slots, engines, precision, prompt, hardware in [(5, 1, "bf16", 0, "h100-pcie5"),
                                                         (7, 2, "mxfp4", 1000, "a100-pcie4")]:
        assert_same_as_reference(decode, policy, PROFILES[hardware].with_overrides(copy_engines=engines),
                                 RunSettings(cache_slots=slots, cache_mode=mode, precision=precision,
                                             prompt_tokens=prompt), train)
    train, decode = load_trace(ROOT / "traces" / "moe-lm-h100.npz").split(0.25)
    assert_same_as_reference(decode, policy, PROFILES["h100-pcie5-measured"],
                             RunSettings(cache_slots=3, cache_mode=mode, prompt_tokens=300), train)


class _SubclassedLRU(LRU):
    """Overrides nothing, yet a subclass may override any hook, so it takes the reference."""


@pytest.mark.parametrize("policy, params", [
    ("oracle", {}), ("affinity", {}), ("mixtral-offloading", {}), ("speculating-experts-lossy", {}),
    (_SubclassedLRU, {}), (f"{ROOT / 'examples' / 'my_policy.py'}:PopularNextLayer", {}), ("lru", {"anything": 1}),
])
def test_policies_without_a_kernel_take_the_reference(policy, params):
    trace = synthetic_trace(num_tokens=4, num_layers=2, num_experts=4, top_k=2)
    assert kernel_for(policy, params) is None
    assert fast_simulate(trace, policy, PROFILES["h100-pcie5"],
                         RunSettings(cache_slots=2, policy_params=params), trace) is None


def test_next_use_table_is_the_oracle_in_four_bytes_per_access():
    trace = synthetic_trace(num_tokens=300, num_layers=5, num_experts=9, top_k=3, temporal_locality=0.5)
    table = kernels.next_use_table(trace.experts, trace.num_experts)
    oracle = NextUse(trace.experts, trace.num_experts)._next_step
    assert table.dtype == np.int32 and table.nbytes == 4 * trace.experts.size
    assert np.array_equal(np.where(table == kernels.NEVER, -1, table), np.where(oracle == NEVER, -1, oracle))
