"""A compact batch-1 greedy decoder for the MoE families ``real.checkpoint`` loads (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE), in plain PyTorch, checked against Hugging Face's forward by
``tests/test_real_model.py``: the decoder's arithmetic, layer by layer.

Why not Hugging Face's own forward: its per-layer overhead (masks, caches, output capturing, grouped
expert dispatch) costs several milliseconds per layer per token, which would drown the copy and compute
times that offloading studies measure. Here one decode step is a handful of kernels per layer.

The step is split where an offloading engine needs to interpose, the decode protocol that the resident
reference and the engine both walk: ``begin_token``; per layer ``front`` (the previous layer's
combine, then attention and the router, whose choice stays on the device) -> ``read_routing`` (the
host learns it; the engine makes the chosen experts resident) -> one ``expert`` per top-k position
into ``expert_out`` (``set_run`` first if other experts run than the router chose); then ``back`` (the
last combine and the head). Every expert lives in one row of ``expert_blobs`` [L, E, 3*I*H] =
gate [I, H] | up [I, H] | down [H, I], so one expert is one contiguous copy; gate and up are adjacent
and form the [2I, H] matrix of one matmul, exactly as transformers' fused experts do; q, k and v are
one matmul too.

Numerics follow transformers' eager modules: RoPE tables computed in float32 and cast to the model
dtype; router softmax in float32 and ``torch.topk`` order; Mixtral keeps the routing weights in
float32 (so expert output x weight is rounded once, from float32), the other families cast them to
the model dtype; expert outputs are summed in ascending expert id, each term rounded, as
transformers' per-expert loop does. ``attention_impl="eager"`` is transformers' arithmetic bit for bit
(RMSNorm in float32 cast back before the weight, attention scores in the model dtype): the tests'
reference. The fast implementations round twice less: RMSNorm is torch's fused kernel (normalised and
weighted in float32, rounded once) and attention is one SDPA kernel. With ``compile_kernels`` (the
default on CUDA) the elementwise work between the GEMMs runs as Inductor-compiled kernels, which round
once per fused kernel (``real.layer_ops``: the arithmetic, written once for both modes).

Attention, three ways (``attention_impl``):

- ``"sdpa"`` (default): on CUDA graphs, attention reads only the first ``bucket`` positions of the KV
  cache, the smallest of ``context_buckets`` (powers of two from 64, then ``max_len``) that holds the
  context, under an additive position mask; one graph per (layer, bucket), so its time grows with the
  context; compiled, it is two Triton reductions and a softmax (``real.layer_ops.attend``), else SDPA
  (on the H200 PyTorch picks cuDNN's flash kernel for it). Without graphs
  it reads exactly positions ``0..pos`` (or the sliding window).
- ``"masked_window"``: the graphs before issue 13, kept as the benchmark's baseline
  (``experiments/bench_layer.py``): every position of the cache under a boolean mask built in the
  graph, in a layout that sends SDPA to its math fallback on CUDA.
- ``"eager"``: transformers' arithmetic; never captured.

What sits around this module: ``real.graphs`` captures these same functions as CUDA graphs (per layer
and bucket: the previous combine, attention and router; per slot and top-k position: an expert), and ``real.resident`` is the fully-resident
reference decode loop (``decode_step``, ``generate_greedy``) and ``quiet_gc``. Every path (the
resident model, the offloaded engine at any cache size) runs the same kernels, so their tokens are
bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from real import resident
from real.checkpoint import MoEConfig
from real.graphs import ExpertGraphs, Extra, LayerGraphs
from real.layer_ops import (Front, LayerOps, can_compile, compile_default, fused_rms_norm, reductions_default, rms_norm,
                             route, swiglu, weigh)
from real.pinned import pinned_empty
from real.resident import LayerRecord, quiet_gc

__all__ = ["BlobOf", "Front", "LayerRecord", "MoEModel", "quiet_gc", "unpack_expert"]

BlobOf = Callable[[int, int], torch.Tensor]   # (layer, expert) -> that expert's blob on the compute device
DEFAULT_MAX_LEN = 4096
ATTENTION_IMPLS = ("sdpa", "masked_window", "eager")
SMALLEST_BUCKET = 64          # positions; a multiple of 16, as the memory-efficient kernel wants its mask


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    moe_norm: torch.Tensor
    router: torch.Tensor
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate, up, down, router


def context_buckets(max_len: int, attention_impl: str) -> tuple[int, ...]:
    """The KV lengths the graphs attend over: powers of two from ``SMALLEST_BUCKET`` below ``max_len``,
    then ``max_len``; only ``max_len`` for the masked-window baseline."""
    if attention_impl == "masked_window":
        return (max_len,)
    buckets, b = [], SMALLEST_BUCKET
    while b < max_len:
        buckets.append(b)
        b *= 2
    return (*buckets, max_len)


def unpack_expert(blob: torch.Tensor, I: int, H: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of one expert's gate [I, H], up [I, H] and down [H, I] inside its flat blob."""
    n = I * H
    return blob[:n].view(I, H), blob[n:2 * n].view(I, H), blob[2 * n:].view(H, I)


