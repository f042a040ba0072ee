"""Run configurations: one resolved ``RunConfig`` is one results row; a ``SweepSpec`` is a grid of them.

Units are in the field names. Values are typed here, once, where they enter (``experiments.overrides``
turns text into these types); ``experiments.runner.validate_grid`` checks them against the trace,
the hardware profiles and the policy registry before any run starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

# param_text and policy_label are defined below validation/, which labels configurations as the sweep does;
# the commands import them from here too.
from policies.registry import POLICY_PARAM_PREFIX, param_text, policy_label  # noqa: F401
from traces import DEFAULT_TRACE


class ConfigError(ValueError):
    """A configuration the sweep refuses before running anything; the message names the key and the fix."""


def typed_params(params) -> tuple[tuple[str, type, Any], ...]:
    """Policy parameters ((name, value) pairs) as a key that tells values of different types apart: Python
    holds ``True == 1`` and ``1 == 1.0``, but a policy may not (it may refuse 1 for a flag), and a row's key
    (its JSON: true, 1, 1.0) does not."""
    return tuple((name, type(value), value) for name, value in params)


@dataclass(frozen=True, eq=False)
class RunConfig:
    trace: str = str(DEFAULT_TRACE)
    policy: str = "lru"
    cache_slots: int = 4                  # expert slots per MoE layer (global mode: the same total, shared)
    cache_mode: str = "per_layer"         # "per_layer" | "global"
    precision: str = "bf16"
    hardware: str = "h100-pcie5"          # profile name (hardware/profiles) or a YAML path
    pcie_GBps: float | None = None        # None: the profile's measured link; a number: a constant link
    copy_latency_us: float | None = None
    copy_engines: int | None = None
    prefetch_depth: int = 1
    train_fraction: float = 0.25          # leading requests that train static/affinity; the rest are replayed
    max_tokens: int | None = None         # replay whole requests until at least this many tokens
    prompt_tokens: int = 0
    copies_in_flight: int | None = 2      # the engine's copy window (RunSettings); None: the ideal link
    sim_path: str = "auto"                # "auto": the exact fast path where one exists; "reference": SimPy
    policy_params: tuple[tuple[str, Any], ...] = ()   # from ``policy.NAME=value`` keys, sorted by name

    def to_dict(self) -> dict[str, Any]:
        """The resolved values, JSON-ready; ``policy_params`` as a dict."""
        out = dataclasses.asdict(self)
        out["policy_params"] = dict(self.policy_params)
        return out

    def _identity(self) -> tuple:
        return (*(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "policy_params"),
                typed_params(self.policy_params))

    # Equal when the rows' keys are: policy parameters compare with their types (``typed_params``).
    def __eq__(self, other: object) -> bool:
        return self._identity() == other._identity() if isinstance(other, RunConfig) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._identity())

    def hardware_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HARDWARE_OVERRIDES if getattr(self, k) is not None}


HARDWARE_OVERRIDES = ("pcie_GBps", "copy_latency_us", "copy_engines")


def _field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (scalar type, accepts None), from the annotations."""
    hints = typing.get_type_hints(RunConfig)
    out = {}
    for f in dataclasses.fields(RunConfig):
        if f.name == "policy_params":
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) in (Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            out[f.name] = (args[0], True)
        else:
            out[f.name] = (hint, False)
    return out


FIELD_TYPES: dict[str, tuple[type, bool]] = _field_types()
SWEEP_KEYS: tuple[str, ...] = tuple(FIELD_TYPES)


def valid_keys_text() -> str:
    return f"{', '.join(SWEEP_KEYS)}, or {POLICY_PARAM_PREFIX}NAME for a policy parameter"


def check_key(key: str) -> None:
    if key in FIELD_TYPES:
        return
    if key.startswith(POLICY_PARAM_PREFIX) and len(key) > len(POLICY_PARAM_PREFIX):
        return
    raise ConfigError(f"unknown key {key!r}; valid keys: {valid_keys_text()}")


# Keys whose value may be a path (a policy's FILE.py:Class, a hardware profile's YAML): ~ is the home folder.
_PATH_KEYS = ("trace", "policy", "hardware")
# A field's type as the value to give it is named in a message.
_KIND_TEXT = {int: "an integer", float: "a number", str: "a string"}


def coerce(key: str, value: Any) -> Any:
    """A Python value (from YAML or a parsed token) as the type of field ``key``."""
    if key.startswith(POLICY_PARAM_PREFIX):
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"{key}: a policy parameter must be a scalar, got {value!r}")
        return value
    kind, nullable = FIELD_TYPES[key]
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{key}: null is not allowed; give {_KIND_TEXT[kind]}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, str):
        # A shell expands ~ in a word's start only: zsh and sh leave trace=~/t.npz as it is, and so does YAML.
        return os.path.expanduser(value) if key in _PATH_KEYS else value
    raise ConfigError(f"{key}: expected a string, got {value!r}")


# Axes are iterated in this order, the first outermost, so the grid is policy-major.
_AXIS_ORDER = ("policy", "cache_slots")


@dataclass(frozen=True)
class SweepSpec:
    """Key -> the values to sweep; the grid is their cartesian product."""

    axes: tuple[tuple[str, tuple[Any, ...]], ...]

    @classmethod
    def from_mapping(cls, mapping: dict[str, list[Any]]) -> SweepSpec:
        axes = []
        for key, values in mapping.items():
            check_key(key)
            typed = [coerce(key, v) for v in values]
            if not typed:
                raise ConfigError(f"{key}: an empty list of values; give at least one")
            # A repeated value would repeat configurations; true and 1 are two values (typed_params).
            unique = [v for _, v in dict.fromkeys((type(v), v) for v in typed)]
            axes.append((key, tuple(unique)))
        rank = {k: i for i, k in enumerate((*_AXIS_ORDER, *SWEEP_KEYS))}
        axes.sort(key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
        return cls(tuple(axes))

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self.axes}

    def varying(self) -> list[str]:
        """Keys with more than one value."""
        return [k for k, v in self.axes if len(v) > 1]

    def short_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:10]

    def grid(self) -> list[RunConfig]:
        keys = [k for k, _ in self.axes]
        configs = []
        for combo in itertools.product(*(v for _, v in self.axes)):
            fields, params = {}, {}
            for key, value in zip(keys, combo):
                if key.startswith(POLICY_PARAM_PREFIX):
                    params[key[len(POLICY_PARAM_PREFIX):]] = value
                else:
                    fields[key] = value
            configs.append(RunConfig(**fields, policy_params=tuple(sorted(params.items()))))
        return configs

