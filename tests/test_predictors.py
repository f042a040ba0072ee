"""Live predictors (``real.predictors``), the lookahead gate (``real.lookahead_gate``) and the two commands
that turn a recorded run into prediction tracks and a trained gate. CPU, a tiny random Mixtral: the
checks are about plumbing and training mechanics; recall on random weights means nothing."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import make_tracks, train_gate
from offload.policy import LayerAccess, PrefetchRequest
from policies.lru import LRU
from offload.predictors import TrackPredictor
from real.checkpoint import save_checkpoint
from offload.session import RunSettings
from real.engine import OffloadEngine
from real.lookahead_gate import LookaheadGate, previous_token_states, train_lookahead_gate, true_router_probs
from real.model import MoEModel
from real.predictors import (FrozenRouters, LookaheadGatePredictor, PreGate, QuasiHiddenPreGate, default_vectors,
                             kl_to_router, track_recall)
from real.record import routing_trace
from real.shape_model import shape_config
from real.tracks import text_recall
from traces import DEFAULT_TRACE, ModelShape, load_trace, save_trace

SHAPE = ModelShape("tiny-moe", num_layers=5, num_experts=8, top_k=2, hidden_size=32,
                   expert_intermediate_size=48, num_attention_heads=4, num_kv_heads=2, head_dim=8, vocab_size=64)
PROMPTS = [[(5 * r + 3 * i + r * r) % 64 for i in range(4)] for r in range(24)]
NEW_TOKENS = 20
DEPTH = 3
HF_CONFIG = {"model_type": "mixtral", "vocab_size": SHAPE.vocab_size, "hidden_size": SHAPE.hidden_size,
             "intermediate_size": SHAPE.expert_intermediate_size, "num_hidden_layers": SHAPE.num_layers,
             "num_attention_heads": SHAPE.num_attention_heads, "num_key_value_heads": SHAPE.num_kv_heads,
             "head_dim": SHAPE.head_dim, "num_local_experts": SHAPE.num_experts,
             "num_experts_per_tok": SHAPE.top_k, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "max_position_embeddings": 128, "sliding_window": None}


def _tensors(seed: int = 3) -> dict[str, torch.Tensor]:
    # Larger than shape_model's 0.02 so that routers are decisive and layers move the residual; norms
    # that are not all ones, so that folding each norm into its router is checked.
    g = torch.Generator().manual_seed(seed)
    return {name: (1.0 if name.endswith("norm") else 0.0) + torch.randn(shape, generator=g) * 0.3
            for name, shape in shape_config(SHAPE, 128).expected_shapes().items()}


def _model(tensors) -> MoEModel:
    return MoEModel(shape_config(SHAPE, 128), tensors, device="cpu", dtype=torch.float32, max_len=64)


class PredictorPrefetch(LRU):
    """LRU that prefetches the predicted top-k of the next ``prefetch_depth`` layers from a live predictor
    handed in through the policy params, and keeps every score it was given."""

    parameters = {"predictor": "the live predictor object to consult"}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.predictor = ctx.params["predictor"]
        self.seen: list[tuple[int, int, np.ndarray]] = []

    def prefetch(self, access: LayerAccess) -> list[PrefetchRequest]:
        scores = self.predictor.scores(access)
        self.seen.append((access.token, access.layer, scores))
        E, L = self.ctx.num_experts, self.ctx.num_layers
        return [PrefetchRequest((access.layer + d) * E + e, access.step + d)
                for d in range(1, min(self.ctx.prefetch_depth, L - 1 - access.layer) + 1)
                for e in np.argsort(-scores[d - 1], kind="stable")[: self.ctx.top_k].tolist()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(tensors, checkpoint dir, recorded trace path, recorded trace, reference tokens)."""
    tmp = tmp_path_factory.mktemp("predictors")
    tensors = _tensors()
    save_checkpoint(HF_CONFIG, tensors, tmp / "ckpt")
    engine = OffloadEngine(_model(tensors), SHAPE, LRU, RunSettings(cache_slots=SHAPE.num_experts),
                           record_hidden_steps=10 ** 6)
    result = engine.generate(PROMPTS, NEW_TOKENS)
    trace = routing_trace(result, SHAPE, "tests", "cpu", "predictor tests")
    save_trace(trace, tmp / "recorded.npz")
    return tensors, tmp / "ckpt", tmp / "recorded.npz", trace, result.generated


