"""Hugging Face-format MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the config mapped to one
frozen ``MoEConfig``, the safetensors weights checked against it and renamed to the compact names
``real.model.MoEModel`` reads. Pickle checkpoints are refused: loading one runs arbitrary code.

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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
        """Map a Hugging Face ``config.json`` (as a dict); ``path`` only names the file in errors."""
        c = dict(config_dict)

        def bad(field: str, why: str, fix: str) -> CheckpointError:
            return CheckpointError(f"{path}: {field}: {why}; {fix}")

        def need(field: str):
            if c.get(field) is None:
                raise bad(field, "missing", f"add `{field}` to the config (see transformers' {family} config)")
            return c[field]

        family = c.get("model_type")
        if family not in SUPPORTED_MODEL_TYPES:
            raise bad("model_type", f"{family!r} is not supported",
                      f"use a checkpoint of one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        if c.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"{c['hidden_act']!r} is not supported", "only SwiGLU (silu) experts are")

        hidden, layers, heads = int(need("hidden_size")), int(need("num_hidden_layers")), int(need("num_attention_heads"))
        kv_heads = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or hidden // heads)

        # transformers' attribute_map aliases num_experts and num_local_experts; config.json may hold either
        experts = c.get("num_local_experts") if c.get("num_experts") is None else c["num_experts"]
        if experts is None:
            raise bad("num_experts", "missing", "add `num_experts` (or `num_local_experts`) to the config")
        experts = int(experts)
        intermediate = int(need("intermediate_size" if family in ("mixtral", "olmoe") else "moe_intermediate_size"))
        if family in ("qwen2_moe", "qwen3_moe"):
            step = int(c.get("decoder_sparse_step") or 1)
            dense = [l for l in range(layers)
                     if l in (c.get("mlp_only_layers") or []) or experts == 0 or (l + 1) % step != 0]
            if dense:
                raise bad("decoder_sparse_step/mlp_only_layers", f"layers {dense} are dense MLP layers",
                          "dense layers mixed with MoE layers are not supported yet")

        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise bad("rope_parameters", f"rope_type {rope_type!r} is not supported", "only default RoPE is")
        default_theta = 1e6 if family == "mixtral" else 1e4   # transformers' default_theta per family
        rope_theta = float(rope.get("rope_theta") or c.get("rope_theta") or default_theta)

        sliding_window = None
        if family == "mixtral":
            sliding_window = c.get("sliding_window")
        elif family in ("qwen2_moe", "qwen3_moe") and c.get("use_sliding_window"):
            if family == "qwen2_moe":
                raise bad("use_sliding_window", "qwen2_moe's per-layer sliding windows are not supported",
                          "set use_sliding_window to false if the model was trained without them")
            sliding_window = c.get("sliding_window")

        cfg = cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            expert_intermediate_size=intermediate,
            num_layers=layers,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            num_experts=experts,
            top_k=int(need("num_experts_per_tok")),
            norm_topk_prob=True if family == "mixtral" else bool(c.get("norm_topk_prob", False)),
            rope_theta=rope_theta,
            rms_norm_eps=float(c.get("rms_norm_eps") or (1e-5 if family in ("mixtral", "olmoe") else 1e-6)),
            qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(family, "none"),
            shared_expert_intermediate_size=(int(need("shared_expert_intermediate_size"))
                                             if family == "qwen2_moe" else 0),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_position_embeddings=int(c.get("max_position_embeddings") or 4096),
            qkv_bias=bool(c.get("qkv_bias", True)) if family == "qwen2_moe" else bool(c.get("attention_bias", False)),
            o_bias=family in ("qwen3_moe", "olmoe") and bool(c.get("attention_bias", False)),
            clip_qkv=float(c["clip_qkv"]) if family == "olmoe" and c.get("clip_qkv") is not None else None,
            sliding_window=int(sliding_window) if sliding_window else None,
        )
        if heads % kv_heads:
            raise bad("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}",
                      "fix the config")
        if not 0 < cfg.top_k <= experts:
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


def _to_internal(cfg: MoEConfig, names: set[str], get: Callable[[str], torch.Tensor],
                 where: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Build the internal tensors from HF-named ones. ``get(name)`` returns a tensor, ``where(name)``
    says which file should hold it (for errors). Shapes are checked against ``cfg``."""
    shapes = cfg.expected_shapes()
    out: dict[str, torch.Tensor] = {}

    def missing(hf_name: str, what: str) -> CheckpointError:
        return CheckpointError(
            f"{where(hf_name)}: tensor {hf_name!r} ({what}) is missing; the checkpoint is incomplete or "
            f"not a {cfg.family} model matching its config.json: re-export it with save_pretrained")

    def fetch(hf_name: str, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        if hf_name not in names:
            raise missing(hf_name, what)
        t = get(hf_name)
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{where(hf_name)}: tensor {hf_name!r} has shape {tuple(t.shape)}, but config.json implies "
                f"{shape}; the config and the weights disagree: use the config.json saved with these weights")
        return t

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
    return out


