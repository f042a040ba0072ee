"""The offloaded engine on the CPU (CI) and, when present, the GPU: identical greedy tokens for every
lossless policy and cache size, the same bookkeeping as the simulator, and recorded traces."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.registry import resolve_policy
from offload.session import RunSettings
from real.engine import OffloadEngine
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
                         RunSettings(cache_slots=slots, cache_mode=mode, **kw), future=future,
                         train_trace=future)


def reference_tokens(device="cpu", dtype=torch.float32):
    m = model(device, dtype)
    if device == "cuda":        # fully on the GPU, as engine_bench's reference: its experts are graphs too
        m.expert_blobs = m.expert_blobs.to(device)
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
    # a global pool needs to hold one layer's top-k only: fewer than top-k slots per layer
    smallest = SHAPE.top_k if mode == "per_layer" else -(-SHAPE.top_k // SHAPE.num_layers)
    for slots in range(smallest, SHAPE.num_experts + 1):
        eng = engine(policy, slots, mode, future=recorded, device=device, dtype=dtype)
        assert (eng.expert_graphs is not None) == (device == "cuda")
        result = eng.generate(PROMPTS, NEW_TOKENS)
        assert result.generated == expected, (policy, mode, slots)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "belady"])
def test_engine_counts_what_the_simulators_replay_counts(policy, recorded):
    """Same controller, two clocks: on-demand hits, misses and copies agree exactly."""
    for slots in (2, 3, 5):
        stats = engine(policy, slots, future=recorded).generate(PROMPTS, NEW_TOKENS).stats
        replayed = replay_untimed(recorded, resolve_policy(policy), RunSettings(slots))
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
    eng = OffloadEngine(model(), SHAPE, resolve_policy("lru"), RunSettings(cache_slots=3),
                        record_hidden_steps=5)
    trace = routing_trace(eng.generate(PROMPTS[:1], 4), SHAPE, "tests", "cpu", "hidden")
    assert trace.hidden_states.shape == (5, SHAPE.num_layers, SHAPE.hidden_size)
    assert trace.hidden_token_index.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("device", DEVICES)
def test_shape_replay_forces_the_traces_routing(device):
    """The trace's experts run with its weights (``set_run``: on CUDA through the readout the front graph
    combines from), the counts are the untimed replay's, and every cache size gives the same tokens."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    trace = synthetic_trace(num_tokens=30, num_layers=3, num_experts=6, top_k=2, num_requests=2, seed=4)
    runs = {}
    for slots in (3, SHAPE.num_experts):
        eng = OffloadEngine(model(device, dtype), SHAPE, resolve_policy("lru"), RunSettings(cache_slots=slots))
        runs[slots] = eng.replay(trace)
        assert runs[slots].routing.experts == trace.experts.tolist()
    replayed = replay_untimed(trace, resolve_policy("lru"), RunSettings(3))
    assert (runs[3].stats.hits, runs[3].stats.misses) == (replayed.hits, replayed.misses)
    assert runs[3].generated == runs[SHAPE.num_experts].generated


class _Substitute:
    """A lossy policy for the test: runs the expert after each routed one (mod E) instead."""
    lossless = False

    def execute(self, access):
        return [(e + 1) % SHAPE.num_experts for e in access.experts]


