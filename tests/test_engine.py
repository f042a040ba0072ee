"""The offloaded engine on the CPU (CI) and, when present, the GPU: identical greedy tokens for every
lossless policy and cache size, the same bookkeeping as the simulator, and recorded traces."""
from __future__ import annotations

import pytest
import torch

from policies.registry import resolve_policy
from real.engine import EngineSettings, OffloadEngine
from real.record import routing_trace
from real.shape_model import random_model
from sim.replay import replay_untimed
from traces import ModelShape, load_trace, save_trace, synthetic_trace

SHAPE = ModelShape("tiny-moe", num_layers=3, num_experts=6, top_k=2, hidden_size=32,
                   expert_intermediate_size=64, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                   vocab_size=64)
PROMPTS = [[1, 2, 3], [7, 8]]
NEW_TOKENS = 10
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def model(device="cpu", dtype=torch.float32):
    return random_model(SHAPE, device, dtype, seed=1, max_len=64)


def engine(policy, slots, mode="per_layer", future=None, device="cpu", dtype=torch.float32, **kw):
    return OffloadEngine(model(device, dtype), SHAPE, resolve_policy(policy),
                         EngineSettings(cache_slots=slots, cache_mode=mode, **kw), future=future,
                         train_trace=future)


def reference_tokens(device="cpu", dtype=torch.float32):
    m = model(device, dtype)
    m.capture_graphs()          # the engine runs its model's graphs (on CUDA); so must the reference
    return [m.generate_greedy(p, NEW_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def recorded():
    """A run with every expert resident, recorded: the future that Belady and the oracle read."""
    result = engine("lru", SHAPE.num_experts).generate(PROMPTS, NEW_TOKENS)
    return routing_trace(result, SHAPE, source="tests", recorded_on="cpu", description="test run")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["per_layer", "global"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "static", "belady", "oracle", "affinity"])
def test_lossless_policies_give_the_resident_models_tokens_at_every_cache_size(policy, mode, device, recorded):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    expected = reference_tokens(device, dtype)
    for slots in range(SHAPE.top_k, SHAPE.num_experts + 1):
        result = engine(policy, slots, mode, future=recorded, device=device, dtype=dtype).generate(PROMPTS, NEW_TOKENS)
        assert result.generated == expected, (policy, mode, slots)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "belady"])
def test_engine_counts_what_the_simulators_replay_counts(policy, recorded):
    """Same controller, two clocks: on-demand hits, misses and copies agree exactly."""
    for slots in (2, 3, 5):
        stats = engine(policy, slots, future=recorded).generate(PROMPTS, NEW_TOKENS).stats
        replayed = replay_untimed(recorded, resolve_policy(policy), slots)
        assert (stats.hits, stats.misses, stats.copies) == (replayed.hits, replayed.misses, replayed.copies)


def test_recorded_trace_round_trips_and_matches_the_run(tmp_path, recorded):
    path = tmp_path / "run.npz"
    save_trace(recorded, path)
    loaded = load_trace(path)
    assert loaded.num_tokens == sum(len(p) for p in PROMPTS) + len(PROMPTS) * NEW_TOKENS
    assert loaded.request_starts.tolist() == [0, 13, 25]
    assert (loaded.experts == recorded.experts).all()
    assert loaded.timings["step_ms"].shape == (loaded.num_tokens,)


def test_hidden_states_are_recorded_for_the_first_steps():
    eng = OffloadEngine(model(), SHAPE, resolve_policy("lru"), EngineSettings(cache_slots=3),
                        record_hidden_steps=5)
    trace = routing_trace(eng.generate(PROMPTS[:1], 4), SHAPE, "tests", "cpu", "hidden")
    assert trace.hidden_states.shape == (5, SHAPE.num_layers, SHAPE.hidden_size)
    assert trace.hidden_token_index.tolist() == [0, 1, 2, 3, 4]


def test_shape_replay_forces_the_traces_routing():
    trace = synthetic_trace(num_tokens=30, num_layers=3, num_experts=6, top_k=2, num_requests=2, seed=4)
    eng = OffloadEngine(model(), SHAPE, resolve_policy("lru"), EngineSettings(cache_slots=3))
    result = eng.replay(trace)
    assert result.routing.experts == trace.experts.tolist()
    replayed = replay_untimed(trace, resolve_policy("lru"), 3)
    assert (result.stats.hits, result.stats.misses) == (replayed.hits, replayed.misses)


def test_cache_smaller_than_top_k_is_refused():
    with pytest.raises(ValueError, match="cache_slots=1 is smaller than top_k=2"):
        engine("lru", 1)
