"""A compact batch-1 greedy decoder for the MoE families ``real.checkpoint`` loads (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE), in plain eager PyTorch, checked against Hugging Face's forward by
``tests/test_real_model.py``.

Why not Hugging Face's own forward: its per-layer overhead (masks, caches, output capturing, grouped
expert dispatch) costs several milliseconds per layer per token, which would drown the copy and compute
times that offloading studies measure. Here one decode step is a handful of kernels per layer.

The step is split where an offloading engine needs to interpose: ``attention`` -> ``route`` (the
router's choice, still on the device) -> the engine makes the chosen experts resident -> ``expert`` on
each blob -> ``combine``. Every expert lives in one row of ``expert_blobs`` [L, E, 3*I*H] =
gate [I, H] | up [I, H] | down [H, I], so one expert is one contiguous copy; gate and up are adjacent
and form the [2I, H] matrix of one matmul, exactly as transformers' fused experts do.

Numerics follow transformers' eager modules: RMSNorm in float32 then cast back before the weight; RoPE
tables computed in float32 and cast to the model dtype; router softmax in float32 and ``torch.topk``
order; Mixtral keeps the routing weights in float32 (so expert output x weight is rounded once, from
float32), the other families cast them to the model dtype; expert outputs are summed in ascending
expert id, as transformers' per-expert loop does.

What sits around this module: ``real.graphs`` captures these same functions as CUDA graphs (attention
+ router per layer, experts and combine), and ``real.resident`` is the fully-resident reference
decode loop (``decode_step``, ``generate_greedy``) and ``quiet_gc``. Every path (the resident model,
the offloaded engine at any cache size) runs the same kernels, so their tokens are bit-identical.
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
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
        positions (default: the model's limit, at most 4096). ``attention_impl``: "sdpa" (one fused kernel)
        or "eager" (transformers' eager arithmetic, bit for bit: the reference for tests)."""
        if attention_impl not in ("sdpa", "eager"):
            raise ValueError(f"attention_impl={attention_impl!r}: use 'sdpa' or 'eager'")
        self.attention_impl = attention_impl
        c = self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_len = min(c.max_position_embeddings, DEFAULT_MAX_LEN) if max_len is None else int(max_len)
        H, I, E, D = c.hidden_size, c.expert_intermediate_size, c.num_experts, c.head_dim
        self._I, self._H = I, H
        self._q_rows, self._kv_rows = c.num_attention_heads * D, c.num_kv_heads * D
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

        self.kv_cache = torch.zeros((c.num_layers, 2, self.max_len, c.num_kv_heads, D),
                                    dtype=dtype, device=self.device)
        # RoPE as transformers computes it: inv_freq on the CPU in float32, angles and cos/sin in float32
        # on the compute device, then cast to the model dtype.
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))
        positions = torch.arange(self.max_len, dtype=torch.float, device=self.device)
        freqs = positions[:, None] * inv_freq.to(self.device)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos = angles.cos().to(dtype)
        self.rope_sin = angles.sin().to(dtype)
        self._positions = torch.arange(self.max_len, device=self.device)
        self._graphs: LayerGraphs | None = None
        self._resident_experts: ExpertGraphs | None = None     # graphs over expert_blobs, when on the GPU

    # -- the decode step, piece by piece --------------------------------------------------------
    def reset(self) -> None:
        """Start a new request: forget every cached key and value."""
        self.kv_cache.zero_()

    def embed(self, token_id: int) -> torch.Tensor:
        return self.embed_weight[token_id].unsqueeze(0)                       # [1, H]

    def attention(self, layer: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        """Pre-norm self-attention of the token at ``pos`` over positions ``0..pos`` (or the sliding
        window), writing its key and value into the cache; returns ``h`` plus the attention output."""
        self._check_position(pos)
        c, L = self.config, self.layers[layer]
        D, heads, kv_heads = c.head_dim, c.num_attention_heads, c.num_kv_heads
        q, k, v = self._qkv(layer, h, self.rope_cos[pos], self.rope_sin[pos])
        cache = self.kv_cache[layer]
        cache[0, pos].copy_(k)
        cache[1, pos].copy_(v)
        start = 0 if c.sliding_window is None else max(0, pos - c.sliding_window + 1)
        keys = cache[0, start:pos + 1].transpose(0, 1)                        # [KV, T, D]
        values = cache[1, start:pos + 1].transpose(0, 1)
        # Grouped-query attention without repeating keys: query head h uses kv head h // group (as
        # transformers' repeat_kv), so the group's queries become a KV-head's "sequence" of queries.
        q = q.view(kv_heads, heads // kv_heads, D)
        if self.attention_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, keys, values)
        else:   # transformers' eager arithmetic: scores scaled in the model dtype, softmax in float32
            scores = torch.matmul(q, keys.transpose(1, 2)) * self._scale
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)
        return h + F.linear(out.reshape(1, heads * D), L.o_proj, L.o_bias)

    def _check_position(self, pos: int) -> None:
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} is outside the KV cache (max_len={self.max_len}); "
                             f"build the model with a larger max_len")

    def _qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The token's query [heads, D], key and value [KV heads, D], norms, clipping and RoPE (rows
        ``cos``, ``sin`` of its position) applied: what both attention paths share."""
        c, L = self.config, self.layers[layer]
        D, heads, kv_heads = c.head_dim, c.num_attention_heads, c.num_kv_heads
        x = rms_norm(h, L.attn_norm, c.rms_norm_eps)
        q, k, v = F.linear(x, L.qkv, L.qkv_bias).split([self._q_rows, self._kv_rows, self._kv_rows], dim=-1)
        if c.qk_norm == "full":
            q, k = rms_norm(q, L.q_norm, c.rms_norm_eps), rms_norm(k, L.k_norm, c.rms_norm_eps)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(heads, D), k.view(kv_heads, D), v.view(kv_heads, D)
        if c.qk_norm == "per_head":
            q, k = rms_norm(q, L.q_norm, c.rms_norm_eps), rms_norm(k, L.k_norm, c.rms_norm_eps)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def attention_route(self, layer: int, h: torch.Tensor, pos: int):
        """``attention`` then ``route_with_probs``: (h, x, ids, weights, probs). With graphs captured
        it replays layer ``layer``'s graph; its outputs are the graph's static buffers, valid until the
        same layer runs again. Call ``set_position(pos)`` once per step first when graphs are on."""
        if self._graphs is None:
            h = self.attention(layer, h, pos)
            return (h, *self.route_with_probs(layer, h))
        return self._graphs.replay(layer, h)

    def read_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> tuple[list[int], list[float]]:
        """The routed expert ids and weights of ``layer`` on the host: the one synchronisation a routed
        layer needs. With graphs, ids, weights and the graph's extra output (a live predictor's
        scores, ``graph_extra_host``) come back in one copy of a buffer the graph packed."""
        if self._graphs is None:
            return ids.reshape(-1).tolist(), weights.reshape(-1).float().tolist()
        return self._graphs.read_routing(layer)

    def set_position(self, pos: int) -> None:
        """The position of the token about to run (graphs read it from the device)."""
        self._check_position(pos)
        if self._graphs is not None:
            self._graphs.pos.fill_(pos)

    @property
    def graphed(self) -> bool:
        return self._graphs is not None

    def capture_graphs(self, extra: Extra | None = None) -> bool:
        """Capture every layer's attention + router as a CUDA graph (``real.graphs``). Returns
        False, capturing nothing, off CUDA or with ``attention_impl="eager"`` (the tests' reference).

        ``extra(layer, h)``: more device work on the layer's post-attention residual to run inside the
        same graph (a live predictor: its kernels would otherwise be launched one by one from Python
        and read back with a synchronisation of their own); its output is ``graph_extra(layer)``.
        Capturing with a different ``extra`` replaces the graphs; attention and router are unchanged."""
        if self.device.type != "cuda" or self.attention_impl != "sdpa":
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

    def drop_resident_experts(self) -> None:
        """``expert_blobs`` is about to go (an engine took the experts): forget graphs that read it."""
        self.expert_blobs = None
        self._resident_experts = None

    def graph_extra(self, layer: int) -> torch.Tensor:
        """The output of ``capture_graphs``'s ``extra`` for ``layer`` from its latest replay."""
        if self._graphs is None or self._graphs.extra is None:
            raise RuntimeError("graph_extra: no graphs with an extra output were captured")
        return self._graphs.extras[layer]

    def graph_extra_host(self, layer: int) -> np.ndarray:
        """``graph_extra(layer)`` on the host: the copy ``read_routing`` brought back with the routing
        of the latest replay, or (if routing was not read since) a copy made now."""
        if self._graphs is None or self._graphs.extra is None:
            raise RuntimeError("graph_extra_host: no graphs with an extra output were captured")
        return self._graphs.extra_host(layer)

    def _attention_graphable(self, layer: int, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``attention`` with the position as a device tensor (shape [1]) and no host-side shapes."""
        c, L = self.config, self.layers[layer]
        D, heads, kv_heads = c.head_dim, c.num_attention_heads, c.num_kv_heads
        q, k, v = self._qkv(layer, h, self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos))
        cache = self.kv_cache[layer]
        cache[0].index_copy_(0, pos, k.unsqueeze(0))
        cache[1].index_copy_(0, pos, v.unsqueeze(0))
        visible = self._positions <= pos
        if c.sliding_window is not None:
            visible &= self._positions > pos - c.sliding_window
        q = q.view(kv_heads, heads // kv_heads, D)
        out = F.scaled_dot_product_attention(q, cache[0].transpose(0, 1), cache[1].transpose(0, 1),
                                             attn_mask=visible.view(1, 1, -1))
        return h + F.linear(out.reshape(1, heads * D), L.o_proj, L.o_bias)

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x = post-attention norm of ``h``; the top-k expert ids [1, K] and their weights [1, K]."""
        x, ids, weights, _ = self.route_with_probs(layer, h)
        return x, ids, weights

    def route_with_probs(self, layer: int, h: torch.Tensor):
        """``route`` plus the full router softmax [1, E] (float32)."""
        c, L = self.config, self.layers[layer]
        x = rms_norm(h, L.moe_norm, c.rms_norm_eps)
        probs = torch.softmax(F.linear(x, L.router).float(), dim=-1)
        _, ids = torch.topk(probs, c.top_k, dim=-1)
        return x, ids, self.weights_for(probs, ids), probs

    def weights_for(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weights the model applies to experts ``ids`` [B, K] given router probs [B, E]: the
        family's rule (renormalised over the chosen ones or not; float32 for Mixtral, else the model
        dtype). For the routed top-k this is the model itself; lossy speculative execution applies it
        to the speculated experts."""
        weights = torch.gather(probs, -1, ids)
        if self.config.norm_topk_prob:                # Mixtral always renormalises, the others by config
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.config.family != "mixtral":           # Mixtral's router keeps float32 weights
            weights = weights.to(self.dtype)
        return weights

    def expert(self, x: torch.Tensor, blob: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert on its blob: down(silu(gate x) * up x); gate and up in one matmul."""
        I, H = self._I, self._H
        gate, up = F.linear(x, blob[:2 * I * H].view(2 * I, H)).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, blob[2 * I * H:].view(H, I))

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
        (unweighted) ``expert`` results keyed by expert id; the sum runs in ascending expert id, each
        term rounded to the model dtype, as transformers accumulates."""
        w = weights.reshape(-1)
        # w[i:i+1], not the 0-d w[i]: a 0-d tensor does not take part in type promotion, so Mixtral's
        # float32 weight could be rounded to bf16 before the product; transformers multiplies by a
        # [n, 1] float32 column and rounds the float32 product once.
        order = sorted(range(len(expert_ids)), key=expert_ids.__getitem__)
        return self.weighted_sum(layer, h, x, ((outputs[expert_ids[i]], w[i:i + 1]) for i in order))

    def weighted_sum(self, layer: int, h: torch.Tensor, x: torch.Tensor, terms) -> torch.Tensor:
        """h + the sum of output [1, H] x weight [1] over ``terms``, in the order given, each product
        rounded once to the model dtype (+ the shared expert): the one combine rule, for ``combine``
        and for the combine that ``ExpertGraphs`` captures."""
        acc = None
        for output, weight in terms:
            term = (output * weight).to(self.dtype)
            acc = term if acc is None else acc + term
        shared = self.shared_expert(layer, x)
        if shared is not None:
            acc = acc + shared
        return h + acc

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
        return F.linear(rms_norm(h, self.final_norm, self.config.rms_norm_eps), self.lm_head)   # [1, V]

    # -- whole steps: the fully-resident reference (real.resident) ----------------------------------
    def decode_step(self, token_id: int, pos: int, blob_of: BlobOf | None = None,
                    record: list[LayerRecord] | None = None) -> torch.Tensor:
        """``real.resident.decode_step`` on this model: logits [1, V] after the token at ``pos``."""
        return resident.decode_step(self, token_id, pos, blob_of, record)

    def generate_greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, blob_of: BlobOf | None = None,
                        record: list[list[LayerRecord]] | None = None) -> list[int]:
        """``real.resident.generate_greedy`` on this model: ``max_new_tokens`` greedy new tokens."""
        return resident.generate_greedy(self, prompt_ids, max_new_tokens, blob_of, record)
