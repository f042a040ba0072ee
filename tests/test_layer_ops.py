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