# -- load ------------------------------------------------------------------------------------------
def read_config(path: str | Path) -> tuple[MoEConfig, dict]:
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
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err}); re-save the config") from err
    return MoEConfig.from_hf(config_dict, config_path), config_dict


def _weight_files(path: Path) -> tuple[dict[str, Path], Path]:
    """HF tensor name -> the safetensors file holding it; and the file that lists the tensors."""
    single, index = path / SAFE_WEIGHTS_NAME, path / SAFE_INDEX_NAME
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}, single
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: no valid weight_map ({err}); re-save the checkpoint") from err
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {index.name} is missing; download or copy "
                                      f"every shard of the checkpoint")
        return files, index
    pickles = [n for n in PICKLE_NAMES if (path / n).exists()] + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{path / pickles[0]}: pickle checkpoints are refused (loading one can run arbitrary code); "
            f"convert it once in a trusted environment: "
            f"`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True)`")
    raise CheckpointError(f"{path}: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME} found; save the model "
                          f"with save_pretrained(safe_serialization=True)")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[MoEConfig, dict[str, torch.Tensor]]:
    """Read ``config.json`` and the safetensors weights of ``path``; return the config and the internal
    tensors (on the CPU, in ``dtype``), every one checked for presence and shape."""
    path = Path(path)
    cfg, _ = read_config(path)
    files, listing = _weight_files(path)
    handles = {}

    def get(name: str) -> torch.Tensor:
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file].get_tensor(name)

    try:
        raw = _to_internal(cfg, set(files), get, lambda name: str(files.get(name, listing)))
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


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(config_hf_dict: Mapping, tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``path`` (each file replaced atomically) in the
    classic per-expert layout of the config's family. ``tensors`` may be HF-named (a transformers
    ``state_dict()``, fused or per-expert) or use the internal names ``load_checkpoint`` returns."""
    path = Path(path)
    cfg = MoEConfig.from_hf(config_hf_dict, path / CONFIG_NAME)
    if "embed" in tensors:
        internal = dict(tensors)
        for name, shape in cfg.expected_shapes().items():
            if name not in internal or tuple(internal[name].shape) != shape:
                got = tuple(internal[name].shape) if name in internal else "missing"
                raise CheckpointError(f"save_checkpoint({path}): tensor {name!r} is {got}, the config needs "
                                      f"{shape}; pass the tensors load_checkpoint returned for this config")
    else:
        internal = _to_internal(cfg, set(tensors), lambda n: tensors[n], lambda n: "tensors to save")
    hf = _from_internal(cfg, internal)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path / SAFE_WEIGHTS_NAME, lambda p: save_file(hf, str(p), metadata={"format": "pt"}))
    _atomic_write_bytes(path / CONFIG_NAME,
                        lambda p: p.write_text(json.dumps(dict(config_hf_dict), indent=2, sort_keys=True) + "\n"))
