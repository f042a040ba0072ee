"""A compact batch-1 greedy decoder for the MoE families ``real.checkpoint`` loads (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE), in plain PyTorch, checked against Hugging Face's forward by
``tests/test_real_model.py``: the decoder's arithmetic, layer by layer.

Why not Hugging Face's own forward: its per-layer overhead (masks, caches, output capturing, grouped
expert dispatch) costs several milliseconds per layer per token, which would drown the copy and compute
times that offloading studies measure. Here one decode step is a handful of kernels per layer.

The step is split where an offloading engine needs to interpose: ``attention`` -> ``route`` (the
router's choice, still on the device) -> the engine makes the chosen experts resident -> ``expert`` on
each blob -> ``combine``. Every expert lives in one row of ``expert_blobs`` [L, E, 3*I*H] =
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
weighted in float32, rounded once) and attention is one SDPA kernel.

Attention, three ways (``attention_impl``):

- ``"sdpa"`` (default): on CUDA graphs, attention reads only the first ``bucket`` positions of the KV
  cache, the smallest of ``context_buckets`` (powers of two from 64, then ``max_len``) that holds the
  context, under an additive position mask; one graph per (layer, bucket), so its time grows with the
  context and it runs PyTorch's memory-efficient SDPA kernel (flash takes no mask). Without graphs
  it reads exactly positions ``0..pos`` (or the sliding window).
- ``"masked_window"``: the graphs before issue 13, kept as the benchmark's baseline
  (``experiments/bench_layer.py``): every position of the cache under a boolean mask built in the
  graph, in a layout that sends SDPA to its math fallback on CUDA.
- ``"eager"``: transformers' arithmetic; never captured.

What sits around this module: ``real.graphs`` captures these same functions as CUDA graphs (attention
+ router per layer and bucket, experts, combine), and ``real.resident`` is the fully-resident
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
from real.pinned import pinned_empty
from real.resident import LayerRecord, quiet_gc

__all__ = ["BlobOf", "LayerRecord", "MoEModel", "quiet_gc", "rms_norm", "unpack_expert"]

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalised in float32, rounded to x's dtype, then weighted."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one kernel on CUDA (torch's fused RMSNorm): normalised and weighted in float32 and
    rounded once, where ``rms_norm`` takes some eight kernels and rounds twice."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of rows x [N, D] with ``table`` [..., 2, D] = (cos, sin with its first half
    negated). transformers' x*cos + rotate_half(x)*sin, bit for bit: rotate_half(x) = (-x2, x1) and
    roll(x) = (x2, x1) differ only in a sign that the table carries, and a sign flip is exact."""
    cos, sin = table.unbind(-2)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


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
                 attention_impl: str = "sdpa"):
        """``tensors``: the internal tensors of ``real.checkpoint.load_checkpoint``. Non-expert weights go
        to ``device``; the experts are packed into ``expert_blobs`` on ``experts_device`` (default:
        ``device``; pinned when it is the CPU and ``device`` is CUDA). The KV cache holds ``max_len``
        positions (default: the model's limit, at most 4096). ``attention_impl``: "sdpa",
        "masked_window" or "eager" (the module docstring)."""
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r}: use one of {', '.join(ATTENTION_IMPLS)}")
        self.attention_impl = attention_impl
        self._norm = rms_norm if attention_impl == "eager" else fused_rms_norm
        c = self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_len = min(c.max_position_embeddings, DEFAULT_MAX_LEN) if max_len is None else int(max_len)
        H, I, E, D = c.hidden_size, c.expert_intermediate_size, c.num_experts, c.head_dim
        self._I, self._H = I, H
        self._scale = D ** -0.5

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
        self._mask = torch.zeros(self.max_len, dtype=dtype, device=self.device)
        offset = torch.arange(-(self.max_len - 1), self.max_len, device=self.device)
        visible = offset <= 0
        if c.sliding_window is not None:
            visible &= offset > -c.sliding_window
        self._mask_pattern = torch.zeros(len(offset), dtype=dtype, device=self.device).masked_fill_(
            ~visible, float("-inf"))
        self._graphs: LayerGraphs | None = None
        self._resident_experts: ExpertGraphs | None = None     # graphs over expert_blobs, when on the GPU

    # -- the decode step, piece by piece --------------------------------------------------------
    def reset(self) -> None:
        """Start a new request: forget every cached key and value."""
        self.kv_cache.zero_()

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
        self._check_position(pos)
        window = self.config.sliding_window
        q, k, v = self._qkv(layer, h, self._rope[pos])
        cache = self.kv_cache[layer]
        cache[0, pos].copy_(k)
        cache[1, pos].copy_(v)
        start = 0 if window is None else max(0, pos - window + 1)
        out = self._attend(q, cache[0, start:pos + 1], cache[1, start:pos + 1], None)
        return self._attention_output(layer, h, out)

    def attention_at(self, layer: int, h: torch.Tensor, length: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``attention`` at the position ``set_position`` left on the device, with no shape that depends
        on it, so a graph can capture it: the token's key and value are written at that position and
        attention reads the first ``length`` cache positions (a context bucket, at least pos + 1) under
        the position mask. ``out``: where to write the result [1, H] (a graph's static buffer)."""
        pos = self._pos
        q, k, v = self._qkv(layer, h, self._rope.index_select(0, pos))
        cache = self.kv_cache[layer]
        cache[0].index_copy_(0, pos, k.unsqueeze(0))
        cache[1].index_copy_(0, pos, v.unsqueeze(0))
        if self.attention_impl == "masked_window":
            attn = self._masked_window(q, cache, pos)
        else:
            attn = self._attend(q, cache[0, :length], cache[1, :length], self._mask[:length])
        return self._attention_output(layer, h, attn, out)

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

    def _attention_output(self, layer: int, h: torch.Tensor, attn: torch.Tensor,
                          out: torch.Tensor | None = None) -> torch.Tensor:
        """h + o_proj(attn), into ``out`` when given."""
        L = self.layers[layer]
        return torch.add(h, F.linear(attn, L.o_proj, L.o_bias), out=out)

    def _check_position(self, pos: int) -> None:
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} is outside the KV cache (max_len={self.max_len}); "
                             f"build the model with a larger max_len")

    def _qkv(self, layer: int, h: torch.Tensor, rope_rows: torch.Tensor):
        """The token's query [heads, D], key and value [KV heads, D], norms, clipping and RoPE (its
        position's ``rope_rows`` [..., 2, D]) applied: what every attention path shares. Query and key
        are rotated together, one set of kernels for both."""
        c, L = self.config, self.layers[layer]
        D, heads, kv_heads = c.head_dim, c.num_attention_heads, c.num_kv_heads
        eps = c.rms_norm_eps
        qkv = F.linear(self._norm(h, L.attn_norm, eps), L.qkv, L.qkv_bias)        # [1, (heads + 2 KV) D]
        if c.qk_norm == "full":             # OLMoE: over all heads at once, before clipping
            q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
            qkv = torch.cat((self._norm(q, L.q_norm, eps), self._norm(k, L.k_norm, eps), v), dim=-1)
        if c.clip_qkv is not None:
            qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
        rows = qkv.view(heads + 2 * kv_heads, D)
        if c.qk_norm == "per_head":         # Qwen3-MoE: each head's row, before RoPE
            rows = torch.cat((self._norm(rows[:heads], L.q_norm, eps),
                              self._norm(rows[heads:heads + kv_heads], L.k_norm, eps), rows[heads + kv_heads:]))
        qk = rope(rows[:heads + kv_heads], rope_rows)
        return qk[:heads], qk[heads:], rows[heads + kv_heads:]

    def attention_route(self, layer: int, h: torch.Tensor, pos: int):
        """``attention`` then ``route_with_probs``: (h, x, ids, weights, probs). With graphs captured
        it replays layer ``layer``'s graph for the bucket of the position ``set_position`` was given
        (call it once per step first); its outputs are the graphs' static buffers: h and x valid until
        the next layer runs, ids, weights and probs until the same layer runs again."""
        if self._graphs is None:
            h = self.attention(layer, h, pos)
            return (h, *self.route_with_probs(layer, h))
        return self._graphs.replay(layer, self._bucket, h)

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
        """Capture every layer's attention + router as CUDA graphs, one per context bucket
        (``real.graphs``). Returns False, capturing nothing, off CUDA or with ``attention_impl="eager"``
        (the tests' reference).

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
        """``route`` plus the full router softmax [1, E] (float32)."""
        c, L = self.config, self.layers[layer]
        x = self._norm(h, L.moe_norm, c.rms_norm_eps)
        probs = torch.softmax(F.linear(x, L.router), dim=-1, dtype=torch.float32)
        chosen, ids = torch.topk(probs, c.top_k, dim=-1)
        return x, ids, self._weigh(chosen), probs

    def weights_for(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weights the model applies to experts ``ids`` [B, K] given router probs [B, E]. For the
        routed top-k this is the model itself; lossy speculative execution applies it to the
        speculated experts."""
        return self._weigh(torch.gather(probs, -1, ids))

    def _weigh(self, chosen: torch.Tensor) -> torch.Tensor:
        """The family's rule on the chosen experts' probabilities [B, K]: renormalised over them or
        not; float32 for Mixtral, else the model dtype."""
        if self.config.norm_topk_prob:                # Mixtral always renormalises, the others by config
            chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        if self.config.family != "mixtral":           # Mixtral's router keeps float32 weights
            chosen = chosen.to(self.dtype)
        return chosen

    def expert(self, x: torch.Tensor, blob: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """SwiGLU expert on its blob: down(silu(gate x) * up x) [1, H], into ``out`` when given; gate
        and up in one matmul."""
        I, H = self._I, self._H
        gate, up = F.linear(x, blob[:2 * I * H].view(2 * I, H)).chunk(2, dim=-1)
        return torch.mm(F.silu(gate) * up, blob[2 * I * H:].view(H, I).t(), out=out)

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-MoE's always-on expert, scaled by its sigmoid gate; None for the other families."""
        shared = self.layers[layer].shared
        if shared is None:
            return None
        gate, up, down, router = shared
        y = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        return torch.sigmoid(F.linear(x, router)) * y

    def combine(self, layer: int, h: torch.Tensor, x: torch.Tensor, expert_ids: Sequence[int],
                weights: torch.Tensor, outputs: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """h + sum_i weights[i] * outputs[expert_ids[i]] (+ the shared expert). ``outputs`` holds the raw
        (unweighted) ``expert`` results keyed by expert id; ``weighted_sum`` is the rule."""
        order = sorted(range(len(expert_ids)), key=expert_ids.__getitem__)
        return self.weighted_sum(layer, h, x, torch.stack([outputs[e] for e in expert_ids]),
                                 weights.reshape(-1), order)

    def weighted_sum(self, layer: int, h: torch.Tensor, x: torch.Tensor, outputs: torch.Tensor,
                     weights: torch.Tensor, order: Sequence[int] | torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """The one combine rule, for ``combine`` and for the combine graph of ``real.graphs``: h + the
        sum of outputs [K, 1, H] x weights [K] (+ the shared expert), into ``out`` when given. Each
        product is rounded once to the model dtype (Mixtral's float32 weights: from the float32
        product, as transformers multiplies by a float32 column); the terms are added one at a time
        in ``order``, the positions in ascending expert id (a host sequence, or a device tensor whose
        rows are gathered), as transformers accumulates. Two terms add the same in either order, so
        a graph passes range(2) and needs no sort. Weights that are bf16 values held in float32 give
        the same products as the bf16 weights: a bf16 x bf16 product is exact in float32, and both
        are rounded once from it."""
        terms = (outputs * weights.view(-1, 1, 1)).to(self.dtype)
        if isinstance(order, torch.Tensor):
            terms, order = terms.index_select(0, order), range(len(order))
        acc = terms[order[0]]
        for i in order[1:]:
            acc = acc + terms[i]
        shared = self.shared_expert(layer, x)
        if shared is not None:
            acc = acc + shared
        return torch.add(h, acc, out=out)

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
