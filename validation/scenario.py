"""The validation grid as a YAML scenario of named slices.

A slice is one model measured one way: ``replay`` (a named shape with random weights, routing forced from a
recorded trace: needs no training) or ``live`` (a checkpoint, or random weights of a shape, routing
itself on held-out text). Each slice lists its policies and cache sizes; the grid is their product. A
device call runs one or more slices (``--slices``), so a grid larger than one call is measured over
several, and a finished configuration is never measured again (``validation.store``).

    repeats: 5                     # interleaved repeats per configuration (real.measurement)
    slices:
      gpt-oss-20b:
        mode: replay
        shape: gpt-oss-20b         # traces/shapes/<name>.yaml or a YAML path
        trace: traces/samples/gpt-oss-20b-sample.npz
        max_tokens: 24             # replayed tokens per run (whole requests after the training slice)
        policies: [lru, belady, oracle, affinity]
        cache_slots: [4, 8, 16]
      mixtral-8x7b:
        mode: replay
        shape: mixtral-8x7b
        layers: 8                  # the first 8 layers (host memory); the trace's first 8 layers route them
        trace: traces/moe-lm-h100.npz
        ...

Every field is checked before anything runs; ``ScenarioError`` names the file, the slice and the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hardware.profile import HardwareProfileError, load_hardware
from offload.predictors import predictor_name
from offload.session import RunSettings, SettingsError
from offload.policy import check_params
from policies.registry import PolicyLoadError, resolve_policy
from traces import ModelShape, load_shape
from traces.model_shape import PRECISION_BITS
from traces.yaml_unique import safe_load_unique

MODES = ("replay", "live")
ROOT = Path(__file__).resolve().parents[1]
SCENARIOS_DIR = ROOT / "experiments" / "configs"
_PATH_FIELDS = ("shape", "trace", "model", "corpus", "gate")


def _resolve(path: str, base: Path) -> str:
    """A scenario's relative path: as given when it exists from the working directory, else from the
    scenario file's folder, else from the repository root (the built-in scenarios name repository files);
    unchanged when none exists (the check then names it)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    for root in (base, ROOT):
        if (root / p).exists():
            return str(root / p)
    return path


class ScenarioError(ValueError):
    """A validation scenario that cannot run; the message names the file, slice and field, and the fix."""


@dataclass(frozen=True)
class Slice:
    """One model of the grid. ``shape``: a shape name or YAML path (replay; for live, the random-weight
    model's shape when ``model`` is ``random``); ``layers``: keep the first N layers of the shape and the
    trace (None: all); ``trace``: the routing replayed (replay) — its leading ``train_fraction`` of requests
    is the slice ``static`` and ``affinity`` learn from in both clocks; ``model``: a checkpoint directory
    or ``random`` (live); ``corpus``: the text a live model's prompts come from (None: random token ids);
    ``prompts``, ``prompt_len``, ``new_tokens``: a live run's held-out requests; ``max_tokens``: replayed
    tokens per run; ``warmup_tokens``: per warm-up pass; ``precision``, ``prefetch_depth``: as RunSettings;
    ``gate``: a trained lookahead gate's directory (``experiments.train_gate``) for a live slice's
    ``lookahead`` policy; ``shape_name``: the name the shape goes by in the profile (a random-weight replay
    of a trained model's shape must not take the trained model's own entry)."""
    name: str
    mode: str
    policies: tuple[str, ...]
    cache_slots: tuple[int, ...]
    shape: str | None = None
    layers: int | None = None
    trace: str | None = None
    train_fraction: float = 0.25
    model: str | None = None
    corpus: str | None = None
    prompts: int = 2
    prompt_len: int = 16
    new_tokens: int = 32
    train_prompts: int = 2
    max_tokens: int = 48
    warmup_tokens: int = 16
    precision: str = "bf16"
    prefetch_depth: int = 1
    gate: str | None = None
    shape_name: str | None = None
    # per policy of ``policies``, the parameters it is given (``Policy.parameters``; as the sweep's policy.NAME)
    policy_params: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def params_of(self, policy: str | None) -> dict[str, Any]:
        return dict(dict(self.policy_params).get(policy, ()))

    def model_shape(self) -> ModelShape:
        """The slice's shape (a replay's or a random live model's; a replay without one: its trace's own),
        cut to ``layers``."""
        if self.shape is None:
            from traces import load_trace
            shape = load_trace(self.trace).model
        else:
            shape = load_shape(self.shape)
        if self.layers is not None and self.layers != shape.num_layers:
            shape = dataclasses.replace(shape, name=f"{shape.name}-{self.layers}l", num_layers=self.layers)
        if self.shape_name:
            shape = dataclasses.replace(shape, name=self.shape_name)
        return shape

    def settings(self, slots: int, policy: str | None = None) -> RunSettings:
        """The runs' settings at ``slots``, with ``policy``'s parameters (``policy_params``) when it is given."""
        return RunSettings(cache_slots=slots, precision=self.precision, prefetch_depth=self.prefetch_depth,
                           policy_params=self.params_of(policy))


