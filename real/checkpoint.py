"""Hugging Face-format MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the config mapped to one
frozen ``MoEConfig``, the safetensors weights checked against it and renamed to the compact names
``real.model.MoEModel`` reads. Pickle checkpoints are refused: loading one runs arbitrary code.

Block-FP8 checkpoints (the FP8 releases of Qwen3-MoE and DeepSeek: ``quantization_config`` with
``quant_method: "fp8"`` and ``weight_block_size: [br, bc]``; each float8 ``*.weight`` [R, C] has a float
``*.weight_scale_inv`` [ceil(R / br), ceil(C / bc)] beside it) are dequantized on load: weight = fp8 value
x the scale of its block. Every other quantization (GPTQ, AWQ, bitsandbytes, compressed-tensors, MXFP4…)
is refused with one ``CheckpointError`` that names the method.

Everything a checkpoint holds must be used: a tensor the config does not account for (a layer or an
expert beyond the config's counts, a bias the config says is absent) means the config and the weights
disagree, and loading would silently build a different model, so it is an error.

Two expert layouts exist on disk and both load: the classic one, one tensor per expert and projection
(``block_sparse_moe.experts.{j}.w1`` in Mixtral, ``mlp.experts.{j}.gate_proj`` in the others), which
released checkpoints use, and the fused one of transformers 5.x's modules (``mlp.experts.gate_up_proj``
[E, 2I, H], gate rows first, and ``mlp.experts.down_proj`` [E, H, I]), which some 5.x versions write.

Internal names (``[E, ...]`` tensors stack the experts of one layer):

    embed [V, H]   final_norm [H]   lm_head [V, H] (absent when tied)
    layers.{l}.attn_norm [H]        layers.{l}.qkv [(NH + 2 KV) D, H]     layers.{l}.qkv_bias
    layers.{l}.o_proj [H, NH D]     layers.{l}.o_bias                     layers.{l}.q_norm, k_norm
    layers.{l}.moe_norm [H]         layers.{l}.router [E, H]
    layers.{l}.experts.gate [E, I, H]   .experts.up [E, I, H]   .experts.down [E, H, I]
    layers.{l}.shared.gate [S, H]   .shared.up [S, H]   .shared.down [H, S]   .shared.router [1, H]

q, k and v are stored fused (one matrix, one matmul per token); everything else keeps HF's shape.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from traces.io import atomic_write
from traces.model_shape import ModelShape

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file, the tensor or field, and the fix."""


