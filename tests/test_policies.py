"""The policy registry, the cache's boundary checks, the copy queue's order, and the learned policies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from offload.cache import ExpertCache
from policies import CacheMode, PolicyContext
from policies.affinity import AffinityPredictor
from policies.lru import LRU
from policies.registry import BASELINES, BUILTIN, available_policies, resolve_policy
from hardware.profile import load_hardware
from sim.replay import replay_untimed
from offload.session import RunSettings
from sim.simulator import simulate
from traces import synthetic_trace

ROOT = Path(__file__).resolve().parents[1]


def test_every_builtin_resolves_to_a_policy_class():
    for name in available_policies():
        cls = resolve_policy(name)
        assert cls.__module__ == BUILTIN[name].split(":")[0]
    assert set(BASELINES) <= set(BUILTIN)


def test_unknown_policy_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown policy 'lur'.*lru"):
        resolve_policy("lur")


def test_user_policy_from_file_and_module(tmp_path, monkeypatch):
    src = tmp_path / "mine.py"
    src.write_text("from policies.lru import LRU\nclass Mine(LRU):\n    pass\n")
    assert resolve_policy(f"{src}:Mine").__name__ == "Mine"
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_policy("mine:Mine").__name__ == "Mine"
    with pytest.raises(ValueError, match="has no class 'Nope'"):
        resolve_policy(f"{src}:Nope")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_policy(f"{tmp_path / 'absent.py'}:Mine")
    (tmp_path / "notpolicy.py").write_text("class X:\n    pass\n")
    with pytest.raises(ValueError, match="must subclass"):
        resolve_policy(f"{tmp_path / 'notpolicy.py'}:X")


def test_readme_example_policy_runs_and_prefetches():
    """The README shows examples/my_policy.py verbatim; it must run and actually prefetch."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "my_policy.py").read_text()
    assert example.strip().split("\n", 1)[1] in readme, "README must show examples/my_policy.py"
    cls = resolve_policy(f"{ROOT / 'examples' / 'my_policy.py'}:PopularNextLayer")
    trace = synthetic_trace(num_tokens=200, num_layers=4, num_experts=8, top_k=2, popularity_skew=1.5)
    result = simulate(trace, cls, load_hardware("h100-pcie5"), RunSettings(cache_slots=4))
    assert result.metrics["prefetch_copies"] > 0
    assert result.metrics["prefetch_useful"] > 0


def test_cache_rejects_fewer_slots_than_top_k_and_more_than_experts():
    with pytest.raises(ValueError, match="cache_slots=1 is smaller than top_k=2"):
        ExpertCache(num_layers=2, num_experts=8, cache_slots=1, mode="per_layer", top_k=2)
    with pytest.raises(ValueError, match="exceeds the 8 experts"):
        ExpertCache(num_layers=2, num_experts=8, cache_slots=9, mode="per_layer", top_k=2)
    ExpertCache(num_layers=2, num_experts=8, cache_slots=9, mode="global", top_k=2)  # 18 of 16 is fine


def test_static_pins_the_most_frequent_experts_and_fills_every_slot():
    trace = synthetic_trace(num_tokens=300, num_layers=3, num_experts=8, top_k=2, popularity_skew=1.5)
    ctx = PolicyContext(trace.model, 5, CacheMode.PER_LAYER, train_trace=trace)
    preload = resolve_policy("static")(ctx).preload()
    for layer in range(3):
        counts = np.bincount(trace.experts[:, layer].ravel(), minlength=8)
        mine = [(k - layer * 8, pinned) for k, pinned in preload if k // 8 == layer]
        assert len(mine) == 5 and sum(p for _, p in mine) == 5 - 2
        pinned = {e for e, p in mine if p}
        assert min(counts[list(pinned)]) >= max(np.delete(counts, list(pinned)))


def test_static_and_affinity_need_a_training_slice():
    trace = synthetic_trace(num_tokens=20, num_layers=2, num_experts=4, top_k=2)
    for name in ("static", "affinity"):
        with pytest.raises(ValueError, match="train_fraction"):
            replay_untimed(trace, resolve_policy(name), RunSettings(2))


def test_affinity_learns_a_deterministic_layer_to_layer_mapping():
    trace = synthetic_trace(num_tokens=400, num_layers=3, num_experts=8, top_k=2,
                            cross_layer_locality=1.0, temporal_locality=0.0, seed=5)
    train, held_out = trace.select_requests(0, 1), trace
    predictor = AffinityPredictor(train.experts[:300], 8, depth=2)
    for t in range(300, 400):
        for d in (1, 2):
            predicted = predictor.predict(0, trace.experts[t, 0].tolist(), d, 2)
            assert set(predicted) == set(held_out.experts[t, d].tolist())


def test_oracle_prefetch_beats_belady_on_a_fast_link():
    trace = synthetic_trace(num_tokens=200, num_layers=4, num_experts=16, top_k=2, seed=2)
    hw = load_hardware("h100-pcie5").with_overrides(pcie_GBps=1000.0)
    settings = RunSettings(cache_slots=4, prefetch_depth=2)
    belady = simulate(trace, resolve_policy("belady"), hw, settings).metrics
    oracle = simulate(trace, resolve_policy("oracle"), hw, settings).metrics
    assert oracle["tokens_per_s"] > belady["tokens_per_s"]
    assert oracle["misses"] < belady["misses"] / 4


def test_lru_subclass_needs_no_registration():
    class Mine(LRU):
        pass
    trace = synthetic_trace(num_tokens=30, num_layers=2, num_experts=4, top_k=2)
    assert replay_untimed(trace, Mine, RunSettings(2)).hits == replay_untimed(trace, LRU, RunSettings(2)).hits


@given(st.integers(2, 6), st.integers(2, 9), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_affinity_predicts_a_block_of_tokens_as_token_by_token(layers, experts, top_k, depth, seed):
    # Few experts and tokens: ties among scores are common, and a block must break them as a token does.
    top_k = min(top_k, experts)
    train = synthetic_trace(num_tokens=12, num_layers=layers, num_experts=experts, top_k=top_k, seed=seed)
    run = synthetic_trace(num_tokens=30, num_layers=layers, num_experts=experts, top_k=top_k, seed=seed + 1)
    predictor = AffinityPredictor(train.experts, experts, depth)
    block = predictor.predict_tokens(run.experts.astype(np.int64), top_k)
    for t in range(run.num_tokens):
        assert [top[t].tolist() for top in block] == predictor.predict_token(run.experts[t].astype(np.int64), top_k)


class _AffinityLayerByLayer(resolve_policy("affinity")):
    """The affinity policy without its block predictions: every layer predicted on its own."""

    def _predict_block(self, token):
        pass


@pytest.mark.parametrize("slots,depth,window", [(2, 1, 2), (3, 2, 1), (4, 3, None), (6, 2, 2)])
def test_affinity_block_predictions_decide_as_layer_by_layer(slots, depth, window):
    trace = synthetic_trace(num_tokens=240, num_layers=4, num_experts=8, top_k=2, num_requests=4, seed=11,
                            cross_layer_locality=0.7)
    train, run = trace.split(0.25)
    hw = load_hardware("h100-pcie5")
    settings = RunSettings(cache_slots=slots, prefetch_depth=depth, copies_in_flight=window)
    block = simulate(run, resolve_policy("affinity"), hw, settings, train_trace=train, path="reference")
    layer = simulate(run, _AffinityLayerByLayer, hw, settings, train_trace=train, path="reference")
    assert block.stats == layer.stats
    assert block.token_ns == layer.token_ns
    assert block.stats.prefetches > 0