@dataclass(frozen=True)
class Scenario:
    path: str
    repeats: int
    slices: tuple[Slice, ...]
    hardware: str = "h100-pcie5"     # the base profile: constants the calibration does not measure
    deadline_s: float | None = None   # stop starting rounds after this many seconds (a device call's limit)
    extra: dict = field(default_factory=dict)

    def select(self, names: list[str] | None) -> tuple[Slice, ...]:
        if not names:
            return self.slices
        known = {s.name: s for s in self.slices}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ScenarioError(f"{self.path}: no slice {unknown}; slices: {list(known)}")
        return tuple(known[n] for n in names)


_SLICE_FIELDS = {f.name: f for f in dataclasses.fields(Slice) if f.name != "name"}
_TOP = {"repeats", "slices", "hardware", "deadline_s", "description"}


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file (module docstring). A bare name is looked up in experiments/configs."""
    p = Path(path)
    if not p.exists() and not p.suffix:
        p = SCENARIOS_DIR / f"{path}.yaml"
    if not p.is_file():
        raise ScenarioError(f"scenario {path}: no such file (see experiments/configs/validate-*.yaml)")
    try:
        data = safe_load_unique(p.read_text())
    except yaml.YAMLError as e:
        raise ScenarioError(f"{p}: not valid YAML: {e}") from e
    return scenario_from_dict(data, str(p))


def scenario_from_dict(data: Any, origin: str) -> Scenario:
    def fail(msg: str) -> ScenarioError:
        return ScenarioError(f"{origin}: {msg}")

    if not isinstance(data, dict):
        raise fail("expected a mapping with 'slices' at the top level")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise fail(f"unknown key(s) {unknown}; valid: {sorted(_TOP)}")
    repeats = data.get("repeats", 5)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise fail(f"repeats must be an integer >= 1, got {repeats!r}")
    deadline = data.get("deadline_s")
    # as --deadline-s (real.bench.args.positive_float): not > 0 refuses NaN too, which no comparison stops at
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not deadline > 0):
        raise fail(f"deadline_s must be a positive number of seconds, got {deadline!r}")
    raw = data.get("slices")
    if not isinstance(raw, dict) or not raw:
        raise fail("'slices' must map slice names to their settings (at least one)")
    base = Path(origin).resolve().parent
    slices = tuple(_slice(name, body, fail, base) for name, body in raw.items())
    hardware = str(data.get("hardware", "h100-pcie5"))
    try:        # the base profile is read after the calibration: a bad one is refused before it
        load_hardware(hardware)
    except HardwareProfileError as e:
        raise fail(f"hardware: {e}") from None
    return Scenario(origin, repeats, slices, hardware, None if deadline is None else float(deadline))


def _slice(name: Any, body: Any, fail, base: Path = Path(".")) -> Slice:
    where = f"slice {name!r}"
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise fail(f"{where}: a slice name is letters, digits, '-' and '_'")
    if not isinstance(body, dict):
        raise fail(f"{where}: expected a mapping of {sorted(_SLICE_FIELDS)}")
    unknown = sorted(set(body) - set(_SLICE_FIELDS))
    if unknown:
        raise fail(f"{where}: unknown field(s) {unknown}; valid: {sorted(_SLICE_FIELDS)}")
    values: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("policies", "cache_slots"):
            value = tuple(value) if isinstance(value, list) else (value,)
        if key in _PATH_FIELDS and isinstance(value, str) and value != "random" and ("/" in value or value.endswith(
                (".yaml", ".yml", ".npz"))):
            value = _resolve(value, base)
        if key == "policies":
            value = tuple(_resolve(v, base) if isinstance(v, str) and ".py:" in v else v for v in value)
        if key == "policy_params":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise fail(f"{where}: policy_params maps a policy of 'policies' to its parameters, e.g. "
                           f"{{oracle: {{cross_tokens: false}}}}; got {value!r}")
            value = tuple((_resolve(k, base) if isinstance(k, str) and ".py:" in k else str(k),
                           tuple(sorted((str(n), v) for n, v in params.items()))) for k, params in value.items())
        values[key] = value
    for key in ("mode", "policies", "cache_slots"):
        if key not in values:
            raise fail(f"{where}: missing '{key}'")
    s = Slice(name=name, **values)
    if not s.policies or not s.cache_slots:
        raise fail(f"{where}: 'policies' and 'cache_slots' need at least one entry each")
    for key in ("policies", "cache_slots"):      # a repeat would be measured and counted twice
        repeated = sorted({str(v) for v in getattr(s, key) if getattr(s, key).count(v) > 1})
        if repeated:
            raise fail(f"{where}: {key} lists {', '.join(repeated)} more than once; give each once")
    if s.mode not in MODES:
        raise fail(f"{where}: mode {s.mode!r}; use one of {list(MODES)}")
    for key in ("prompts", "prompt_len", "new_tokens", "train_prompts", "max_tokens", "warmup_tokens",
                "prefetch_depth"):
        v = getattr(s, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise fail(f"{where}: {key} must be an integer >= 1, got {v!r}")
    if s.layers is not None and (isinstance(s.layers, bool) or not isinstance(s.layers, int) or s.layers < 1):
        raise fail(f"{where}: layers must be an integer >= 1 or absent, got {s.layers!r}")
    if not (isinstance(s.train_fraction, (int, float)) and 0 < s.train_fraction < 1):
        raise fail(f"{where}: train_fraction must be in (0, 1), got {s.train_fraction!r}")
    if s.precision not in PRECISION_BITS:
        raise fail(f"{where}: precision {s.precision!r}; use one of {sorted(PRECISION_BITS)}")
    if s.mode == "replay" and not s.trace:
        raise fail(f"{where}: a replay slice needs 'trace' (and 'shape', unless the trace's own)")
    if s.mode == "live" and not s.model:
        raise fail(f"{where}: a live slice needs 'model' (a checkpoint directory, or 'random' with 'shape')")
    if s.mode == "live" and s.model == "random" and not s.shape:
        raise fail(f"{where}: model 'random' needs 'shape'")
    if s.trace is not None and not Path(s.trace).is_file():
        raise fail(f"{where}: trace {s.trace} does not exist")
    shape = None
    if s.shape is not None or s.mode == "replay":
        try:
            full = dataclasses.replace(s, layers=None).model_shape()
            shape = s.model_shape()
        except (ValueError, OSError) as e:
            raise fail(f"{where}: shape: {e}") from e
        if s.layers is not None and s.layers > full.num_layers:
            raise fail(f"{where}: layers {s.layers} > the shape's {full.num_layers}")
    strays = sorted(set(dict(s.policy_params)) - set(s.policies))
    if strays:
        raise fail(f"{where}: policy_params names {strays}, not among its policies {list(s.policies)}")
    for policy in s.policies:
        try:
            cls = resolve_policy(str(policy))
        except PolicyLoadError as e:
            raise fail(f"{where}: {e}") from e
        params = s.params_of(policy)
        try:
            check_params(cls, params)
        except ValueError as e:
            raise fail(f"{where}: policy_params of {policy}: {e}") from e
        needs = predictor_name(cls, params)
        if s.mode == "replay" and needs is not None:
            raise fail(f"{where}: policy {policy} consults the live predictor '{needs}', which a replay of forced "
                       f"routing does not have (no hidden states); measure it in a live slice")
    for slots in s.cache_slots:
        try:
            settings = s.settings(slots)
            for policy in s.policies:
                s.settings(slots, policy)
        except SettingsError as e:
            raise fail(f"{where}: cache_slots {slots!r}: {e}") from e
        if shape is not None and not shape.top_k <= settings.cache_slots <= shape.num_experts:
            raise fail(f"{where}: cache_slots {slots} outside [{shape.top_k}, {shape.num_experts}] "
                       f"(top-k .. experts per layer of {shape.name})")
    return s