@pytest.mark.parametrize("device", DEVICES)
def test_lossy_substitution_runs_and_weighs_its_own_experts(device):
    """A lossy policy's experts run with the model's weights for them (``weights_for`` on the router's
    softmax, put where the combine reads them): what ran is recorded, and the arithmetic does not depend
    on the cache size, so every size gives the same log-likelihoods, which differ from the lossless
    model's. Compared on the scores, not the greedy tokens: a tiny random model's argmax can survive the
    substitution (on CUDA, seed 1 gives the lossless tokens exactly, eager and graphed alike), its
    logits cannot."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lossy = type("Substitute", (_Substitute, resolve_policy("lru")), {})

    def lossy_engine(slots):
        return OffloadEngine(model(device, dtype), SHAPE, lossy, RunSettings(cache_slots=slots))

    sequences = [p + list(range(10, 20)) for p in PROMPTS]
    small, full = (lossy_engine(slots).score(sequences)["nll"] for slots in (2, SHAPE.num_experts))
    lossless = engine("lru", SHAPE.num_experts, device=device, dtype=dtype).score(sequences)["nll"]
    assert small == full
    assert not np.allclose(full, lossless, rtol=0, atol=1e-3)
    result = lossy_engine(2).generate(PROMPTS, NEW_TOKENS)
    assert result.stats.replaced > 0
    for step_experts, step_weights in zip(result.routing.experts, result.routing.weights):
        for experts, weights in zip(step_experts, step_weights):
            assert len(set(experts)) == len(experts) and all(np.isfinite(weights))


def test_cache_smaller_than_top_k_is_refused():
    with pytest.raises(ValueError, match="cache_slots=1 is smaller than top_k=2"):
        engine("lru", 1)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_timings_are_recorded_into_the_trace(device, tmp_path):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    eng = OffloadEngine(model(device, dtype), SHAPE, resolve_policy("lru"), RunSettings(cache_slots=3),
                        record_layer_timings=True)
    result = eng.generate(PROMPTS, NEW_TOKENS)
    save_trace(routing_trace(result, SHAPE, "tests", device, "timed"), tmp_path / "t.npz")
    t = load_trace(tmp_path / "t.npz").timings
    T, L, K = len(result.routing.experts), SHAPE.num_layers, SHAPE.top_k
    assert t["layer_start_ms"].shape == t["layer_ms"].shape == t["stall_ms"].shape == (T, L)
    assert (np.diff(t["layer_start_ms"].reshape(-1)) > 0).all()     # layers in order, one clock
    assert t["copy_start_ms"].shape == t["copy_end_ms"].shape == (T, L, K)
    copied = t["copy_start_ms"] >= 0
    # exactly the accesses that were not hits waited for a copy, and every copy has an end after its start
    assert copied.sum() == result.stats.accesses - result.stats.hits > 0
    assert (t["copy_end_ms"][copied] >= t["copy_start_ms"][copied]).all()
    assert (t["layer_ms"] > 0).all() and (t["stall_ms"] >= 0).all()
    assert (t["stall_ms"][~copied.any(-1)] == 0).all()        # a layer of hits never stalls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["pregate", "quasi"])
def test_cuda_graphed_predictor_matches_the_eager_one_and_keeps_tokens(name):
    """On CUDA a live predictor runs inside the layer's graph: same scores as computing it eagerly on
    the same residual, and the lossless policy still gives the resident model's tokens."""
    from real.predictors import GraphedPredictor, PreGate, QuasiHiddenPreGate
    m = model("cuda", torch.bfloat16)
    if name == "pregate":
        predictor = PreGate(m, 2)
    else:
        vectors = 0.02 * torch.randn((SHAPE.num_layers, SHAPE.num_experts, SHAPE.hidden_size),
                                     generator=torch.Generator().manual_seed(0))
        predictor = QuasiHiddenPreGate(m, vectors, 2)
    policy = "mixtral-offloading" if name == "pregate" else "speculating-experts"
    eng = OffloadEngine(m, SHAPE, resolve_policy(policy), RunSettings(cache_slots=3, prefetch_depth=2),
                        predictors={name: predictor})
    graphed = eng.policy.predictor
    assert isinstance(graphed, GraphedPredictor)
    diffs = []
    graphed_scores = graphed.scores

    def both(access):
        ours = graphed_scores(access)
        diffs.append(float(np.abs(ours - predictor.scores(access)).max()))
        return ours
    graphed.scores = both
    assert eng.generate(PROMPTS, NEW_TOKENS).generated == reference_tokens("cuda", torch.bfloat16)
    assert diffs and max(diffs) < 1e-5


def test_non_finite_router_output_stops_the_run_at_its_step_and_layer():
    """A router that overflows (here: NaN weights in layer 1's router) must not decode garbage with
    valid-looking metrics: the engine stops at the first step, naming the step and the layer, and keeps
    what it recorded before."""
    from real.engine import RoutingError
    m = model()
    m.layers[1].router.fill_(float("nan"))
    eng = OffloadEngine(m, SHAPE, resolve_policy("lru"), RunSettings(cache_slots=3))
    with pytest.raises(RoutingError, match=r"router of layer 1 gave non-finite weights \[nan, nan\] at decode step 0") as err:
        eng.generate(PROMPTS, NEW_TOKENS)
    assert (err.value.step, err.value.layer) == (0, 1)
    assert eng.routing.experts == []          # step 0 never completed: nothing half-recorded


@pytest.mark.parametrize("prompts", [[[]], [[1, 2], []], []])
def test_empty_prompts_are_refused_before_anything_runs(prompts):
    eng = engine("lru", 3)
    with pytest.raises(ValueError, match="empty|no prompts"):
        eng.generate(prompts, NEW_TOKENS)
    assert eng.ctrl.stats.accesses == 0