def test_pregate_applied_to_a_layers_own_input_is_that_layers_router(world):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    gate = PreGate(model, DEPTH)
    h = torch.from_numpy(trace.hidden_states.astype(np.float32))
    for target in range(1, SHAPE.num_layers):
        for d in range(1, min(DEPTH, target) + 1):
            ours = gate.probs(target - d, h[:, target])[d - 1]
            theirs = model.route_with_probs(target, h[:, target])[3]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # and rows past the last layer are zero
    assert (gate.probs(SHAPE.num_layers - 2, h[:, 0])[1:] == 0).all()


def test_untrained_lookahead_gate_is_the_pregate(world):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    pre = PreGate(model, DEPTH).track(trace.hidden_states)
    gate = LookaheadGatePredictor(LookaheadGate(FrozenRouters(model), DEPTH, rank=8)).track(trace.hidden_states)
    np.testing.assert_allclose(gate, pre, atol=1e-6)
    assert track_recall(gate, trace.experts) == track_recall(pre, trace.experts)


def test_quasi_hidden_with_zero_default_vectors_is_the_pregate(world):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    zeros = torch.zeros((SHAPE.num_layers, SHAPE.num_experts, SHAPE.hidden_size))
    quasi = QuasiHiddenPreGate(model, zeros, DEPTH).track(trace.hidden_states)
    np.testing.assert_allclose(quasi, PreGate(model, DEPTH).track(trace.hidden_states), atol=1e-6)


def test_default_vectors_are_each_experts_mean_output_on_its_routed_tokens(world):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    hs = trace.hidden_states
    vectors = default_vectors(model, hs, prior_tokens=0.0)
    layer, expert = 2, 5
    h = torch.from_numpy(hs[:, layer].astype(np.float32))
    x, ids, _, _ = model.route_with_probs(layer, h)
    routed = (ids == expert).any(-1)
    assert routed.sum() > 0
    want = model.expert(x[routed], model.expert_blobs[layer, expert]).mean(0)
    torch.testing.assert_close(vectors[layer, expert], want, rtol=1e-4, atol=1e-6)


def test_training_lowers_held_out_kl_and_keeps_training_recall(world):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    hs, experts = trace.hidden_states, trace.experts
    n = int(len(hs) * 0.75)
    probs = true_router_probs(FrozenRouters(model), torch.from_numpy(hs.astype(np.float32)))
    pre = PreGate(model, DEPTH).track(hs)
    gate = train_lookahead_gate(model, hs[:n], DEPTH, rank=16, steps=150, lr=3e-3, seed=0)
    trained = LookaheadGatePredictor(gate).track(hs)
    assert kl_to_router(trained[n:], probs[n:]) < kl_to_router(pre[n:], probs[n:])
    before, after = track_recall(pre[:n], experts[:n]), track_recall(trained[:n], experts[:n])
    assert all(a >= b for a, b in zip(after, before)), (before, after)
    again = train_lookahead_gate(model, hs[:n], DEPTH, rank=16, steps=150, lr=3e-3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(gate.parameters(), again.parameters()))     # deterministic
    P = DEPTH * (SHAPE.num_layers - 1) - DEPTH * (DEPTH - 1) // 2
    assert gate.num_parameters == P * (2 * SHAPE.hidden_size * 16 + 16 + SHAPE.hidden_size)


def test_text_recall_scores_against_each_layers_own_router(world):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    pre = {"pregate": PreGate(model, DEPTH)}
    # The same residual at every layer: the pre-gate *is* each later layer's router, so recall is exact.
    same = np.repeat(trace.hidden_states[:, :1], SHAPE.num_layers, axis=1)
    rows = text_recall(pre, same, DEPTH, "same")
    assert [r["recall"] for r in rows] == [1.0] * DEPTH and all(r["tokens"] == len(same) for r in rows)
    # On the engine's residuals the routing it derives is the recorded one, so recall matches track_recall
    # (up to a near-tie or two: the trace stores h in float16, the engine routed on float32).
    rows = text_recall(pre, trace.hidden_states, DEPTH, "recorded")
    want = track_recall(pre["pregate"].track(trace.hidden_states), trace.experts)
    np.testing.assert_allclose([r["recall"] for r in rows], want, atol=1e-3)
    assert max(want) < 1.0


