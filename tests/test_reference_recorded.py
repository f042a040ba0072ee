"""The SimPy reference against results recorded before its bookkeeping was made cheaper (commit 050f714,
whose link took the controller's next copy the moment an engine freed: ``copies_in_flight=None`` now):
the controller, cache, copy queue and policies must decide exactly as they did. The equivalence tests
hold the fast path to the reference; this holds the reference to its own past, for the policies
without a kernel too (prefetching, predictive, lossy).

``RECORDED_WINDOW`` holds the engine's copy window (``copies_in_flight``, the default since facfd22) to results
recorded by the SimPy model of it at 3525cd4, before its copies became entries on a heap instead of SimPy
events (``sim.simulator._WindowClock``)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from hardware.profile import load_hardware
from offload.session import RunSettings
from policies.affinity import AffinityPredictor
from policies.registry import resolve_policy
from sim.simulator import simulate
from traces import DEFAULT_TRACE, load_trace, synthetic_trace

MOE_LM = DEFAULT_TRACE.parents[1] / "moe-lm-h100.npz"

# (trace, policy, slots, mode, precision, depth, hardware) -> (hits, late, prefetches, copies, cancelled,
# dropped, decode ns) on the first 600 replayed tokens (S: the default trace; M: moe-lm-h100, all of it).
RECORDED = [
    ("S", "lru", 4, "per_layer", "bf16", 1, "h100-pcie5", (23784, 0, 0, 36792, 0, 0, 34841893844)),
    ("S", "lfu", 8, "per_layer", "bf16", 1, "h100-pcie5", (39142, 0, 0, 21434, 0, 0, 21160399406)),
    ("S", "fifo", 6, "global", "mxfp4", 1, "h100-pcie5", (23584, 0, 0, 36992, 0, 0, 10144568160)),
    ("S", "static", 8, "per_layer", "bf16", 1, "a100-pcie4", (34191, 0, 0, 26385, 0, 0, 54784289827)),
    ("S", "belady", 8, "per_layer", "mxfp4", 1, "h100-pcie5", (44933, 0, 0, 15643, 0, 0, 5244574177)),
    ("S", "affinity", 8, "per_layer", "bf16", 1, "h100-pcie5", (33266, 11069, 26254, 33349, 9146, 0, 30667573459)),
    ("S", "affinity", 6, "per_layer", "mxfp4", 3, "h100-pcie5", (26580, 14624, 56314, 40690, 34996, 0, 10100130769)),
    ("S", "affinity", 5, "global", "mxfp4", 2, "h100-pcie5", (24691, 16870, 51155, 42397, 27773, 0, 10503132016)),
    ("M", "lookahead", 2, "per_layer", "bf16", 2, "h100-pcie5-measured", (2575, 1620, 2375, 2524, 264, 0, 1324222400)),
    ("M", "mixtral-offloading", 3, "per_layer", "bf16", 1, "h100-pcie5-measured",
     (2800, 1250, 1589, 2073, 74, 0, 1281512932)),
    ("M", "speculating-experts-lossy", 2, "per_layer", "bf16", 1, "h100-pcie5-measured",
     (1967, 1931, 1931, 2641, 0, 0, 1498941820)),
]


# (trace, policy, slots, mode, precision, depth, hardware, copies_in_flight, copy_engines) -> as RECORDED
RECORDED_WINDOW = [
    ("S", "lru", 4, "per_layer", "bf16", 1, "h100-pcie5", 1, 2, (23784, 0, 0, 36792, 0, 0, 34841893844)),
    ("S", "fifo", 6, "global", "mxfp4", 1, "h100-pcie5", 2, None, (23584, 0, 0, 36992, 0, 0, 10144568160)),
    ("S", "oracle", 8, "per_layer", "bf16", 1, "h100-pcie5", 2, None, (44933, 15639, 15639, 15643, 0, 0, 15159269172)),
    ("S", "oracle", 6, "global", "mxfp4", 30, "h100-pcie5", 3, 2, (53463, 7109, 18094, 18098, 0, 0, 2603379985)),
    ("S", "affinity", 8, "per_layer", "bf16", 1, "h100-pcie5", 2, None, (34967, 10972, 27674, 28796, 13515, 0, 27203555814)),
    ("S", "affinity", 8, "per_layer", "bf16", 1, "h100-pcie5", 1, 2, (35984, 10888, 29136, 25695, 17145, 0, 24580873369)),
    ("S", "affinity", 6, "per_layer", "mxfp4", 3, "h100-pcie5", 2, None, (29131, 14452, 57823, 34126, 40690, 0, 9200280256)),
    ("S", "affinity", 5, "global", "mxfp4", 2, "h100-pcie5", 1, 2, (23831, 17611, 55290, 37077, 37347, 0, 10101333437)),
    ("M", "lookahead", 2, "per_layer", "bf16", 2, "h100-pcie5-measured", 2, None, (2565, 1613, 2376, 2481, 281, 44, 1423988979)),
    ("M", "lookahead", 2, "per_layer", "bf16", 2, "h100-pcie5-measured", 1, 2, (2480, 1788, 2357, 2246, 451, 0, 1627500917)),
    ("M", "mixtral-offloading", 3, "per_layer", "bf16", 1, "h100-pcie5-measured", 2, None,
     (2834, 1259, 1603, 2026, 92, 0, 1348992194)),
    ("M", "speculating-experts-lossy", 2, "per_layer", "bf16", 1, "h100-pcie5-measured", 2, None,
     (2160, 1931, 1931, 2448, 0, 0, 1579319540)),
]


@pytest.fixture(scope="module")
def traces():
    out = {}
    for name, path in (("S", DEFAULT_TRACE), ("M", MOE_LM)):
        train, run = load_trace(path).split(0.25)
        out[name] = train, run.head_tokens(600)
    return out


@pytest.mark.parametrize("trace, policy, slots, mode, precision, depth, hardware, recorded", RECORDED)
def test_the_reference_gives_the_recorded_results(traces, trace, policy, slots, mode, precision, depth, hardware,
                                                  recorded):
    train, run = traces[trace]
    r = simulate(run, resolve_policy(policy), load_hardware(hardware),
                 RunSettings(cache_slots=slots, cache_mode=mode, precision=precision, prefetch_depth=depth,
                             copies_in_flight=None),
                 train_trace=train, path="reference")
    s = r.stats
    assert (s.hits, s.late, s.prefetches, s.copies, s.cancelled, s.dropped, sum(r.token_ns)) == recorded


@pytest.mark.parametrize("trace, policy, slots, mode, precision, depth, hardware, window, engines, recorded",
                         RECORDED_WINDOW)
def test_the_copy_window_gives_the_recorded_results(traces, trace, policy, slots, mode, precision, depth, hardware,
                                                    window, engines, recorded):
    train, run = traces[trace]
    profile = load_hardware(hardware)
    if engines is not None:
        profile = profile.with_overrides(copy_engines=engines)
    r = simulate(run, resolve_policy(policy), profile,
                 RunSettings(cache_slots=slots, cache_mode=mode, precision=precision, prefetch_depth=depth,
                             copies_in_flight=window),
                 train_trace=train, path="reference")
    s = r.stats
    assert (s.hits, s.late, s.prefetches, s.copies, s.cancelled, s.dropped, sum(r.token_ns)) == recorded


@given(st.integers(1, 6), st.integers(2, 9), st.integers(1, 4), st.integers(1, 8), st.integers(0, 2**16))
def test_affinity_predicts_a_token_at_once_as_layer_by_layer(layers, experts, top_k, depth, seed):
    top_k = min(top_k, experts)
    train = synthetic_trace(num_tokens=60, num_layers=layers, num_experts=experts, top_k=top_k, seed=seed,
                            temporal_locality=0.5, cross_layer_locality=0.7)
    run = synthetic_trace(num_tokens=20, num_layers=layers, num_experts=experts, top_k=top_k, seed=seed + 1)
    predictor = AffinityPredictor(train.experts, experts, depth)
    for t in range(run.num_tokens):
        batch = predictor.predict_token(run.experts[t].astype(np.int64), top_k)
        assert len(batch) == min(depth, layers - 1)
        for d, rows in enumerate(batch, 1):
            assert rows == [predictor.predict(layer, run.experts[t, layer].tolist(), d, top_k)
                            for layer in range(layers - d)]