@dataclass(frozen=True)
class MoEConfig:
    family: str                      # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    hidden_size: int
    expert_intermediate_size: int
    num_layers: int                  # every layer is an MoE layer
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool             # renormalise the top-k probabilities to sum to 1
    rope_theta: float
    rms_norm_eps: float
    qk_norm: str                     # "none" | "per_head" (qwen3: RMSNorm over D) | "full" (olmoe: over NH*D)
    shared_expert_intermediate_size: int  # qwen2_moe's always-on expert; 0 when absent
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None    # olmoe: clamp q, k, v to [-clip, clip] after the norms
    sliding_window: int | None = None  # attend to the last `sliding_window` positions (self included)

    @classmethod
    def from_hf(cls, config_dict: Mapping, path: str | Path = CONFIG_NAME) -> "MoEConfig":
        """Map a Hugging Face ``config.json`` (as a dict); ``path`` only names the file in errors. Every
        field read is type-checked (counts are integers >= 1, flags are booleans, rates are positive
        numbers); a value of the wrong type or an inconsistent pair raises ``CheckpointError``."""
        if not isinstance(config_dict, Mapping):
            raise CheckpointError(f"{path}: holds a JSON {type(config_dict).__name__}, not an object; "
                                  f"re-save the config with save_pretrained")
        c = dict(config_dict)

        def bad(field: str, why: str, fix: str) -> CheckpointError:
            return CheckpointError(f"{path}: {field}: {why}; {fix}")

        family = c.get("model_type")
        if family not in SUPPORTED_MODEL_TYPES:
            raise bad("model_type", f"{family!r} is not supported",
                      f"use a checkpoint of one of {', '.join(SUPPORTED_MODEL_TYPES)}")

        def integer(field: str, default: int | None = None, minimum: int = 1) -> int:
            v = c.get(field)
            if v is None:
                if default is None:
                    raise bad(field, "missing", f"add `{field}` to the config (see transformers' {family} config)")
                return default
            # JSON has no integer type of its own: 64.0 is accepted, 64.5, true or "64" are not
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < minimum:
                raise bad(field, f"{v!r} is not an integer >= {minimum}", f"set `{field}` as the model was trained")
            return int(v)

        def number(field: str, v, default: float | None) -> float | None:
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise bad(field, f"{v!r} is not a positive number", f"set `{field}` as the model was trained")
            return float(v)

        def flag(field: str, default: bool) -> bool:
            v = c.get(field)
            if v is None:
                return default
            if not isinstance(v, bool):
                raise bad(field, f"{v!r} is not true or false", f"set `{field}` to true or false")
            return v

        if c.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"{c['hidden_act']!r} is not supported", "only SwiGLU (silu) experts are")

        hidden, layers, heads = integer("hidden_size"), integer("num_hidden_layers"), integer("num_attention_heads")
        kv_heads = integer("num_key_value_heads", default=heads)
        if c.get("head_dim") is None and hidden % heads:
            raise bad("head_dim", f"missing, and hidden_size={hidden} is not a multiple of "
                      f"num_attention_heads={heads}", "add the model's `head_dim` to the config")
        head_dim = integer("head_dim", default=hidden // heads)

        # transformers' attribute_map aliases num_experts and num_local_experts; config.json may hold either
        named = {k: c[k] for k in ("num_experts", "num_local_experts") if c.get(k) is not None}
        if not named:
            raise bad("num_experts", "missing", "add `num_experts` (or `num_local_experts`) to the config")
        if len(named) == 2 and named["num_experts"] != named["num_local_experts"]:
            raise bad("num_experts/num_local_experts", f"the two names of one count disagree ({named})",
                      "keep one: the number of experts the weights hold")
        experts = integer(next(iter(named)))
        intermediate = integer("intermediate_size" if family in ("mixtral", "olmoe") else "moe_intermediate_size")
        if family in ("qwen2_moe", "qwen3_moe"):
            step = integer("decoder_sparse_step", default=1)
            mlp_only = c.get("mlp_only_layers") or []
            if not isinstance(mlp_only, list) or not all(isinstance(l, int) for l in mlp_only):
                raise bad("mlp_only_layers", f"{mlp_only!r} is not a list of layer indices", "fix the config")
            # with step > 1 layer 0 is dense already: the first layers are enough to name some dense ones
            dense = sorted({l for l in mlp_only if 0 <= l < layers}
                           | {l for l in range(min(layers, 1024)) if (l + 1) % step != 0})
            if dense:
                raise bad("decoder_sparse_step/mlp_only_layers", f"layers {dense} are dense MLP layers",
                          "dense layers mixed with MoE layers are not supported yet")

        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if not isinstance(rope, Mapping):
            raise bad("rope_parameters", f"{rope!r} is not an object", "fix the config")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise bad("rope_parameters", f"rope_type {rope_type!r} is not supported", "only default RoPE is")
        default_theta = 1e6 if family == "mixtral" else 1e4   # transformers' default_theta per family
        rope_theta = (number("rope_parameters.rope_theta", rope.get("rope_theta"), None)
                      or number("rope_theta", c.get("rope_theta"), default_theta))

        sliding_window = None
        if family == "mixtral":
            sliding_window = integer("sliding_window", default=0, minimum=0) or None
        elif family in ("qwen2_moe", "qwen3_moe") and flag("use_sliding_window", False):
            if family == "qwen2_moe":
                raise bad("use_sliding_window", "qwen2_moe's per-layer sliding windows are not supported",
                          "set use_sliding_window to false if the model was trained without them")
            sliding_window = integer("sliding_window", default=0, minimum=0) or None

        cfg = cls(
            family=family,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            expert_intermediate_size=intermediate,
            num_layers=layers,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            num_experts=experts,
            top_k=integer("num_experts_per_tok"),
            norm_topk_prob=True if family == "mixtral" else flag("norm_topk_prob", False),
            rope_theta=rope_theta,
            rms_norm_eps=number("rms_norm_eps", c.get("rms_norm_eps"),
                                1e-5 if family in ("mixtral", "olmoe") else 1e-6),
            qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(family, "none"),
            shared_expert_intermediate_size=(integer("shared_expert_intermediate_size")
                                             if family == "qwen2_moe" else 0),
            tie_word_embeddings=flag("tie_word_embeddings", False),
            max_position_embeddings=integer("max_position_embeddings", default=4096),
            qkv_bias=flag("qkv_bias", True) if family == "qwen2_moe" else flag("attention_bias", False),
            o_bias=family in ("qwen3_moe", "olmoe") and flag("attention_bias", False),
            clip_qkv=number("clip_qkv", c.get("clip_qkv"), None) if family == "olmoe" else None,
            sliding_window=sliding_window,
        )
        if heads % kv_heads:
            raise bad("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}",
                      "fix the config")
        if cfg.top_k > experts:
            raise bad("num_experts_per_tok", f"{cfg.top_k} is not in 1..{experts}", "fix the config")
        if head_dim % 2:
            raise bad("head_dim", f"{head_dim} is odd", "RoPE needs an even head_dim")
        return cfg

    def to_model_shape(self, name: str) -> ModelShape:
        return ModelShape(name, self.num_layers, self.num_experts, self.top_k, self.hidden_size,
                          self.expert_intermediate_size, self.num_attention_heads, self.num_kv_heads,
                          self.head_dim, self.vocab_size)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every internal tensor this config needs, with its shape."""
        H, I, E, D = self.hidden_size, self.expert_intermediate_size, self.num_experts, self.head_dim
        qkv_rows = (self.num_attention_heads + 2 * self.num_kv_heads) * D
        shapes: dict[str, tuple[int, ...]] = {"embed": (self.vocab_size, H), "final_norm": (H,)}
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, H)
        for l in range(self.num_layers):
            p = f"layers.{l}."
            shapes[p + "attn_norm"] = (H,)
            shapes[p + "qkv"] = (qkv_rows, H)
            if self.qkv_bias:
                shapes[p + "qkv_bias"] = (qkv_rows,)
            shapes[p + "o_proj"] = (H, self.num_attention_heads * D)
            if self.o_bias:
                shapes[p + "o_bias"] = (H,)
            if self.qk_norm == "per_head":
                shapes[p + "q_norm"], shapes[p + "k_norm"] = (D,), (D,)
            elif self.qk_norm == "full":
                shapes[p + "q_norm"] = (self.num_attention_heads * D,)
                shapes[p + "k_norm"] = (self.num_kv_heads * D,)
            shapes[p + "moe_norm"] = (H,)
            shapes[p + "router"] = (E, H)
            shapes[p + "experts.gate"] = (E, I, H)
            shapes[p + "experts.up"] = (E, I, H)
            shapes[p + "experts.down"] = (E, H, I)
            if self.shared_expert_intermediate_size:
                S = self.shared_expert_intermediate_size
                shapes[p + "shared.gate"], shapes[p + "shared.up"] = (S, H), (S, H)
                shapes[p + "shared.down"], shapes[p + "shared.router"] = (H, S), (1, H)
        return shapes


# -- quantization ----------------------------------------------------------------------------------
# DeepSeek's name for the per-block factor; despite "inv" it multiplies the fp8 value.
FP8_SCALE_SUFFIX = "_scale_inv"
_FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SCALE_DTYPES = _WEIGHT_DTYPES + (torch.float8_e8m0fnu,)   # UE8M0 scales (powers of two), DeepSeek-V3.1
_UNQUANTIZED_FIX = ("use the model's unquantized release (bf16 or fp16 weights, no quantization_config) or "
                    "its block-FP8 release (quant_method 'fp8' with weight_block_size)")


@dataclass(frozen=True)
class BlockFP8:
    """How a block-FP8 checkpoint stores its weights: float8 values, one scale per block."""
    block: tuple[int, int]       # rows, columns of one block
    dtype: torch.dtype           # the float8 storage type (``fmt``: e4m3 -> float8_e4m3fn)


def weight_quantization(config_dict: Mapping, path: str | Path = CONFIG_NAME) -> BlockFP8 | None:
    """How the weights of the checkpoint with this ``config.json`` (as a dict; ``path`` names the file in
    errors) are stored: None when unquantized, ``BlockFP8`` for block-FP8. Any other
    ``quantization_config`` (GPTQ, AWQ, bitsandbytes, compressed-tensors, MXFP4, per-tensor FP8…) raises
    ``CheckpointError`` naming the method: its tensors are not weights this loader can read."""
    q = config_dict.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise CheckpointError(f"{path}: quantization_config: {q!r} is not an object, so how the checkpoint is "
                              f"quantized cannot be read; {_UNQUANTIZED_FIX}")
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(
            f"{path}: quantization_config: the checkpoint is quantized with quant_method={method!r}, which "
            f"this project cannot read (it reads unquantized weights and block-FP8); {_UNQUANTIZED_FIX}")

    def refuse(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: quantization_config.{field}: {why}; only block-FP8 with dynamic "
                               f"activation scales is supported: {_UNQUANTIZED_FIX}")

    block = q.get("weight_block_size")
    if block is None:
        raise CheckpointError(f"{path}: quantization_config.weight_block_size: missing, and the FP8 scales "
                              f"cannot be placed without it; add the release's block size (the DeepSeek and "
                              f"Qwen3 FP8 releases use [128, 128])")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise refuse("weight_block_size", f"{block!r} is not two positive integers [rows, columns]")
    fmt = q.get("fmt", "e4m3")
    if fmt not in _FP8_FORMATS:
        raise refuse("fmt", f"{fmt!r} is not one of {', '.join(_FP8_FORMATS)}")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise refuse("activation_scheme", f"{q['activation_scheme']!r} (static activation scales)")
    if q.get("expert_dtype", "fp8") != "fp8":
        raise refuse("expert_dtype", f"{q['expert_dtype']!r} experts")
    return BlockFP8((block[0], block[1]), _FP8_FORMATS[fmt])


def dequantize_block_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 weights [..., R, C] from float8 ``weight`` [..., R, C] and ``scale`` [..., ceil(R / br),
    ceil(C / bc)] (``block`` = (br, bc)): each value times the scale of its block; the last block of a row
    or a column is partial when br does not divide R or bc does not divide C."""
    rows, cols = weight.shape[-2:]
    per_value = (scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
                 .repeat_interleave(block[1], dim=-1)[..., :cols])
    return weight.float() * per_value


# -- HF names -------------------------------------------------------------------------------------
_DIRECT = {  # internal suffix -> HF suffix under model.layers.{l}.
    "attn_norm": "input_layernorm.weight",
    "o_proj": "self_attn.o_proj.weight",
    "o_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "moe_norm": "post_attention_layernorm.weight",
    "shared.gate": "mlp.shared_expert.gate_proj.weight",
    "shared.up": "mlp.shared_expert.up_proj.weight",
    "shared.down": "mlp.shared_expert.down_proj.weight",
    "shared.router": "mlp.shared_expert_gate.weight",
}
_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def _moe_prefix(family: str) -> str:
    return "block_sparse_moe" if family == "mixtral" else "mlp"


def _classic_expert_names(family: str, layer: int, expert: int) -> dict[str, str]:
    """HF names of one expert's gate, up and down projections in the per-expert layout."""
    p = f"model.layers.{layer}.{_moe_prefix(family)}.experts.{expert}."
    if family == "mixtral":
        return {"gate": p + "w1.weight", "up": p + "w3.weight", "down": p + "w2.weight"}
    return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight", "down": p + "down_proj.weight"}


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def _first_absent(held: set[int], count: int) -> int | None:
    """The smallest of 0..count-1 not in ``held``, or None; O(len(held)) however large ``count`` is."""
    first = next(i for i in range(len(held) + 1) if i not in held)
    return first if first < count else None


def _to_internal(cfg: MoEConfig, names: set[str], get: Callable[[str], torch.Tensor],
                 where: Callable[[str], str], fp8: BlockFP8 | None = None) -> dict[str, torch.Tensor]:
    """Build the internal tensors from HF-named ones. ``get(name)`` returns a tensor, ``where(name)``
    says which file should hold it (for errors). Shapes and dtypes are checked against ``cfg``; float8
    weights are dequantized (to float32) when ``fp8`` says how they are stored; every one of ``names``
    must be used (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def missing(hf_name: str, what: str) -> CheckpointError:
        tie = (" (if lm_head shares the embedding matrix, set tie_word_embeddings to true)"
               if hf_name == _TOP["lm_head"] else "")
        return CheckpointError(
            f"{where(hf_name)}: tensor {hf_name!r} ({what}) is missing; the checkpoint is incomplete or "
            f"not a {cfg.family} model matching its config.json{tie}: re-export it with save_pretrained")

    def bad_dtype(hf_name: str, t: torch.Tensor) -> CheckpointError:
        is_fp8 = t.dtype.is_floating_point and t.dtype.itemsize == 1
        if is_fp8 and fp8 is None:
            fix = ("config.json has no quantization_config: add the release's block-FP8 quantization_config "
                   "(quant_method 'fp8', weight_block_size), or re-export the weights unquantized")
        elif is_fp8 and t.dim() >= 2:
            fix = f"quantization_config.fmt says {fp8.dtype}: set fmt to the weights' format"
        elif is_fp8:
            fix = "only projection matrices are block-quantized: the checkpoint is damaged; download it again"
        else:
            fix = ("weights must be float16, bfloat16, float32 or float64 (or block-FP8 with its "
                   "quantization_config): re-export the checkpoint with save_pretrained")
        return CheckpointError(f"{where(hf_name)}: tensor {hf_name!r} is stored as {t.dtype}; {fix}")

    def dequantized(hf_name: str, weight: torch.Tensor) -> torch.Tensor:
        scale_name = hf_name + FP8_SCALE_SUFFIX
        if scale_name not in names:
            raise CheckpointError(f"{where(hf_name)}: tensor {hf_name!r} is {weight.dtype} but its block scales "
                                  f"{scale_name!r} are missing; the checkpoint is incomplete: download it again")
        used.add(scale_name)
        scale = get(scale_name)
        (rows, cols), (br, bc) = weight.shape[-2:], fp8.block
        want = (*weight.shape[:-2], -(-rows // br), -(-cols // bc))
        if tuple(scale.shape) != want:
            raise CheckpointError(
                f"{where(scale_name)}: tensor {scale_name!r} has shape {tuple(scale.shape)}, but {hf_name!r} "
                f"{tuple(weight.shape)} in blocks of {br} x {bc} needs {want}; quantization_config."
                f"weight_block_size and the weights disagree: use the config.json released with these weights")
        if scale.dtype not in _SCALE_DTYPES or not torch.isfinite(scale.float()).all():
            raise CheckpointError(f"{where(scale_name)}: tensor {scale_name!r} ({scale.dtype}) holds values "
                                  f"that are not finite float scales; the file is damaged: download it again")
        return dequantize_block_fp8(weight, scale, fp8.block)

    def fetch(hf_name: str, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        if hf_name not in names:
            raise missing(hf_name, what)
        used.add(hf_name)
        t = get(hf_name)
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where(hf_name)}: tensor {hf_name!r} has shape {tuple(t.shape)}, but config.json implies "
                f"{shape}; the config and the weights disagree: use the config.json saved with these weights")
        if t.dtype in _WEIGHT_DTYPES:
            return t
        if fp8 is not None and t.dtype == fp8.dtype and t.dim() >= 2:
            return dequantized(hf_name, t)
        raise bad_dtype(hf_name, t)

    # The layer count comes from config.json: the first layer the weights lack is named before anything
    # loops over the count (a config that claims 10**12 layers fails at once). The expert count needs no
    # such check: the router's shape [E, H] is checked before any loop over experts.
    layers_held = {int(m[1]) for m in map(_LAYER_NAME.match, names) if m}
    if (l := _first_absent(layers_held, cfg.num_layers)) is not None:
        raise missing(f"model.layers.{l}.{_DIRECT['attn_norm']}", f"layer {l}: the config has {cfg.num_layers}")
    shapes = cfg.expected_shapes()
    for key, hf_name in _TOP.items():
        if key in shapes:
            out[key] = fetch(hf_name, key, shapes[key])
    H, I, E = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts
    for l in range(cfg.num_layers):
        p, hp = f"layers.{l}.", f"model.layers.{l}."
        for suffix, hf_suffix in _DIRECT.items():
            if p + suffix in shapes:
                out[p + suffix] = fetch(hp + hf_suffix, suffix, shapes[p + suffix])
        q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        rows = {"q": q_rows, "k": kv_rows, "v": kv_rows}
        out[p + "qkv"] = torch.cat([fetch(f"{hp}self_attn.{n}_proj.weight", f"{n}_proj", (r, H))
                                    for n, r in rows.items()])
        if cfg.qkv_bias:
            out[p + "qkv_bias"] = torch.cat([fetch(f"{hp}self_attn.{n}_proj.bias", f"{n}_proj bias", (r,))
                                             for n, r in rows.items()])
        router = f"{hp}{_moe_prefix(cfg.family)}.gate.weight"
        if router not in names and f"{hp}mlp.gate.weight" in names:   # transformers 5.x renaming
            router = f"{hp}mlp.gate.weight"
        out[p + "router"] = fetch(router, "router", (E, H))
        fused = f"{hp}mlp.experts.gate_up_proj"
        if fused in names:
            gate_up = fetch(fused, "fused experts gate and up", (E, 2 * I, H))
            out[p + "experts.gate"], out[p + "experts.up"] = gate_up[:, :I], gate_up[:, I:]
            out[p + "experts.down"] = fetch(f"{hp}mlp.experts.down_proj", "fused experts down", (E, H, I))
        else:
            per_expert = [_classic_expert_names(cfg.family, l, j) for j in range(E)]
            for part, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                out[p + "experts." + part] = torch.stack(
                    [fetch(n[part], f"expert {j} {part} projection", shape) for j, n in enumerate(per_expert)])

    head = _TOP["lm_head"]
    if cfg.tie_word_embeddings and head in names:
        # save_pretrained drops a tied head, but a state_dict() keeps it: harmless when it is the embedding
        if not torch.equal(fetch(head, "lm_head", shapes["embed"]).float(), out["embed"].float()):
            raise CheckpointError(f"{where(head)}: tensor {head!r} differs from {_TOP['embed']!r}, but config.json "
                                  f"sets tie_word_embeddings; set tie_word_embeddings to false")
    unused = sorted(names - used)
    if unused:
        first, more = unused[0], f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        scaled = first.removesuffix(FP8_SCALE_SUFFIX)
        if scaled != first and scaled in used:
            raise CheckpointError(f"{where(first)}: tensor {first!r}{more} scales {scaled!r}, which is not stored "
                                  f"as float8; the checkpoint mixes quantized and unquantized weights: download it "
                                  f"again or re-export it")
        raise CheckpointError(
            f"{where(first)}: tensor {first!r}{more} is not part of a {cfg.family} model of {cfg.num_layers} "
            f"layers x {cfg.num_experts} experts as config.json describes it; the config and the weights "
            f"disagree: use the config.json saved with these weights")
    return out


# -- load ------------------------------------------------------------------------------------------
def read_config(path: str | Path) -> tuple[MoEConfig, dict]:
    """The checkpoint folder ``path``'s ``config.json``, mapped and as read (the dict)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist; pass the folder that holds "
                              f"{CONFIG_NAME} and {SAFE_WEIGHTS_NAME}")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a Hugging Face checkpoint folder needs its config.json "
                              f"(save the model with save_pretrained)")
    try:
        config_dict = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err}); re-save the config") from err
    return MoEConfig.from_hf(config_dict, config_path), config_dict


