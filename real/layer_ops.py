"""The decoder layer's arithmetic as pure functions over tensors, so that one copy of it runs eagerly
(the CPU, the tests' reference) and compiled (``torch.compile`` on CUDA, inside the CUDA graphs).

Why compile: at batch 1 a layer is some thirty tiny kernels (norms, RoPE, softmax, top-k weighting,
the weighted sum), each a few microseconds of launch and tail on the GPU however little it computes,
so the kernel count, not the arithmetic, sets the layer's time. Inductor fuses each run of elementwise
work and reductions between two GEMMs into one Triton kernel. Functions take every weight as an
argument and every model constant as a plain Python value, so one compilation serves every layer of a
model (Dynamo guards on shapes, dtypes and those constants, not on which layer's tensors are passed)
and the graphs capture the compiled kernels like any others.

Batch-1 products as reductions (``reductions=True``, the default when compiled): a library GEMM of one
row is latency, not bandwidth, at these sizes (measured on the H200, ``experiments/results/h200/
session9/explore_front.log``: cuBLAS's o_proj with its residual 7.1 us, the router's 1024 x 8 product
3.1 us, ``torch.topk`` of 2 in 8 two kernels, 8.2 us; cuDNN's attention over a 64-position bucket
5.0 us plus the eager index kernels around it). Written as a float32 multiply-and-sum, the same
product (bf16 x bf16 is exact in float32, accumulated in float32, rounded once, as cuBLAS does) is a
Triton reduction that Inductor fuses with the norm, softmax or residual beside it (o_proj and its
residual 1.8 us); top-k is k max passes; attention over the context bucket is two reductions and a
softmax, with the RoPE lookup and the KV-cache write in the same compiled function (one per bucket).
Eager (the CPU, the tests' reference) the same functions call the library kernels: a reduction
written this way would materialise the [out, in] product in memory.

Compiled and eager results agree to rounding, not bit for bit (a fused kernel rounds once where eager
PyTorch rounds after each op). Every decode path of one model (the resident reference, the offloaded
engine at any cache size and policy) runs the same functions in the same mode, so their tokens stay
identical to each other; the eager reference (``attention_impl="eager"``) is transformers'
arithmetic, against which both are compared within bf16 tolerance.

Whether a model compiles: ``MoEModel(compile_kernels=...)``; by default on CUDA with the fast
attention, and never with ``MOE_LAB_COMPILE=0`` in the environment.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

COMPILE_ENV = "MOE_LAB_COMPILE"        # "0": never compile; "1": compile wherever asked for by default too


class Front(NamedTuple):
    """What the front half of a layer leaves (``MoEModel.front``): the residual after attention h [1, H],
    the expert input x [1, H], the router's ids [1, K] and weights [1, K], and its softmax [1, E]."""
    h: torch.Tensor
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor


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


def matvec(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, reductions: bool) -> torch.Tensor:
    """x [B, in] times w [out, in] transposed (+ bias [out]) -> [B, out] in x's dtype, as ``F.linear``.
    ``reductions`` and one row (B = 1): as a float32 multiply-and-sum over ``in`` (exact products,
    float32 accumulation, rounded once), which Inductor compiles into one Triton reduction fused with
    its neighbours; else ``F.linear``."""
    if not reductions or x.shape[0] != 1:
        return F.linear(x, w, bias)
    y = (x.float() * w.float()).sum(-1)                                     # [1, in] x [out, in] -> [out]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(1, -1)


