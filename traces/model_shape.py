"""Model shapes: the sizes that decide how many bytes an expert is and how big the KV cache grows."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from traces.yaml_unique import safe_load_unique

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"

# Bits per weight as stored. The 4/3/2-bit formats carry one fp16 scale (or scale + zero point)
# per group of 128 weights, which costs about 0.25 bit per weight on top of the payload.
PRECISION_BITS: dict[str, float] = {
    "fp32": 32,         # a float32 engine run (the CPU's default); no deployment keeps experts so
    "bf16": 16,
    "fp16": 16,
    "fp8": 8,
    "int8": 8,
    "mxfp4": 4.25,
    "int4": 4.25,
    "int3": 3.25,
    "int2": 2.25,
}

_INT_FIELDS = (
    "num_layers",
    "num_experts",
    "top_k",
    "hidden_size",
    "expert_intermediate_size",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
)


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int  # MoE layers
    num_experts: int  # experts per layer
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    # Explicit bytes per precision where the shipped checkpoint differs from params * bits / 8
    # (e.g. gpt-oss ships its experts in MXFP4 with its own block layout).
    expert_bytes_override: tuple[tuple[str, int], ...] = ()

    @property
    def expert_params(self) -> int:
        # gate, up and down projections
        return 3 * self.hidden_size * self.expert_intermediate_size

    def expert_bytes(self, precision: str) -> int:
        overrides = dict(self.expert_bytes_override)
        if precision in overrides:
            return overrides[precision]
        if precision not in PRECISION_BITS:
            raise ValueError(
                f"unknown precision {precision!r} for model {self.name}: "
                f"use one of {sorted(PRECISION_BITS)}"
            )
        return math.ceil(self.expert_params * PRECISION_BITS[precision] / 8)

    @property
    def attention_params(self) -> int:
        q_and_o = 2 * self.hidden_size * self.num_attention_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q_and_o + k_and_v

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV-cache bytes one token adds to one layer (keys and values)."""
        return 2 * self.num_kv_heads * self.head_dim * bytes_per_value

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["expert_bytes_override"]
        if self.expert_bytes_override:
            d["expert_bytes"] = dict(self.expert_bytes_override)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> ModelShape:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a model shape must be a mapping of field: value, got {type(d).__name__}")
        known = {"name", "expert_bytes", *_INT_FIELDS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}: remove them; valid fields are {sorted(known)}")
        missing = [f for f in ("name", *_INT_FIELDS) if f not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}: add them (positive integers, name a string)")
        if not isinstance(d["name"], str) or not d["name"]:
            raise ValueError(f"{source}: field 'name' must be a non-empty string, got {d['name']!r}")
        for f in _INT_FIELDS:
            v = d[f]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{source}: field {f!r} must be a positive integer, got {v!r}: fix it in the shape")
        if d["top_k"] > d["num_experts"]:
            raise ValueError(
                f"{source}: field 'top_k' ({d['top_k']}) exceeds num_experts ({d['num_experts']}): "
                "top_k must be <= num_experts"
            )
        overrides = d.get("expert_bytes") or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{source}: field 'expert_bytes' must map precision -> bytes, e.g. {{mxfp4: 13000000}}")
        for prec, nbytes in overrides.items():
            if prec not in PRECISION_BITS:
                raise ValueError(
                    f"{source}: field 'expert_bytes' has unknown precision {prec!r}: use one of {sorted(PRECISION_BITS)}"
                )
            if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
                raise ValueError(f"{source}: field 'expert_bytes.{prec}' must be a positive integer, got {nbytes!r}")
        return cls(
            name=d["name"],
            **{f: d[f] for f in _INT_FIELDS},
            expert_bytes_override=tuple(sorted(overrides.items())),
        )


def available_shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.yaml"))


def load_shape(name_or_path: str) -> ModelShape:
    """A bare name looks in traces/shapes/<name>.yaml; anything else is read as a path. Raises ValueError
    naming the file and the fix: not found, not valid YAML, not a mapping, a bad field."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and path.parent == Path("."):
        path = SHAPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown model shape {name_or_path!r}: use one of {available_shapes()} or a YAML path")
    elif not path.is_file():
        raise ValueError(f"{path}: model shape file not found: check the path")
    try:
        with open(path) as f:
            d = safe_load_unique(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model shape: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a model shape must be a mapping of field: value (see {SHAPES_DIR}), "
                         f"got {type(d).__name__}")
    return ModelShape.from_dict(d, source=str(path))