def _open(file: Path):
    """A safetensors handle on ``file``; a file whose header or data is cut short or damaged is an error."""
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err}); it is truncated or damaged, "
                              f"as an interrupted download leaves it: download this file again") from err


def _no_weights(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME} found; save the model "
                           f"with save_pretrained(safe_serialization=True)")


def check_weight_headers(path: Path) -> None:
    """Check, cheaply and before anything loads, that the checkpoint folder ``path`` has weights to load and that
    every ``*.safetensors`` file in it has a readable header. Returns None; raises ``CheckpointError`` (with the
    message ``load_checkpoint`` gives) when the folder has neither model.safetensors nor its index, or when a
    weight file's header cannot be read (cut short or damaged, as an interrupted download leaves it). Only
    headers are read: the tensors, the index's entries and the shards it names are checked when
    ``load_checkpoint`` reads them."""
    path = Path(path)
    if not (path / SAFE_WEIGHTS_NAME).is_file() and not (path / SAFE_INDEX_NAME).is_file():
        raise _no_weights(path)
    for file in sorted(path.glob("*.safetensors")):
        with _open(file):
            pass


def _weight_files(path: Path) -> tuple[dict[str, Path], Path, dict[Path, object]]:
    """HF tensor name -> the safetensors file holding it; the file that lists the tensors; and an open
    handle per file. Every file is opened (its header read and checked against its size), and every
    tensor an index lists must be in the shard it names."""
    single, index = path / SAFE_WEIGHTS_NAME, path / SAFE_INDEX_NAME
    if single.is_file():
        handle = _open(single)
        return {name: single for name in handle.keys()}, single, {single: handle}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: no valid weight_map ({err!r}); re-save the checkpoint") from err
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map is not an object of tensor name -> shard file name; "
                                  f"re-save the checkpoint")
        files = {name: path / shard for name, shard in weight_map.items()}
        handles = {}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {index.name} is missing; download or copy "
                                      f"every shard of the checkpoint")
            handles[shard] = _open(shard)
        held = {shard: set(handle.keys()) for shard, handle in handles.items()}
        for name, shard in files.items():
            if name not in held[shard]:
                elsewhere = [s.name for s, names in held.items() if name in names]
                found = f" (it is in {elsewhere[0]})" if elsewhere else ""
                raise CheckpointError(
                    f"{index}: maps tensor {name!r} to {shard.name}, which does not hold it{found}; the index "
                    f"and the shards come from different saves: download the index and every shard again")
        return files, index, handles
    pickles = [n for n in PICKLE_NAMES if (path / n).exists()] + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{path / pickles[0]}: pickle checkpoints are refused (loading one can run arbitrary code); "
            f"convert it once in a trusted environment: "
            f"`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)`")
    raise _no_weights(path)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[MoEConfig, dict[str, torch.Tensor]]:
    """Read ``config.json`` and the safetensors weights of ``path``; return the config and the internal
    tensors (on the CPU, in ``dtype``), every one checked for presence, shape and dtype, block-FP8 weights
    dequantized. Every problem with the folder raises ``CheckpointError`` naming the file, the tensor or
    field, and the fix."""
    path = Path(path)
    cfg, config_dict = read_config(path)
    fp8 = weight_quantization(config_dict, path / CONFIG_NAME)
    files, listing, handles = _weight_files(path)

    def get(name: str) -> torch.Tensor:
        try:
            return handles[files[name]].get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"{files[name]}: tensor {name!r} cannot be read ({err}); the file is damaged: "
                                  f"download it again") from err

    try:
        raw = _to_internal(cfg, set(files), get, lambda name: str(files.get(name, listing)), fp8)
    finally:
        handles.clear()
    return cfg, {name: t.to(dtype).contiguous() for name, t in raw.items()}


