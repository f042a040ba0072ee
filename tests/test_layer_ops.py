"""The compiled layer functions (``real.layer_ops``): the same arithmetic as the eager ones to rounding,
one compilation for every layer, and every decode path of a compiled model still bit-identical."""
from __future__ import annotations

import pytest
import torch

from offload.session import RunSettings
from policies.registry import resolve_policy
from real.engine import OffloadEngine
from real.layer_ops import COMPILE_ENV, can_compile, compile_default
from real.shape_model import random_model
from traces import ModelShape

SHAPE = ModelShape("tiny", 3, 6, 2, 32, 48, 4, 2, 8, 64)
CPU = torch.device("cpu")
WHY_NOT = can_compile(CPU)


def test_compile_default_follows_the_device_and_the_environment(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert compile_default(torch.device("cuda")) and not compile_default(CPU)
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert compile_default(CPU)
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not compile_default(torch.device("cuda"))


def test_compiling_the_eager_reference_is_refused():
    with pytest.raises(RuntimeError, match="attention_impl='eager'.*compile_kernels=False"):
        random_model(SHAPE, "cpu", torch.float32, max_len=64, attention_impl="eager", compile_kernels=True)


@pytest.mark.skipif(WHY_NOT is not None, reason=f"torch.compile cannot build CPU kernels here: {WHY_NOT}")
@torch.no_grad()
def test_compiled_model_matches_eager_and_its_engine_gives_its_tokens():
    """Inductor's CPU kernels for the tiny shape: logits within float32 rounding of the eager model's,
    one compiled function per layer function whatever the layer (no recompilation after the first
    layer), and an offloaded engine over the compiled model (two slots a layer: copies every step)
    gives the compiled resident model's greedy tokens exactly."""
    import torch._dynamo
    torch._dynamo.reset()
    eager = random_model(SHAPE, "cpu", torch.float32, max_len=64, experts_device="cpu", compile_kernels=False)
    fused = random_model(SHAPE, "cpu", torch.float32, max_len=64, experts_device="cpu", compile_kernels=True)
    assert fused.compiled and not eager.compiled
    prompt = [3, 1, 4, 1, 5]
    for pos, tok in enumerate(prompt):
        want, got = eager.decode_step(tok, pos), fused.decode_step(tok, pos)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])   # one per function
    tokens = fused.generate_greedy(prompt, 12)
    engine_model = random_model(SHAPE, "cpu", torch.float32, max_len=64, compile_kernels=True)
    engine = OffloadEngine(engine_model, SHAPE, resolve_policy("lru"), RunSettings(2))
    assert engine.generate([prompt], 12).generated == [tokens]


# -- batch-1 products as reductions (the compiled default) ---------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from real.layer_ops import attend, matvec, reductions_default, REDUCTIONS_ENV, select_top_k  # noqa: E402