def select_top_k(probs: torch.Tensor, k: int, reductions: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of ``probs`` [B, E] in descending order: (values [B, K], ids [B, K] int64), as
    ``torch.topk``. ``reductions``: k max passes, each leaving out the ids taken (a tie goes to the lower
    id, ``torch.max``'s rule), which Inductor fuses with the softmax before them; else ``torch.topk``."""
    if not reductions:
        return torch.topk(probs, k, dim=-1)
    ids_row = torch.arange(probs.shape[-1], device=probs.device)
    values, ids = [], []
    for _ in range(k):
        value, i = probs.max(-1, keepdim=True)
        values.append(value)
        ids.append(i)
        probs = torch.where(ids_row == i, float("-inf"), probs)
    return torch.cat(values, -1), torch.cat(ids, -1)


def attention_input(h: torch.Tensor, norm_w: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
                    q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, rope_rows: torch.Tensor,
                    heads: int, kv_heads: int, head_dim: int, eps: float, qk_norm: str | None,
                    clip_qkv: float | None, eager_norm: bool, reductions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The token's query [heads, D] and its key and value stacked [2, KV heads, D], from the residual
    h [1, H]: pre-attention norm, one QKV matmul (``matvec``), the family's q/k norms and clipping, RoPE
    on q and k together (``rope_rows`` [..., 2, D]: the position's table rows)."""
    norm = rms_norm if eager_norm else fused_rms_norm
    D = head_dim
    qkv = matvec(norm(h, norm_w, eps), qkv_w, qkv_b, reductions)            # [1, (heads + 2 KV) D]
    if qk_norm == "full":             # OLMoE: over all heads at once, before clipping
        q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
        qkv = torch.cat((norm(q, q_norm_w, eps), norm(k, k_norm_w, eps), v), dim=-1)
    if clip_qkv is not None:
        qkv = qkv.clamp(-clip_qkv, clip_qkv)
    rows = qkv.view(heads + 2 * kv_heads, D)
    if qk_norm == "per_head":         # Qwen3-MoE: each head's row, before RoPE
        rows = torch.cat((norm(rows[:heads], q_norm_w, eps), norm(rows[heads:heads + kv_heads], k_norm_w, eps),
                          rows[heads + kv_heads:]))
    qk = rope(rows[:heads + kv_heads], rope_rows)
    kv = torch.stack((qk[heads:], rows[heads + kv_heads:]))
    return qk[:heads], kv


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """Grouped-query attention of one token as reductions: query q [heads, D] over keys and values
    [T, KV heads, D] under an additive ``mask`` [T] (None: all visible) -> [1, heads * D] in q's dtype.
    Query head h uses KV head h // (heads / KV heads), as transformers' repeat_kv; scores, softmax and
    the weighted sum in float32, rounded once (SDPA's flash kernels round the probabilities to the model
    dtype before the second product: the two agree to that rounding)."""
    heads, D = q.shape
    kv_heads = keys.shape[1]
    qf = q.view(kv_heads, heads // kv_heads, 1, D).float()
    k = keys.transpose(0, 1).unsqueeze(1).float()                            # [KV, 1, T, D]
    scores = (qf * k).sum(-1) * scale                                        # [KV, G, T]
    if mask is not None:
        scores = scores + mask
    p = torch.softmax(scores, dim=-1)
    out = (p.unsqueeze(-1) * values.transpose(0, 1).unsqueeze(1).float()).sum(-2)     # [KV, G, D]
    return out.to(q.dtype).reshape(1, -1)


def attention_bucket(h: torch.Tensor, norm_w: torch.Tensor, qkv_w: torch.Tensor, qkv_b: torch.Tensor | None,
                     q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, rope_table: torch.Tensor,
                     pos: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor, heads: int, kv_heads: int,
                     head_dim: int, eps: float, qk_norm: str | None, clip_qkv: float | None, eager_norm: bool,
                     scale: float) -> torch.Tensor:
    """A layer's attention at the device-side position ``pos`` [1] (int64) over a context bucket, with
    batch-1 products as reductions (the graphs' path when the model compiles): ``attention_input``
    with the position's rows of ``rope_table`` [max_len, 2, D], the token's key and value written into
    the layer's ``cache`` [2, max_len, KV, D] at ``pos`` (in place), then ``attend`` over the first
    ``len(mask)`` positions under the additive ``mask``. Returns the attention output [1, heads * D]
    (before o_proj). Compiled, it is one function per bucket length (Dynamo specialises on the shape)."""
    q, kv = attention_input(h, norm_w, qkv_w, qkv_b, q_norm_w, k_norm_w, rope_table.index_select(0, pos), heads,
                            kv_heads, head_dim, eps, qk_norm, clip_qkv, eager_norm, reductions=True)
    cache.index_copy_(1, pos, kv.unsqueeze(1))
    length = mask.shape[0]
    return attend(q, cache[0, :length], cache[1, :length], mask, scale)


def attention_output_route(h: torch.Tensor, attn: torch.Tensor, o_proj: torch.Tensor, o_bias: torch.Tensor | None,
                           moe_norm_w: torch.Tensor, router_w: torch.Tensor, eps: float, top_k: int,
                           renormalise: bool, weights_dtype: torch.dtype, eager_norm: bool,
                           x_out: torch.Tensor | None = None, readout: torch.Tensor | None = None,
                           reductions: bool = False):
    """The rest of the layer's front half: the residual after attention, h + o_proj(attn) [1, H]; the
    expert input x (post-attention norm) [1, H]; the router's top-k ids [1, K] (int64, ``torch.topk``
    order), their weights [1, K] (renormalised over the k or not; ``weights_dtype``) and the full
    softmax [1, E] (float32). Also written, when given (a graph's static buffers, so that compiled code
    stores there directly): x into ``x_out`` [1, H], and ids | weights as float32 into
    ``readout[:2K]`` (ids are exact in float32). ``reductions``: o_proj, the router and the top-k as
    reductions (``matvec``, ``select_top_k``)."""
    h = h + matvec(attn, o_proj, o_bias, reductions)
    x, ids, weights, probs = route(h, moe_norm_w, router_w, eps, top_k, renormalise, weights_dtype, eager_norm,
                                   reductions)
    if x_out is not None:
        x_out.copy_(x)
    if readout is not None:
        readout[:top_k].copy_(ids.reshape(-1))
        readout[top_k:2 * top_k].copy_(weights.reshape(-1))
    return h, x, ids, weights, probs


def route(h: torch.Tensor, moe_norm_w: torch.Tensor, router_w: torch.Tensor, eps: float, k: int,
          renormalise: bool, weights_dtype: torch.dtype, eager_norm: bool, reductions: bool = False):
    """The router on residuals h [B, H]: the expert input x (post-attention norm) [B, H], the top-k ids
    [B, K] (int64, ``torch.topk`` order), their weights [B, K] (``weigh``) and the softmax [B, E] (float32).
    ``reductions``: the router's product and the top-k as reductions (``matvec``, ``select_top_k``)."""
    x = (rms_norm if eager_norm else fused_rms_norm)(h, moe_norm_w, eps)
    probs = torch.softmax(matvec(x, router_w, None, reductions), dim=-1, dtype=torch.float32)
    chosen, ids = select_top_k(probs, k, reductions)
    return x, ids, weigh(chosen, renormalise, weights_dtype), probs


def weigh(chosen: torch.Tensor, renormalise: bool, weights_dtype: torch.dtype) -> torch.Tensor:
    """The family's rule on the chosen experts' probabilities [B, K]: renormalised over them or not,
    then cast to ``weights_dtype`` (Mixtral keeps float32, the others the model dtype)."""
    if renormalise:
        chosen = chosen / chosen.sum(dim=-1, keepdim=True)
    return chosen.to(weights_dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of one expert's fused gate|up projection [1, 2I] -> [1, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def weighted_terms_sum(h: torch.Tensor, outputs: torch.Tensor, weights: torch.Tensor,
                       order: torch.Tensor | None, dtype: torch.dtype, shared: torch.Tensor | None = None) -> torch.Tensor:
    """h + (the sum of expert outputs [K, 1, H] x weights [K] + ``shared``): each product rounded once
    to ``dtype``, the terms added one at a time in ``order`` (a device tensor of positions, or None:
    0..K-1), as transformers' per-expert loop accumulates in ascending expert id; then a shared
    expert's output [1, H], then the residual. Returns [1, H]."""
    terms = (outputs * weights.view(-1, 1, 1)).to(dtype)
    if order is not None:
        terms = terms.index_select(0, order)
    acc = terms[0]
    for i in range(1, terms.shape[0]):
        acc = acc + terms[i]
    if shared is not None:
        acc = acc + shared
    return h + acc


# -- compilation ---------------------------------------------------------------------------------
_COMPILED: dict[Callable, Callable] = {}


REDUCTIONS_ENV = "MOE_LAB_REDUCTIONS"  # "0": compiled models keep the library kernels (cuBLAS, SDPA, torch.topk)
RECOMPILE_LIMIT = 64      # compiled functions per Python function: attention has one per context bucket and model


def compile_default(device: torch.device) -> bool:
    """Whether a model on ``device`` compiles by default: on CUDA, unless ``MOE_LAB_COMPILE=0``; on the
    CPU only with ``MOE_LAB_COMPILE=1`` (Inductor's CPU code needs a C++ compiler and takes seconds per
    function on a small machine)."""
    env = os.environ.get(COMPILE_ENV)
    if env == "0":
        return False
    return device.type == "cuda" or env == "1"


def can_compile(device: torch.device) -> str | None:
    """None if ``torch.compile`` can build kernels for ``device`` here, else why not."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("cc")):
        return "Inductor's CPU backend needs a C++ compiler (c++/g++/cc), and none is on PATH"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Inductor's CUDA backend needs triton, which is not installed"
    return None


def reductions_default(compile: bool) -> bool:
    """Whether a model's batch-1 products run as reductions by default: when it compiles, unless
    ``MOE_LAB_REDUCTIONS=0`` (the library kernels, for comparison: ``experiments.bench_layer``)."""
    return compile and os.environ.get(REDUCTIONS_ENV) != "0"


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled by Inductor (static shapes; one compiled function per Python function, shared by
    every model: its guards tell shapes and constants apart). Dynamo's default of 8 specialisations
    per function would send a ninth context bucket or model shape back to eager code, silently slow;
    ``RECOMPILE_LIMIT`` raises it."""
    import torch._dynamo.config as dynamo_config
    if getattr(dynamo_config, "recompile_limit", RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
        dynamo_config.recompile_limit = RECOMPILE_LIMIT
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


class LayerOps:
    """The functions a model runs: eager, or compiled (``compile``); ``reductions``: batch-1 products,
    top-k and the bucket's attention as reductions (the module docstring). Attribute access gives the
    function to call."""

    FUNCTIONS: Sequence[Callable] = (attention_input, attention_bucket, attention_output_route, swiglu,
                                     weighted_terms_sum)

    def __init__(self, compile: bool, reductions: bool = False):
        self.compiled = compile
        self.reductions = reductions
        for fn in self.FUNCTIONS:
            setattr(self, fn.__name__, compiled(fn) if compile else fn)