# -- save ------------------------------------------------------------------------------------------
def _from_internal(cfg: MoEConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal tensors -> HF names in the classic per-expert layout of ``cfg.family``."""
    shapes = cfg.expected_shapes()
    out = {hf: tensors[key] for key, hf in _TOP.items() if key in shapes}
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for l in range(cfg.num_layers):
        p, hp = f"layers.{l}.", f"model.layers.{l}."
        for suffix, hf_suffix in _DIRECT.items():
            if p + suffix in tensors:
                out[hp + hf_suffix] = tensors[p + suffix]
        for kind, fmt in (("qkv", "self_attn.{}_proj.weight"), ("qkv_bias", "self_attn.{}_proj.bias")):
            if p + kind in tensors:
                q, k, v = tensors[p + kind].split([q_rows, kv_rows, kv_rows])
                for n, t in zip("qkv", (q, k, v)):
                    out[hp + fmt.format(n)] = t
        out[f"{hp}{_moe_prefix(cfg.family)}.gate.weight"] = tensors[p + "router"]
        for j in range(cfg.num_experts):
            for part, hf_name in _classic_expert_names(cfg.family, l, j).items():
                out[hf_name] = tensors[p + "experts." + part][j]
    # clone: safetensors refuses tensors that share storage (the experts are views of one stack)
    return {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for name, t in out.items()}


def save_checkpoint(config_hf_dict: Mapping, tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``path`` (each file replaced atomically) in the
    classic per-expert layout of the config's family, unquantized (a block-FP8 config's
    ``quantization_config`` is dropped: the weights written are the dequantized ones). ``tensors`` may be
    HF-named (a transformers ``state_dict()``, fused or per-expert, or block-FP8 as the config says) or
    use the internal names ``load_checkpoint`` returns."""
    path = Path(path)
    cfg = MoEConfig.from_hf(config_hf_dict, path / CONFIG_NAME)
    fp8 = weight_quantization(config_hf_dict, path / CONFIG_NAME)
    if "embed" in tensors:
        internal = dict(tensors)
        for name, shape in cfg.expected_shapes().items():
            if name not in internal or tuple(internal[name].shape) != shape:
                got = tuple(internal[name].shape) if name in internal else "missing"
                raise CheckpointError(f"save_checkpoint({path}): tensor {name!r} is {got}, the config needs "
                                      f"{shape}; pass the tensors load_checkpoint returned for this config")
    else:
        internal = _to_internal(cfg, set(tensors), lambda n: tensors[n], lambda n: "tensors to save", fp8)
    hf = _from_internal(cfg, internal)
    config = {k: v for k, v in config_hf_dict.items() if k != "quantization_config"}
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / SAFE_WEIGHTS_NAME, lambda f: f.write(save(hf, metadata={"format": "pt"})), binary=True)
    atomic_write(path / CONFIG_NAME, lambda f: f.write(json.dumps(config, indent=2, sort_keys=True) + "\n"))