class MoEModel:
    def __init__(self, config: MoEConfig, tensors: Mapping[str, torch.Tensor],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 experts_device: str | torch.device | None = None, max_len: int | None = None,
                 attention_impl: str = "sdpa", compile_kernels: bool | None = None, reductions: bool | None = None):
        """``tensors``: the internal tensors of ``real.checkpoint.load_checkpoint``. Non-expert weights go
        to ``device``; the experts are packed into ``expert_blobs`` on ``experts_device`` (default:
        ``device``; pinned when it is the CPU and ``device`` is CUDA). The KV cache holds ``max_len``
        positions (default: the model's limit, at most 4096). ``attention_impl``: "sdpa",
        "masked_window" or "eager" (the module docstring). ``compile_kernels``: run the layer's
        elementwise work as Inductor-compiled kernels (``real.layer_ops``); default: on CUDA unless
        ``MOE_LAB_COMPILE=0``, never with ``attention_impl="eager"``. ``reductions``: batch-1 products,
        top-k and the bucket's attention as reductions (``real.layer_ops``); default: when compiling,
        unless ``MOE_LAB_REDUCTIONS=0``; never with ``attention_impl="eager"``. Raises ValueError for an unknown
        ``attention_impl`` and RuntimeError when compilation is asked for and cannot run here."""
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r}: use one of {', '.join(ATTENTION_IMPLS)}")
        self.attention_impl = attention_impl
        self._eager_norm = attention_impl == "eager"
        self._norm = rms_norm if self._eager_norm else fused_rms_norm
        c = self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        if compile_kernels is None:
            compile_kernels = compile_default(self.device) and attention_impl != "eager"
        if compile_kernels:
            why = "attention_impl='eager' is transformers' arithmetic" if attention_impl == "eager" else \
                can_compile(self.device)
            if why is not None:
                raise RuntimeError(f"compile_kernels=True cannot run here: {why}; pass compile_kernels=False "
                                   f"(or set MOE_LAB_COMPILE=0)")
        if reductions is None:
            reductions = reductions_default(compile_kernels)
        self.ops = LayerOps(compile_kernels, reductions and attention_impl != "eager")
        self.max_len = min(c.max_position_embeddings, DEFAULT_MAX_LEN) if max_len is None else int(max_len)
        H, I, E, D = c.hidden_size, c.expert_intermediate_size, c.num_experts, c.head_dim
        self._I, self._H = I, H
        self._scale = D ** -0.5
        # The router's weights: float32 for Mixtral (its router keeps them), else the model dtype.
        self.weights_dtype = torch.float32 if c.family == "mixtral" else dtype

        def w(name: str) -> torch.Tensor | None:
            t = tensors.get(name)
            return None if t is None else t.to(device=self.device, dtype=dtype).contiguous()

        self.embed_weight = w("embed")
        self.final_norm = w("final_norm")
        self.lm_head = self.embed_weight if c.tie_word_embeddings else w("lm_head")
        self.layers: list[_Layer] = []
        for l in range(c.num_layers):
            p = f"layers.{l}."
            shared = None
            if c.shared_expert_intermediate_size:
                shared = (w(p + "shared.gate"), w(p + "shared.up"), w(p + "shared.down"), w(p + "shared.router"))
            self.layers.append(_Layer(w(p + "attn_norm"), w(p + "qkv"), w(p + "qkv_bias"), w(p + "o_proj"),
                                      w(p + "o_bias"), w(p + "q_norm"), w(p + "k_norm"), w(p + "moe_norm"),
                                      w(p + "router"), shared))

        self.experts_device = self.device if experts_device is None else torch.device(experts_device)
        pin = self.experts_device.type == "cpu" and self.device.type == "cuda"
        blob_shape = (c.num_layers, E, 3 * I * H)
        self.expert_blobs: torch.Tensor | None = (
            pinned_empty(blob_shape, dtype) if pin else torch.empty(blob_shape, dtype=dtype, device=self.experts_device))
        n = I * H
        for l in range(c.num_layers):
            p = f"layers.{l}.experts."
            self.expert_blobs[l, :, :n].copy_(tensors[p + "gate"].reshape(E, n))
            self.expert_blobs[l, :, n:2 * n].copy_(tensors[p + "up"].reshape(E, n))
            self.expert_blobs[l, :, 2 * n:].copy_(tensors[p + "down"].reshape(E, n))

        # [L, k|v, position, KV head, D]: positions 0..T-1 of one layer's keys are the [1, T, KV, D]
        # (batch, sequence, head, dim) block the SDPA kernels read without a copy.
        self.kv_cache = torch.zeros((c.num_layers, 2, self.max_len, c.num_kv_heads, D),
                                    dtype=dtype, device=self.device)
        # RoPE as transformers computes it: inv_freq on the CPU in float32, angles and cos/sin in float32
        # on the compute device, then cast to the model dtype. One [max_len, 2, D] table, so that a
        # position's rows are one gather.
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))
        positions = torch.arange(self.max_len, dtype=torch.float, device=self.device)
        freqs = positions[:, None] * inv_freq.to(self.device)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        sin = angles.sin()
        sin[:, :D // 2].neg_()
        self._rope = torch.stack((angles.cos(), sin), dim=1).to(dtype)
        # The position of the token about to run, on the device, for code that must not take it from
        # the host (graphs): the position itself, and the additive attention mask over the cache
        # (0 where visible, -inf elsewhere), cut from a pattern indexed by key position - pos.
        self._positions = torch.arange(self.max_len, device=self.device)
        self.context_buckets = context_buckets(self.max_len, attention_impl)
        self._bucket = 0                                  # index into context_buckets for the position
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._pos_host = 0
        self._mask = torch.zeros(self.max_len, dtype=dtype, device=self.device)
        offset = torch.arange(-(self.max_len - 1), self.max_len, device=self.device)
        visible = offset <= 0
        if c.sliding_window is not None:
            visible &= offset > -c.sliding_window
        self._mask_pattern = torch.zeros(len(offset), dtype=dtype, device=self.device).masked_fill_(
            ~visible, float("-inf"))
        # The decode protocol's state (``begin_token``/``front``/``run_expert``/``back``): the outputs of
        # the layer's experts by top-k position, and, without graphs, the step's embedding, the current
        # layer's front half and the experts that run there with their weights (the next front combines
        # them; no other layer's are alive).
        self.expert_out = torch.zeros((c.top_k, 1, H), dtype=dtype, device=self.device)
        self._h_in: torch.Tensor | None = None
        self._layer, self._front = 0, None
        self._run: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graphs: LayerGraphs | None = None
        self._resident_experts: ExpertGraphs | None = None     # graphs over expert_blobs, when on the GPU

    @property
    def compiled(self) -> bool:
        """Whether the layer's elementwise work runs as compiled kernels (``real.layer_ops``)."""
        return self.ops.compiled

    # -- the decode protocol: one token, layer by layer ----------------------------------------------
    # begin_token -> for each layer: front (the previous layer's combine, then attention and router),
    # read_routing, set_run (only when other experts run than the router chose), run_expert or an
    # ExpertGraphs expert per top-k position -> back (the last combine and the head). With graphs, front
    # and back replay one graph each; without, the same functions run eagerly.
    def reset(self) -> None:
        """Start a new request: forget every cached key and value."""
        self.kv_cache.zero_()

    def begin_token(self, token_id: int, pos: int) -> None:
        """Start the step of the token ``token_id`` at ``pos``: the position on the device, the embedding
        as the first layer's input."""
        self.set_position(pos)
        self._pos_host = pos
        h = self.embed(token_id)
        if self._graphs is not None:
            self._graphs.h_in.copy_(h)
        else:
            self._h_in = h

    def front(self, layer: int) -> Front:
        """The combine of layer ``layer - 1`` (its experts' outputs in ``expert_out``, the weights of the
        experts that ran) and then layer ``layer``'s attention and router. With graphs: one replay of
        the layer's graph for the step's context bucket, whose outputs are static buffers valid until the
        same layer runs again (h and x until the next layer runs)."""
        if self._graphs is not None:
            return self._graphs.replay(layer, self._bucket)
        h = self._h_in if layer == 0 else self._combine()
        self._layer, self._front = layer, self.attention_route(layer, h, self._pos_host)
        self._run = (self._front.ids, self._front.weights)
        return self._front

    def back(self) -> torch.Tensor:
        """The last layer's combine and the head: logits [1, V]."""
        if self._graphs is not None:
            return self._graphs.replay_back(self._bucket)
        return self.final(self._combine())

    def set_run(self, layer: int, experts: Sequence[int], weights: torch.Tensor | Sequence[float]) -> None:
        """The experts that run at ``layer`` are ``experts`` (in top-k position order) with ``weights``,
        not the router's choice (a shape replay's forced routing, a lossy policy's substitution); host
        weights are rounded to the router's weight dtype first, as the router's own would be."""
        if not isinstance(weights, torch.Tensor):
            weights = torch.tensor(list(weights), dtype=self.weights_dtype)
        if self._graphs is not None:
            self._graphs.set_run(layer, experts, weights)
        else:
            self._run = (torch.tensor([list(experts)], device=self.device), weights.to(self.device).reshape(1, -1))

    def run_expert(self, position: int, blob: torch.Tensor) -> None:
        """The expert whose weights are ``blob`` on the current layer's input, into ``expert_out[position]``
        (launched eagerly: the path without expert graphs)."""
        x = self._graphs.x_shared if self._graphs is not None else self._front.x
        self.expert(x, blob, out=self.expert_out[position])

    def _combine(self) -> torch.Tensor:
        """The current layer's combine (the path without graphs)."""
        (ids, weights), front = self._run, self._front
        return self.moe_sum(self._layer, front.h, front.x, ids, weights, self.expert_out)

    # -- the pieces ----------------------------------------------------------------------------------
    def embed(self, token_id: int) -> torch.Tensor:
        return self.embed_weight[token_id].unsqueeze(0)                       # [1, H]

    def set_position(self, pos: int) -> None:
        """The position of the token about to run, for the device-side code (graphs, ``attention_at``):
        the position tensor, the attention mask, and the context bucket."""
        self._check_position(pos)
        self._pos.fill_(pos)
        start = self.max_len - 1 - pos
        self._mask.copy_(self._mask_pattern[start:start + self.max_len])
        self._bucket = next(i for i, b in enumerate(self.context_buckets) if b > pos)

    def attention(self, layer: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        """Pre-norm self-attention of the token at ``pos`` over exactly positions ``0..pos`` (or the
        sliding window), writing its key and value into the cache; returns ``h`` plus the attention
        output. The host knows ``pos``: the path without graphs."""
        L = self.layers[layer]
        return h + F.linear(self._attention_exact(layer, h, pos), L.o_proj, L.o_bias)

    def _attention_exact(self, layer: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        """The attention output [1, heads * D] (before o_proj) over exactly positions ``0..pos``."""
        self._check_position(pos)
        window = self.config.sliding_window
        q, kv = self._qkv(layer, h, self._rope[pos])
        cache = self.kv_cache[layer]
        cache[:, pos].copy_(kv)
        start = 0 if window is None else max(0, pos - window + 1)
        return self._attend(q, cache[0, start:pos + 1], cache[1, start:pos + 1], None)

    def attention_at(self, layer: int, h: torch.Tensor, length: int) -> torch.Tensor:
        """``attention`` at the position ``set_position`` left on the device, with no shape that depends
        on it, so a graph can capture it: the token's key and value are written at that position and
        attention reads the first ``length`` cache positions (a context bucket, at least pos + 1) under
        the position mask."""
        L = self.layers[layer]
        return h + F.linear(self._attention_bucket(layer, h, length), L.o_proj, L.o_bias)

    def _attention_bucket(self, layer: int, h: torch.Tensor, length: int) -> torch.Tensor:
        """The attention output [1, heads * D] (before o_proj) over the first ``length`` positions."""
        pos = self._pos
        if self.ops.reductions and self.attention_impl == "sdpa":
            c, L = self.config, self.layers[layer]
            return self.ops.attention_bucket(h, L.attn_norm, L.qkv, L.qkv_bias, L.q_norm, L.k_norm, self._rope, pos,
                                             self.kv_cache[layer], self._mask[:length], c.num_attention_heads,
                                             c.num_kv_heads, c.head_dim, c.rms_norm_eps, c.qk_norm, c.clip_qkv,
                                             self._eager_norm, self._scale)
        q, kv = self._qkv(layer, h, self._rope.index_select(0, pos))
        cache = self.kv_cache[layer]
        cache.index_copy_(1, pos, kv.unsqueeze(1))
        if self.attention_impl == "masked_window":
            return self._masked_window(q, cache, pos)
        return self._attend(q, cache[0, :length], cache[1, :length], self._mask[:length])

    def _masked_window(self, q: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The attention of the graphs before issue 13 (the benchmark's baseline): the whole window
        under a boolean mask built here, three-dimensional, which CUDA SDPA runs in its math fallback."""
        c = self.config
        visible = self._positions <= pos
        if c.sliding_window is not None:
            visible &= self._positions > pos - c.sliding_window
        q = q.view(c.num_kv_heads, c.num_attention_heads // c.num_kv_heads, c.head_dim)
        out = F.scaled_dot_product_attention(q, cache[0].transpose(0, 1), cache[1].transpose(0, 1),
                                             attn_mask=visible.view(1, 1, -1))
        return out.reshape(1, -1)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of the token's query q [heads, D] over keys and values [T, KV, D] under an
        additive ``mask`` [T] (None: all visible) -> [1, heads * D]."""
        c = self.config
        kv_heads, D = c.num_kv_heads, c.head_dim
        # Grouped-query attention without repeating keys: query head h uses kv head h // group (as
        # transformers' repeat_kv), so the group's queries become a KV-head's "sequence" of queries.
        q = q.view(kv_heads, c.num_attention_heads // kv_heads, D)
        keys, values = keys.transpose(0, 1), values.transpose(0, 1)                   # [KV, T, D]
        if self.attention_impl == "eager":   # scores scaled in the model dtype, softmax in float32
            scores = torch.matmul(q, keys.transpose(1, 2)) * self._scale
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)
        else:
            out = F.scaled_dot_product_attention(q[None], keys[None], values[None],
                                                 attn_mask=None if mask is None else mask.view(1, 1, 1, -1))
        return out.reshape(1, -1)

    def _check_position(self, pos: int) -> None:
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} is outside the KV cache (max_len={self.max_len}); "
                             f"build the model with a larger max_len")

    def _qkv(self, layer: int, h: torch.Tensor, rope_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token's query [heads, D] and key and value stacked [2, KV heads, D]
        (``real.layer_ops.attention_input``) for the position's ``rope_rows`` [..., 2, D]."""
        c, L = self.config, self.layers[layer]
        return self.ops.attention_input(h, L.attn_norm, L.qkv, L.qkv_bias, L.q_norm, L.k_norm, rope_rows,
                                        c.num_attention_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                                        c.qk_norm, c.clip_qkv, self._eager_norm, self.ops.reductions)

    def output_route(self, layer: int, h: torch.Tensor, attn: torch.Tensor, x_out: torch.Tensor | None = None,
                      readout: torch.Tensor | None = None) -> Front:
        """The front's half after attention, on the residual h [1, H] and the attention output attn
        [1, heads * D] (before o_proj): ``real.layer_ops.attention_output_route`` on layer ``layer``'s
        weights, as the model runs it (compiled when it compiles) (writing x into ``x_out``
        and ids | weights into ``readout`` when given)."""
        c, L = self.config, self.layers[layer]
        return Front(*self.ops.attention_output_route(
            h, attn, L.o_proj, L.o_bias, L.moe_norm, L.router, c.rms_norm_eps, c.top_k, c.norm_topk_prob,
            self.weights_dtype, self._eager_norm, x_out, readout, self.ops.reductions))

    def attention_route(self, layer: int, h: torch.Tensor, pos: int) -> Front:
        """Attention over exactly positions ``0..pos`` and the router, eagerly: the front half of a layer
        on the input residual h (the decode path without graphs, and the tests' reference)."""
        return self.output_route(layer, h, self._attention_exact(layer, h, pos))

    def front_at(self, layer: int, h: torch.Tensor, length: int, x_out: torch.Tensor | None = None,
                 readout: torch.Tensor | None = None) -> Front:
        """``attention_route`` over the context bucket ``length`` at the device-side position: what the
        layer graphs capture (``x_out``, ``readout``: their static buffers)."""
        return self.output_route(layer, h, self._attention_bucket(layer, h, length), x_out, readout)

    def read_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> tuple[list[int], list[float]]:
        """The routed expert ids and weights of ``layer`` on the host: the one synchronisation a routed
        layer needs. With graphs, ids, weights and the graph's extra output (a live predictor's
        scores, ``graph_extra_host``) come back in one copy of a buffer the graph packed."""
        if self._graphs is None:
            return ids.reshape(-1).tolist(), weights.reshape(-1).float().tolist()
        return self._graphs.read_routing(layer)

    @property
    def graphed(self) -> bool:
        return self._graphs is not None

    def capture_graphs(self, extra: Extra | None = None) -> bool:
        """Capture every layer's front half (the previous layer's combine, attention + router) as CUDA
        graphs, one per context bucket, and the last combine + head (``real.graphs``). Returns False,
        capturing nothing, off CUDA or with ``attention_impl="eager"`` (the tests' reference).

        ``extra(layer, h)``: more device work on the layer's post-attention residual to run inside the
        same graph (a live predictor: its kernels would otherwise be launched one by one from Python
        and read back with a synchronisation of their own); its float32 output is
        ``graph_extra(layer)``. Capturing with a different ``extra`` replaces the graphs; attention and
        router are unchanged."""
        if self.device.type != "cuda" or self.attention_impl == "eager":
            return False
        if self._graphs is not None and self._graphs.extra == extra:    # bound methods compare by ==
            return True
        self._graphs = self._resident_experts = None     # free the old graphs before capturing new ones
        self._graphs = LayerGraphs(self, extra)
        if self.expert_blobs is not None and self.expert_blobs.device.type == "cuda":
            c = self.config
            self._resident_experts = ExpertGraphs.capture(self, self._graphs, self.expert_blobs.reshape(
                c.num_layers * c.num_experts, -1))
        return True

    def expert_graphs(self, blobs: torch.Tensor) -> "ExpertGraphs | None":
        """``ExpertGraphs`` over ``blobs`` [N, blob] on the GPU (an engine's slots), for the layer graphs
        captured now; None without layer graphs or when there would be too many graphs to capture."""
        if self._graphs is None:
            return None
        return ExpertGraphs.capture(self, self._graphs, blobs)

    @property
    def resident_expert_graphs(self) -> "ExpertGraphs | None":
        """The ``ExpertGraphs`` over ``expert_blobs`` that the resident decode runs (experts on the GPU,
        graphs captured), else None."""
        return self._resident_experts

    def drop_resident_experts(self) -> None:
        """``expert_blobs`` is about to go (an engine took the experts): forget graphs that read it."""
        self.expert_blobs = None
        self._resident_experts = None

    def graph_extra(self, layer: int) -> torch.Tensor:
        """The output of ``capture_graphs``'s ``extra`` for ``layer`` from its latest replay."""
        if self._graphs is None or self._graphs.extra is None:
            raise RuntimeError("graph_extra: no graphs with an extra output were captured")
        return self._graphs.extra_view(layer)

    def graph_extra_host(self, layer: int) -> np.ndarray:
        """``graph_extra(layer)`` on the host: the copy ``read_routing`` brought back with the routing
        of the latest replay, or (if routing was not read since) a copy made now."""
        if self._graphs is None or self._graphs.extra is None:
            raise RuntimeError("graph_extra_host: no graphs with an extra output were captured")
        return self._graphs.extra_host(layer)

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x = post-attention norm of ``h``; the top-k expert ids [1, K] and their weights [1, K]."""
        x, ids, weights, _ = self.route_with_probs(layer, h)
        return x, ids, weights

    def route_with_probs(self, layer: int, h: torch.Tensor):
        """``route`` plus the full router softmax [1, E] (float32), for any batch of residuals h [B, H]
        (``real.layer_ops.route``, eager: predictors call it on batches of recorded states)."""
        c, L = self.config, self.layers[layer]
        return route(h, L.moe_norm, L.router, c.rms_norm_eps, c.top_k, c.norm_topk_prob, self.weights_dtype,
                     self._eager_norm, self.ops.reductions)

    def weights_for(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weights the model applies to experts ``ids`` [B, K] given router probs [B, E]. For the
        routed top-k this is the model itself; lossy speculative execution applies it to the
        speculated experts."""
        return self._weigh(torch.gather(probs, -1, ids))

    def _weigh(self, chosen: torch.Tensor) -> torch.Tensor:
        return weigh(chosen, self.config.norm_topk_prob, self.weights_dtype)

    def expert(self, x: torch.Tensor, blob: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU expert on its blob: down(silu(gate x) * up x) [B, H] for x [B, H], into ``out`` when
        given; gate and up in one matmul, the activation compiled for the decode's batch of 1."""
        I, H = self._I, self._H
        act = self.ops.swiglu if x.shape[0] == 1 else swiglu
        return torch.mm(act(F.linear(x, blob[:2 * I * H].view(2 * I, H))), blob[2 * I * H:].view(H, I).t(), out=out)

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-MoE's always-on expert, scaled by its sigmoid gate; None for the other families."""
        shared = self.layers[layer].shared
        if shared is None:
            return None
        gate, up, down, router = shared
        y = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        return torch.sigmoid(F.linear(x, router)) * y

    def moe_sum(self, layer: int, h: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                outputs: torch.Tensor) -> torch.Tensor:
        """The one combine rule, for every path (eager, and the graphs of ``real.graphs``): h + the sum
        of the expert outputs [K, 1, H] x ``weights`` [K] (+ the shared expert, on x). ``ids`` [K]: the
        experts in top-k position order, any numeric dtype (the graphs pass their float32 readout).
        Each product is rounded once to the model dtype (Mixtral's float32 weights: from the float32
        product, as transformers multiplies by a float32 column); the terms are added one at a time in
        ascending expert id, as transformers accumulates (two terms add the same in either order, so
        top-2 needs no sort). Weights that are bf16 values held in float32 give the same products as the
        bf16 weights: a bf16 x bf16 product is exact in float32, and both are rounded once from it."""
        order = torch.argsort(ids.reshape(-1)) if ids.numel() > 2 else None
        return self.ops.weighted_terms_sum(h, outputs, weights.reshape(-1), order, self.dtype,
                                           self.shared_expert(layer, x))

    def combine(self, layer: int, h: torch.Tensor, x: torch.Tensor, expert_ids: Sequence[int],
                weights: torch.Tensor, outputs: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``moe_sum`` with the raw (unweighted) ``expert`` results keyed by expert id in ``outputs``."""
        return self.moe_sum(layer, h, x, torch.tensor(list(expert_ids), device=h.device),
                            weights, torch.stack([outputs[e] for e in expert_ids]))

    def moe(self, layer: int, h: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor | Sequence[int],
            weights: torch.Tensor, blob_of: BlobOf | None = None) -> torch.Tensor:
        """The MoE half of a layer with each expert's blob from ``blob_of(layer, expert)`` (default: the
        resident ``expert_blobs``). Reading tensor ids synchronises with the device."""
        ids = expert_ids.reshape(-1).tolist() if isinstance(expert_ids, torch.Tensor) else list(expert_ids)
        blob_of = blob_of or self.resident_blob
        outputs = {e: self.expert(x, blob_of(layer, e)) for e in ids}
        return self.combine(layer, h, x, ids, weights, outputs)

    def resident_blob(self, layer: int, expert: int) -> torch.Tensor:
        blob = self.expert_blobs[layer, expert]
        return blob if blob.device == self.device else blob.to(self.device, non_blocking=True)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(h, self.final_norm, self.config.rms_norm_eps), self.lm_head)   # [1, V]

    # -- whole steps: the fully-resident reference (real.resident) ----------------------------------
    def decode_step(self, token_id: int, pos: int, blob_of: BlobOf | None = None,
                    record: list[LayerRecord] | None = None) -> torch.Tensor:
        """``real.resident.decode_step`` on this model: logits [1, V] after the token at ``pos``."""
        return resident.decode_step(self, token_id, pos, blob_of, record)

    def generate_greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, blob_of: BlobOf | None = None,
                        record: list[list[LayerRecord]] | None = None) -> list[int]:
        """``real.resident.generate_greedy`` on this model: ``max_new_tokens`` greedy new tokens."""
        return resident.generate_greedy(self, prompt_ids, max_new_tokens, blob_of, record)