@given(st.integers(1, 40), st.integers(1, 70), st.booleans(), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_matvec_as_a_reduction_is_linear(n_in, n_out, bias, seed):
    """One row: the multiply-and-sum gives F.linear's product (float32: to accumulation order; bf16:
    both round the float32 sum once, so at most one bf16 step apart); more rows: F.linear itself."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(1, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    torch.testing.assert_close(matvec(x, w, b, True), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    bb = None if b is None else b.bfloat16()
    got, want = matvec(xb, wb, bb, True), F.linear(xb.float(), wb.float(), None if bb is None else bb.float())
    assert got.dtype == torch.bfloat16 and got.shape == (1, n_out)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-6)
    rows = torch.randn(3, n_in, generator=g)
    assert torch.equal(matvec(rows, w, b, True), F.linear(rows, w, b))


@given(st.integers(1, 6), st.integers(1, 16), st.integers(1, 5), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_top_k_as_max_passes_is_torch_topk(k, experts, rows, seed):
    """Distinct probabilities: the same values and ids, in the same descending order, as torch.topk."""
    k = min(k, experts)
    logits = torch.randn(rows, experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    probs = torch.softmax(logits, -1).float()
    values, ids = select_top_k(probs, k, True)
    want_values, want_ids = torch.topk(probs, k, dim=-1)
    assert ids.dtype == torch.int64 and torch.equal(ids, want_ids) and torch.equal(values, want_values)


def test_top_k_tie_goes_to_the_lower_id():
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1]])
    values, ids = select_top_k(probs, 3, True)
    assert ids.tolist() == [[1, 3, 2]] and values[0].tolist() == pytest.approx([0.3, 0.3, 0.2])


@given(st.sampled_from([(4, 4), (4, 2), (6, 1)]), st.integers(1, 40), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_attention_as_reductions_is_sdpa(heads_kv, length, seed):
    """Grouped-query attention of one token under an additive mask: attend = SDPA (float32)."""
    heads, kv_heads = heads_kv
    D = 8
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, D, generator=g)
    keys, values = torch.randn(length, kv_heads, D, generator=g), torch.randn(length, kv_heads, D, generator=g)
    visible = torch.rand(length, generator=g) < 0.7
    visible[0] = True
    mask = torch.zeros(length).masked_fill_(~visible, float("-inf"))
    want = F.scaled_dot_product_attention(q.view(kv_heads, heads // kv_heads, D)[None],
                                          keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                          attn_mask=mask.view(1, 1, 1, -1)).reshape(1, -1)
    torch.testing.assert_close(attend(q, keys, values, mask, D ** -0.5), want, rtol=1e-5, atol=1e-5)


def test_reductions_follow_compilation_and_the_environment(monkeypatch):
    monkeypatch.delenv(REDUCTIONS_ENV, raising=False)
    assert reductions_default(True) and not reductions_default(False)
    monkeypatch.setenv(REDUCTIONS_ENV, "0")
    assert not reductions_default(True)
    assert not random_model(SHAPE, "cpu", torch.float32, max_len=64, attention_impl="eager").ops.reductions


@torch.no_grad()
def test_bucket_attention_as_reductions_matches_the_exact_path():
    """The graphs' path with reductions (RoPE lookup, KV write and attention over a bucket at the
    device-side position, eager here) against the exact path with library kernels: the same front
    (residual, expert input, routed ids and weights) to float32 rounding at every position, and the
    same keys and values in the cache."""
    exact = random_model(SHAPE, "cpu", torch.float32, max_len=128, compile_kernels=False, reductions=False)
    bucket = random_model(SHAPE, "cpu", torch.float32, max_len=128, compile_kernels=False, reductions=True)
    assert bucket.ops.reductions and bucket.context_buckets[0] == 64
    h = torch.randn(1, SHAPE.hidden_size, generator=torch.Generator().manual_seed(3))
    for pos in (0, 1, 5, 63, 64, 100):
        length = next(b for b in bucket.context_buckets if b > pos)
        for layer in range(SHAPE.num_layers):
            bucket.set_position(pos)
            got = bucket.front_at(layer, h, length)
            want = exact.attention_route(layer, h, pos)
            for name in ("h", "x", "weights", "probs"):
                torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
            assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(bucket.kv_cache, exact.kv_cache, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(WHY_NOT is not None, reason=f"torch.compile cannot build CPU kernels here: {WHY_NOT}")
@torch.no_grad()
def test_compiled_bucket_attention_matches_eager_in_two_buckets():
    """Inductor's CPU kernels of ``attention_bucket`` (the function the CUDA graphs capture), one per
    bucket length, against the same function run eagerly."""
    import torch._dynamo
    torch._dynamo.reset()
    eager = random_model(SHAPE, "cpu", torch.float32, max_len=128, compile_kernels=False, reductions=True)
    fused = random_model(SHAPE, "cpu", torch.float32, max_len=128, compile_kernels=True)
    assert fused.ops.reductions
    h = torch.randn(1, SHAPE.hidden_size, generator=torch.Generator().manual_seed(4))
    for pos in (3, 70):
        length = next(b for b in fused.context_buckets if b > pos)
        for m in (eager, fused):
            m.set_position(pos)
        got, want = fused.front_at(1, h, length), eager.front_at(1, h, length)
        torch.testing.assert_close(got.h, want.h, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(fused.kv_cache, eager.kv_cache, rtol=1e-5, atol=1e-6)
