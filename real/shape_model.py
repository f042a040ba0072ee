"""A model of a named shape with random weights, for shape replay: real copies and real compute at a
production model's size, with routing forced from a real trace (the weights' values do not matter,
but they are random, not zeros, so kernels run on realistic data)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from real.checkpoint import MoEConfig
from real.model import MoEModel
from traces import ModelShape


def shape_config(shape: ModelShape, max_position_embeddings: int = 4096) -> MoEConfig:
    """A Mixtral-style decoder with the shape's sizes (attention, router, SwiGLU experts)."""
    return MoEConfig(family="mixtral", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                     expert_intermediate_size=shape.expert_intermediate_size, num_layers=shape.num_layers,
                     num_attention_heads=shape.num_attention_heads, num_kv_heads=shape.num_kv_heads,
                     head_dim=shape.head_dim, num_experts=shape.num_experts, top_k=shape.top_k,
                     norm_topk_prob=True, rope_theta=10000.0, rms_norm_eps=1e-5, qk_norm="none",
                     shared_expert_intermediate_size=0, tie_word_embeddings=False,
                     max_position_embeddings=max_position_embeddings)


class _RandomTensors(Mapping):
    """Each tensor is drawn when the model asks for it, so a 38 GB expert set is never held twice."""

    def __init__(self, config: MoEConfig, seed: int, device: torch.device):
        self._shapes = config.expected_shapes()
        self._seed = seed
        self._device = device       # drawing 38 GB is fast on a GPU, minutes on a CPU

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        if name.endswith("norm"):
            return torch.ones(shape, device=self._device)
        g = torch.Generator(self._device).manual_seed(self._seed + sum(map(ord, name)) * 7919)
        return torch.randn(shape, generator=g, device=self._device, dtype=torch.bfloat16).mul_(0.02)

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def random_model(shape: ModelShape, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, max_len: int = 2048, attention_impl: str = "sdpa",
                 experts_device: str | torch.device = "cpu", compile_kernels: bool | None = None,
                 reductions: bool | None = None) -> MoEModel:
    """Non-expert weights on ``device``; experts packed on ``experts_device`` (the host by default,
    pinned when ``device`` is CUDA, as an offloading engine takes them). The same seed gives the same
    weights whatever the other arguments. ``compile_kernels``, ``reductions``: as ``MoEModel``'s."""
    config = shape_config(shape, max(max_len, 1))
    return MoEModel(config, _RandomTensors(config, seed, torch.device(device)), device=device, dtype=dtype,
                    experts_device=experts_device, max_len=max_len, attention_impl=attention_impl,
                    compile_kernels=compile_kernels, reductions=reductions)