def test_gate_round_trips_through_safetensors(world, tmp_path):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    gate = train_lookahead_gate(model, trace.hidden_states, DEPTH, rank=8, steps=5, seed=1)
    gate.save(tmp_path / "gate")
    loaded = LookaheadGate.load(tmp_path / "gate", model)
    np.testing.assert_array_equal(LookaheadGatePredictor(loaded).track(trace.hidden_states),
                                  LookaheadGatePredictor(gate).track(trace.hidden_states))
    assert not list(tmp_path.glob("gate/*.pt")) and not list(tmp_path.glob("gate/*.bin"))


def _drifting_residuals(windows: int, window: int, seed: int) -> np.ndarray:
    """[windows * window, L, H] where each layer's residual is its own slow random walk along the
    sequence: h_{t,l} tells nothing about h_{t,l+d}, but h_{t-1,l+d} is close to it."""
    g = np.random.default_rng(seed)
    L, H = SHAPE.num_layers, SHAPE.hidden_size
    start = g.normal(size=(windows, 1, L, H))
    steps = 0.25 * g.normal(size=(windows, window, L, H))
    steps[:, 0] = 0.0
    return (start + np.cumsum(steps, axis=1)).reshape(windows * window, L, H).astype(np.float32)


def test_previous_token_states_stop_at_window_starts():
    hs = torch.arange(12, dtype=torch.float32).reshape(12, 1, 1).expand(12, 2, 3)
    prev = previous_token_states(hs, torch.arange(12), window=4)
    assert prev[:, 0, 0].tolist() == [0, 0, 1, 2, 0, 4, 5, 6, 0, 8, 9, 10]


def test_context_gate_learns_from_the_previous_token(world):
    tensors = world[0]
    model = _model(tensors)
    W = 16
    train, test = _drifting_residuals(48, W, seed=0), _drifting_residuals(8, W, seed=1)
    experts = FrozenRouters(model).choose(true_router_probs(FrozenRouters(model), torch.from_numpy(test)).log())[0]
    untrained = LookaheadGatePredictor(LookaheadGate(FrozenRouters(model), DEPTH, rank=8, context=True), window=W)
    np.testing.assert_allclose(untrained.track(test), PreGate(model, DEPTH).track(test), atol=1e-6)
    recall = {}
    for context in (False, True):
        gate = train_lookahead_gate(model, train, DEPTH, rank=16, steps=300, lr=3e-3, seed=0,
                                    context=context, window=W)
        recall[context] = track_recall(LookaheadGatePredictor(gate, window=W).track(test), experts.numpy())
    # only the context gate can see where layer l+d's own walk is; the plain one is left guessing
    assert all(c > p + 0.2 for c, p in zip(recall[True], recall[False])), recall


def test_context_gate_round_trips_and_refuses_live_use(world, tmp_path):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    hs = _drifting_residuals(4, 8, seed=2)
    gate = train_lookahead_gate(model, hs, DEPTH, rank=8, steps=5, seed=1, context=True, window=8)
    gate.save(tmp_path / "gate")
    loaded = LookaheadGate.load(tmp_path / "gate", model)
    assert loaded.context and loaded.num_parameters == gate.num_parameters
    np.testing.assert_array_equal(LookaheadGatePredictor(loaded, window=8).track(hs),
                                  LookaheadGatePredictor(gate, window=8).track(hs))
    with pytest.raises(ValueError, match="window"):
        LookaheadGatePredictor(gate)
    access = LayerAccess(token=0, layer=1, step=1, experts=[0, 1], hidden=torch.from_numpy(hs[0, 1]))
    with pytest.raises(RuntimeError, match="track"):
        LookaheadGatePredictor(gate, window=8).scores(access)
    with pytest.raises(ValueError, match="window"):
        train_lookahead_gate(model, hs, DEPTH, rank=8, steps=1, context=True)


def test_keep_best_returns_the_step_with_the_lowest_held_out_kl(world, capsys):
    tensors, _, _, trace, _ = world
    model = _model(tensors)
    hs = trace.hidden_states
    n = int(len(hs) * 0.75)
    gate = train_lookahead_gate(model, hs[:n], DEPTH, rank=16, steps=60, lr=3e-2, seed=0, log_every=10,
                                val_hidden_states=hs[n:], keep_best=True)
    logged = [float(line.split("held-out KL ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if "held-out KL" in line and line.startswith("step")]
    probs = true_router_probs(FrozenRouters(model), torch.from_numpy(hs[n:].astype(np.float32)))
    with torch.no_grad():
        kl = gate.loss(torch.from_numpy(hs[n:].astype(np.float32)), probs).item()
    assert kl == pytest.approx(min(logged), abs=1e-5)
    with pytest.raises(ValueError, match="keep_best"):
        train_lookahead_gate(model, hs[:n], DEPTH, steps=1, keep_best=True)


def test_predictors_run_live_in_the_engine_and_match_their_tracks(world):
    tensors, _, _, trace, reference = world
    vectors = default_vectors(_model(tensors), trace.hidden_states)
    model = _model(tensors)
    gate = LookaheadGate(FrozenRouters(model), DEPTH, rank=8, seed=0)
    with torch.no_grad():
        gate.w2.normal_(0, 0.1)       # a gate that is not the pre-gate, so its own path is exercised
    for predictor in (PreGate(model, DEPTH), QuasiHiddenPreGate(model, vectors, DEPTH), LookaheadGatePredictor(gate)):
        settings = RunSettings(cache_slots=3, prefetch_depth=DEPTH, policy_params={"predictor": predictor})
        engine = OffloadEngine(_model(tensors), SHAPE, PredictorPrefetch, settings)
        result = engine.generate(PROMPTS, NEW_TOKENS)
        assert result.generated == reference                   # prefetching never changes the tokens
        track = predictor.track(trace.hidden_states)           # hidden states stored as float16
        seen = engine.policy.seen
        assert len(seen) == trace.num_tokens * SHAPE.num_layers
        for token, layer, scores in seen:
            assert scores.shape == (DEPTH, SHAPE.num_experts) and scores.dtype == np.float32
            np.testing.assert_allclose(scores, track[token, layer], atol=2e-3)


def test_make_tracks_and_train_gate_commands(world, tmp_path):
    _, ckpt, recorded, trace, _ = world
    head = tmp_path / "head.npz"          # hidden states for a prefix only, cut mid-request
    n = 30
    save_trace(type(trace)(trace.meta, trace.experts, trace.weights, trace.request_starts,
                           hidden_states=trace.hidden_states[:n], hidden_token_index=np.arange(n),
                           timings=trace.timings), head)
    train_gate.main(["--trace", str(recorded), "--model", str(ckpt), "--depth", str(DEPTH), "--out",
                     str(tmp_path / "gate"), "--steps", "20", "--rank", "8", "--device", "cpu"])
    small = tmp_path / "affinity.npz"
    save_trace(load_trace(DEFAULT_TRACE).select_requests(0, 4), small)
    out, csv = tmp_path / "traced.npz", tmp_path / "gate_recall.csv"
    make_tracks.main(["--trace", str(head), "--model", str(ckpt), "--gate", str(tmp_path / "gate"),
                      "--depth", str(DEPTH), "--out", str(out), "--recall-csv", str(csv),
                      "--affinity-trace", str(small), "--device", "cpu"])
    traced = load_trace(out)
    assert traced.num_tokens == n and traced.request_starts.tolist() == [0, 24, 30]
    for name in ("pregate", "quasi", "lookahead"):
        assert traced.predictions[name].shape == (n, SHAPE.num_layers, DEPTH, SHAPE.num_experts)
        assert traced.predictions[name].dtype == np.float16
    assert TrackPredictor(traced, "lookahead").scores(LayerAccess(3, 1, 3 * 5 + 1, [0, 1])).shape == (DEPTH, 8)
    table = pd.read_csv(csv)
    assert list(table.columns) == ["predictor", "distance", "recall", "tokens", "source"]
    assert set(table.predictor) == {"pregate", "quasi", "lookahead", "affinity"}
    assert table.recall.between(0, 1).all() and sorted(set(table.distance)) == [1, 2, 3]
    want = track_recall(traced.predictions["pregate"].astype(np.float32), traced.experts)
    got = table[table.predictor == "pregate"].sort_values("distance").recall.tolist()
    np.testing.assert_allclose(got, want)


def test_make_tracks_refuses_a_trace_without_hidden_states(world, tmp_path, capsys):
    _, ckpt, _, trace, _ = world
    bare = tmp_path / "bare.npz"
    save_trace(type(trace)(trace.meta, trace.experts, trace.weights, trace.request_starts), bare)
    with pytest.raises(SystemExit) as exit_:        # one line, before the model loads
        make_tracks.main(["--trace", str(bare), "--model", str(ckpt), "--out", str(tmp_path / "x.npz"),
                          "--device", "cpu"])
    assert exit_.value.code == 2 and "hidden_states: none recorded" in capsys.readouterr().err
