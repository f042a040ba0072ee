"""Hardware profiles: the cost model the simulator's copy engine and compute stream read.

All simulated times are integer nanoseconds. A useful identity: 1 GB/s (1e9 bytes/s) moves one byte
per nanosecond, so ``bytes / GBps`` is a time in ns.

Profiles live as YAML in ``hardware/profiles/<name>.yaml``; units are in every field name. The host-to-
device copy cost is either a constant link (``pcie_GBps``) or a measured table of effective
bandwidth by copy size (``h2d_GBps_by_MiB``). Compute is analytic (weight bytes over HBM bandwidth
plus kernel launches) unless the profile holds a measured entry for the model and precision.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from traces.model_shape import PRECISION_BITS
from traces.yaml_unique import safe_load_unique

if TYPE_CHECKING:
    from traces.model_shape import ModelShape

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
MiB = 1 << 20


class HardwareProfileError(ValueError):
    """A hardware profile (YAML file, dict or override) that cannot be used; the message names the
    file or origin, the field and the fix."""


class CopyCost(Protocol):
    def copy_ns(self, nbytes: int) -> int:
        """Time of one host-to-device copy of ``nbytes``, integer ns, >= 1 for nbytes > 0."""
        ...


def _to_ns(t: float) -> int:
    return max(1, int(t + 0.5))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise HardwareProfileError(message)


@dataclass(frozen=True)
class ConstantCopyCost:
    """A link with a fixed per-copy latency and a size-independent bandwidth."""

    copy_latency_us: float
    pcie_GBps: float

    def __post_init__(self) -> None:
        _require(0 <= self.copy_latency_us < math.inf, f"copy_latency_us must be a finite number >= 0, got {self.copy_latency_us}")
        _require(0 < self.pcie_GBps < math.inf, f"pcie_GBps must be a finite number > 0, got {self.pcie_GBps}")

    def copy_ns(self, nbytes: int) -> int:
        if nbytes <= 0:
            _require(nbytes == 0, f"copy of negative size {nbytes} bytes")
            return 0
        return _to_ns(self.copy_latency_us * 1000.0 + nbytes / self.pcie_GBps)


@dataclass(frozen=True)
class TabulatedCopyCost:
    """Measured effective bandwidth (bytes / wall time of one copy) at several copy sizes.

    Inside the table the bandwidth is interpolated linearly in log2(size). Below the smallest point
    the time falls linearly to ``copy_latency_us`` at size 0; above the largest point it grows at the
    last measured bandwidth (a measured slope is never extrapolated upward).
    """

    copy_latency_us: float
    points: tuple[tuple[int, float], ...]  # (copy_bytes, effective_GBps), sizes strictly increasing

    _sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _log2_sizes: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _bws: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _bw_slopes: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _latency_ns: float = field(init=False, repr=False, compare=False)
    _below_ns_per_byte: float = field(init=False, repr=False, compare=False)
    _t_max_ns: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        points = tuple((s, float(b)) for s, b in self.points)
        object.__setattr__(self, "points", points)
        _require(self.copy_latency_us >= 0, f"copy_latency_us must be >= 0, got {self.copy_latency_us}")
        _require(len(points) >= 1, "points: need at least one (copy_bytes, effective_GBps) point")
        for i, (size, bw) in enumerate(points):
            _require(
                isinstance(size, int) and not isinstance(size, bool) and size > 0,
                f"point {i} ({size!r} B): copy size must be a positive integer number of bytes",
            )
            _require(bw > 0 and math.isfinite(bw), f"point {i} ({size} B): bandwidth must be > 0 GB/s, got {bw}")
        latency_ns = self.copy_latency_us * 1000.0
        size_min, bw_min = points[0]
        t_min = size_min / bw_min
        _require(
            t_min >= latency_ns,
            f"point 0 ({size_min} B at {bw_min} GB/s = {t_min / 1000:.3f} us) is faster than "
            f"copy_latency_us={self.copy_latency_us}; lower the latency or check the point",
        )
        slopes = []
        for i in range(1, len(points)):
            (s0, b0), (s1, b1) = points[i - 1], points[i]
            _require(s1 > s0, f"point {i} ({s1} B): sizes must be strictly increasing (previous {s0} B)")
            doublings = math.log2(s1) - math.log2(s0)
            slope = (b1 - b0) / doublings
            # t(s) = s / bw(s) with bw linear in log2(s) is non-decreasing on the segment exactly when
            # the bandwidth gains at most bw_left * ln 2 per doubling (checked at the left end, where it binds).
            bw_limit = b0 + b0 * math.log(2) * doublings
            _require(
                slope <= b0 * math.log(2),
                f"point {i} ({s1} B at {b1} GB/s): bandwidth rises too fast from point {i - 1} "
                f"({s0} B at {b0} GB/s), so interpolated copy time would fall as size grows; "
                f"at most {bw_limit:.3f} GB/s is consistent (drop latency-dominated small points: "
                f"below the smallest point the model is latency + linear)",
            )
            slopes.append(slope)
        size_max, bw_max = points[-1]
        object.__setattr__(self, "_sizes", tuple(s for s, _ in points))
        object.__setattr__(self, "_log2_sizes", tuple(math.log2(s) for s, _ in points))
        object.__setattr__(self, "_bws", tuple(b for _, b in points))
        object.__setattr__(self, "_bw_slopes", tuple(slopes))
        object.__setattr__(self, "_latency_ns", latency_ns)
        object.__setattr__(self, "_below_ns_per_byte", (t_min - latency_ns) / size_min)
        object.__setattr__(self, "_t_max_ns", size_max / bw_max)

    def copy_ns(self, nbytes: int) -> int:
        sizes = self._sizes
        if nbytes <= sizes[0]:
            if nbytes <= 0:
                _require(nbytes == 0, f"copy of negative size {nbytes} bytes")
                return 0
            return _to_ns(self._latency_ns + self._below_ns_per_byte * nbytes)
        if nbytes >= sizes[-1]:
            return _to_ns(self._t_max_ns + (nbytes - sizes[-1]) / self._bws[-1])
        i = bisect_right(sizes, nbytes) - 1
        bw = self._bws[i] + self._bw_slopes[i] * (math.log2(nbytes) - self._log2_sizes[i])
        return _to_ns(nbytes / bw)


@dataclass(frozen=True)
class _PiecewiseLinear:
    """y(x) through the points; flat below the first, last segment's slope (clamped >= 0) above the last."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            if len(xs) == 1:
                return ys[0]
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            return ys[-1] + slope * (x - xs[-1])
        i = bisect_right(xs, x) - 1
        return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])


def _check_ctx_points(points: tuple[tuple[int, float], ...], what: str) -> None:
    _require(len(points) >= 1, f"{what}: need at least one (context_len, time) point")
    previous = -1
    for ctx, t in points:
        _require(
            isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > previous,
            f"{what}: context lengths must be integers >= 0, strictly increasing (got {ctx!r} after {previous})",
        )
        _require(t >= 0 and math.isfinite(t), f"{what}: time at context {ctx} must be >= 0, got {t}")
        previous = ctx


@dataclass(frozen=True)
class MeasuredCompute:
    """Per-layer compute times of one model at one precision, from the engine's profiler, and the host's
    costs around them (``validation.profile_fit`` derives them from calibration micro-benchmarks):

    - ``layer_overhead_us``: per layer, the engine's time that no kernel accounts for (routing read-back,
      the host's bookkeeping and launches, the combine), in series with the layer's compute;
    - ``miss_latency_us``: a demand copy starts this long after the host reaches the layer's copy start (the
      routing read-back to the copy's issue: the miss's bookkeeping, the pump, the issue); the host is busy
      meanwhile, the compute stream is not (hits already launched run);
    - ``prefetch_latency_us``: a prefetch copy a layer decides starts no earlier than this long after the
      layer's routing read-back plus the policy's ``decision_us``: the host first launches the layer's
      experts and the next layer's attention, then decides (measured on layers without a miss). That host
      time overlaps the GPU's work, so it delays the prefetch, not the layer (its share of the critical
      path is in ``layer_overhead_us``);
    - ``copy_wait_us``: compute that has to wait for a copy starts this long after the copy ends (the
      host and the GPU noticing it);
    - ``decision_us``: per policy class name, the host's extra work per layer over LRU's (its prefetch
      decision, a live predictor's read-back); it overlaps the layer's experts, and delays the policy's
      prefetch copies and the next layer's start when longer than them;
    - ``layer_extra_us``: per policy class name, what the policy adds to every layer in series, before
      routing (a live predictor's kernels inside the captured layer graph), measured as an all-resident
      decode with the policy against one with LRU."""

    precision: str
    attention_us_by_ctx: tuple[tuple[int, float], ...]
    router_us: float
    expert_us: float
    layer_overhead_us: float
    token_overhead_us: float
    copy_wait_us: float = 0.0
    decision_us: tuple[tuple[str, float], ...] = ()
    layer_extra_us: tuple[tuple[str, float], ...] = ()
    miss_latency_us: float = 0.0
    prefetch_latency_us: float = 0.0
    shape: tuple[tuple[str, int], ...] = ()   # the measured model's dimensions (MEASURED_DIMS); () if not recorded

    _attention: _PiecewiseLinear = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        points = tuple((c, float(t)) for c, t in self.attention_us_by_ctx)
        object.__setattr__(self, "attention_us_by_ctx", points)
        _require(isinstance(self.precision, str) and self.precision != "", "precision must be a non-empty string")
        _check_ctx_points(points, "attention_us_by_ctx")
        for name in ("router_us", "expert_us", "layer_overhead_us", "token_overhead_us", "copy_wait_us",
                     "miss_latency_us", "prefetch_latency_us"):
            value = getattr(self, name)
            _require(value >= 0 and math.isfinite(value), f"{name} must be >= 0, got {value}")
        for name in ("decision_us", "layer_extra_us"):
            by_policy = tuple(sorted((str(k), float(v)) for k, v in getattr(self, name)))
            object.__setattr__(self, name, by_policy)
            for policy, us in by_policy:
                _require(us >= 0 and math.isfinite(us), f"{name}[{policy}] must be >= 0, got {us}")
        object.__setattr__(
            self, "_attention", _PiecewiseLinear(tuple(c for c, _ in points), tuple(t for _, t in points))
        )
        shape = tuple(sorted((str(k), v) for k, v in dict(self.shape).items()))
        object.__setattr__(self, "shape", shape)
        for dim, value in shape:
            _require(dim in MEASURED_DIMS, f"shape: unknown dimension {dim!r}; dimensions are {list(MEASURED_DIMS)}")
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"shape.{dim} must be an integer > 0, got {value!r}")

    def shape_differences(self, shape: ModelShape) -> list[str]:
        """The recorded dimensions in which ``shape`` differs from the model measured, as "name measured/given"
        (e.g. "hidden_size 1024/2880"); [] when they agree or none were recorded."""
        return [f"{dim} {value}/{getattr(shape, dim)}" for dim, value in self.shape if getattr(shape, dim) != value]

    def attention_us(self, context_len: int) -> float:
        return self._attention(context_len)


# The dimensions of a measured model that its per-layer times depend on, recorded with them (``MeasuredCompute.shape``)
# so that a trace of another model under the same name is refused instead of timed with them. Not the number of
# layers (times are per layer; a model cut to fewer layers keeps them) nor top-k (times are per expert).
MEASURED_DIMS = ("num_experts", "hidden_size", "expert_intermediate_size", "num_attention_heads", "num_kv_heads",
                 "head_dim", "vocab_size")


@dataclass(frozen=True)
class ComputeCost:
    """Compute times of one model at one precision on one GPU, integer ns, batch 1."""

    attention_base_ns: int  # attention of one layer at context length 0 (projections)
    attention_per_ctx_ns: float  # extra per token of context (KV-cache read)
    router_ns: int
    expert_ns: int  # one expert at batch 1
    layer_overhead_ns: int  # host/launch overhead per layer
    token_overhead_ns: int  # embedding + LM head + sampling per token
    basis: str = "analytic"  # "analytic" or "measured": which the numbers come from
    # Measured attention is piecewise linear in context; when given it replaces base + per_ctx * ctx.
    attention_ns_by_ctx: tuple[tuple[int, float], ...] = ()
    copy_wait_ns: int = 0    # a copy's end to the compute waiting on it (MeasuredCompute.copy_wait_us)
    decision_ns_by_policy: tuple[tuple[str, int], ...] = ()   # policy class name -> host ns per layer
    layer_extra_ns_by_policy: tuple[tuple[str, int], ...] = ()  # policy class name -> ns per layer in series
    miss_latency_ns: int = 0  # the host's copy start to a demand copy's start (MeasuredCompute.miss_latency_us)
    prefetch_latency_ns: int = 0  # routing to a prefetch decision's start (MeasuredCompute.prefetch_latency_us)

    def decision_ns(self, policy_cls: type) -> int:
        """The host's extra time per layer for ``policy_cls`` (MeasuredCompute.decision_us), else 0."""
        return dict(self.decision_ns_by_policy).get(policy_cls.__name__, 0)

    def layer_extra_ns(self, policy_cls: type) -> int:
        """What ``policy_cls`` adds to every layer before routing (MeasuredCompute.layer_extra_us), else 0."""
        return dict(self.layer_extra_ns_by_policy).get(policy_cls.__name__, 0)

    _attention: _PiecewiseLinear | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        points = tuple((c, float(t)) for c, t in self.attention_ns_by_ctx)
        object.__setattr__(self, "attention_ns_by_ctx", points)
        curve = None
        if points:
            _check_ctx_points(points, "attention_ns_by_ctx")
            curve = _PiecewiseLinear(tuple(c for c, _ in points), tuple(t for _, t in points))
        object.__setattr__(self, "_attention", curve)

    def attention_ns(self, context_len: int) -> int:
        if self._attention is not None:
            return _to_ns(self._attention(context_len))
        return _to_ns(self.attention_base_ns + self.attention_per_ctx_ns * context_len)


_OVERRIDABLE = ("pcie_GBps", "copy_latency_us", "copy_engines", "hbm_GBps")


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    source: str  # where the numbers come from (measured, date, how)
    copy: CopyCost
    copy_engines: int
    hbm_GBps: float  # effective device-memory bandwidth for batch-1 weight streaming
    kernel_launch_us: float  # fixed cost per kernel (launch + minimum kernel time at batch 1)
    kernels_per_expert: int
    kernels_per_attention: int
    layer_overhead_us: float
    token_overhead_us: float
    measured_compute: tuple[tuple[str, MeasuredCompute], ...] = ()

    def __post_init__(self) -> None:
        measured = tuple((m, c) for m, c in self.measured_compute)
        object.__setattr__(self, "measured_compute", measured)
        _require(isinstance(self.name, str) and self.name != "", "name must be a non-empty string")
        _require(
            isinstance(self.copy_engines, int) and not isinstance(self.copy_engines, bool) and self.copy_engines >= 1,
            f"copy_engines must be an integer >= 1, got {self.copy_engines!r}",
        )
        _require(self.hbm_GBps > 0, f"hbm_GBps must be > 0, got {self.hbm_GBps}")
        for name in ("kernels_per_expert", "kernels_per_attention"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"{name} must be an integer >= 0, got {value!r}",
            )
        for name in ("kernel_launch_us", "layer_overhead_us", "token_overhead_us"):
            value = getattr(self, name)
            _require(value >= 0, f"{name} must be >= 0, got {value}")
        seen = set()
        for model, entry in measured:
            key = (model, entry.precision)
            _require(key not in seen, f"measured_compute: two entries for model {model!r} at {entry.precision!r}")
            seen.add(key)

    def unmatched_measurement_note(self, shape: ModelShape, precision: str) -> str | None:
        """When the profile measures compute for other models or precisions but not ``shape`` at ``precision``
        (a misspelt model name, another precision): one line saying the analytic model is used instead."""
        measured = [f"{model} at {m.precision}" for model, m in self.measured_compute]
        if not measured or self.compute_cost(shape, precision).basis == "measured":
            return None
        return (f"hardware {self.name} measures compute for {', '.join(measured)}, not for {shape.name} at {precision}: "
                f"its runs use the analytic compute model (compute_basis=analytic); if that is a misspelt model name "
                f"or precision in the profile's measured_compute, correct it")

    def measured_shape_error(self, shape: ModelShape, precision: str) -> str | None:
        """When the profile measured a model named ``shape.name`` at ``precision`` whose recorded dimensions differ
        from ``shape``'s (a trace of another model under that name): the message, else None."""
        for model, m in self.measured_compute:
            if model == shape.name and m.precision == precision and m.shape_differences(shape):
                return (f"hardware {self.name} measured compute for a model named {model} at {precision} whose "
                        f"dimensions differ from this trace's {shape.name} (measured/trace: "
                        f"{', '.join(m.shape_differences(shape))}): its times would be another model's; give the "
                        f"trace's model its own name (its __meta__ model), or calibrate this model "
                        f"(python -m experiments.profile)")
        return None

    def compute_cost(self, shape: ModelShape, precision: str) -> ComputeCost:
        """Measured times for (shape.name, precision) if the profile has them, else the analytic model.
        HardwareProfileError when the measured model's recorded dimensions differ from ``shape``'s
        (``measured_shape_error``)."""
        for model, m in self.measured_compute:
            if model == shape.name and m.precision == precision:
                if m.shape_differences(shape):
                    raise HardwareProfileError(self.measured_shape_error(shape, precision))
                return ComputeCost(
                    attention_base_ns=_to_ns(m.attention_us(0) * 1000.0),
                    attention_per_ctx_ns=_last_slope(m.attention_us_by_ctx) * 1000.0,
                    router_ns=_to_ns(m.router_us * 1000.0),
                    expert_ns=_to_ns(m.expert_us * 1000.0),
                    layer_overhead_ns=round(m.layer_overhead_us * 1000.0),
                    token_overhead_ns=round(m.token_overhead_us * 1000.0),
                    basis="measured",
                    attention_ns_by_ctx=tuple((c, t * 1000.0) for c, t in m.attention_us_by_ctx),
                    copy_wait_ns=round(m.copy_wait_us * 1000.0),
                    decision_ns_by_policy=tuple((p, round(us * 1000.0)) for p, us in m.decision_us),
                    layer_extra_ns_by_policy=tuple((p, round(us * 1000.0)) for p, us in m.layer_extra_us),
                    miss_latency_ns=round(m.miss_latency_us * 1000.0),
                    prefetch_latency_ns=round(m.prefetch_latency_us * 1000.0),
                )
        launch_ns = self.kernel_launch_us * 1000.0
        hbm = self.hbm_GBps
        bf16 = 2  # non-expert weights (attention, router, embeddings) stay in bf16
        return ComputeCost(
            attention_base_ns=_to_ns(self.kernels_per_attention * launch_ns + shape.attention_params * bf16 / hbm),
            attention_per_ctx_ns=shape.kv_bytes_per_token() / hbm,
            router_ns=_to_ns(launch_ns + shape.hidden_size * shape.num_experts * bf16 / hbm),
            expert_ns=_to_ns(self.kernels_per_expert * launch_ns + shape.expert_bytes(precision) / hbm),
            layer_overhead_ns=round(self.layer_overhead_us * 1000.0),
            token_overhead_ns=_to_ns(self.token_overhead_us * 1000.0 + shape.vocab_size * shape.hidden_size * bf16 / hbm),
        )

    def prefetch_estimates(self, shape: ModelShape, precision: str) -> tuple[int, int]:
        """(expert_copy_ns, layer_compute_ns): the link's time per expert copy (the copy engines run side
        by side) and one layer's compute at short context, the estimates predictive policies use to
        limit prefetch depth (``PolicyContext``). The simulator and the engine both take them from here."""
        cost = self.compute_cost(shape, precision)
        copy_ns = max(1, self.copy.copy_ns(shape.expert_bytes(precision)) // self.copy_engines)
        layer_ns = cost.attention_ns(0) + cost.router_ns + cost.layer_overhead_ns + shape.top_k * cost.expert_ns
        return copy_ns, layer_ns

    def with_overrides(self, **overrides: Any) -> HardwareProfile:
        """A copy with some link/memory numbers replaced, for what-if sweeps.

        ``pcie_GBps`` replaces the copy model by a constant link at that bandwidth (keeping the
        latency, or ``copy_latency_us`` if given too); ``copy_latency_us`` alone keeps the model's kind.
        """
        unknown = sorted(set(overrides) - set(_OVERRIDABLE))
        _require(not unknown, f"unknown hardware override(s) {unknown}; valid keys: {list(_OVERRIDABLE)}")
        if not overrides:
            return self
        copy = self.copy
        latency_us = overrides.get("copy_latency_us", copy.copy_latency_us)
        if "pcie_GBps" in overrides:
            copy = ConstantCopyCost(copy_latency_us=latency_us, pcie_GBps=overrides["pcie_GBps"])
        elif "copy_latency_us" in overrides:
            try:
                copy = replace(copy, copy_latency_us=latency_us)
            except ValueError as e:
                raise HardwareProfileError(f"hardware {self.name}: copy_latency_us={latency_us} does not fit its measured copy "
                                 f"table ({e}); on a measured table the latency only sets copies below the table's "
                                 f"smallest size, whose times already hold the link's latency: to model a link with "
                                 f"another latency, give pcie_GBps too (a constant link)") from None
        changed = ", ".join(f"{k}={overrides[k]}" for k in _OVERRIDABLE if k in overrides)
        return replace(
            self,
            copy=copy,
            copy_engines=overrides.get("copy_engines", self.copy_engines),
            hbm_GBps=overrides.get("hbm_GBps", self.hbm_GBps),
            source=f"{self.source} [overridden: {changed}]",
        )


def _last_slope(points: tuple[tuple[int, float], ...]) -> float:
    if len(points) < 2:
        return 0.0
    (c0, t0), (c1, t1) = points[-2], points[-1]
    return max(0.0, (t1 - t0) / (c1 - c0))


# ---------------------------------------------------------------------------------------------
# YAML <-> profile


_REQUIRED = {
    "name": str,
    "description": str,
    "source": str,
    "copy_latency_us": float,
    "hbm_GBps": float,
    "kernel_launch_us": float,
    "kernels_per_expert": int,
    "kernels_per_attention": int,
    "layer_overhead_us": float,
    "token_overhead_us": float,
}
_OPTIONAL = {"copy_engines": int, "measured_compute": dict}
_COPY_TABLES = ("h2d_GBps_by_MiB", "pcie_GBps")  # exactly one: measured table or constant link
_MEASURED_FIELDS = {
    "attention_us_by_ctx": dict,
    "router_us": float,
    "expert_us": float,
    "layer_overhead_us": float,
    "token_overhead_us": float,
}
_MEASURED_OPTIONAL = {"copy_wait_us": float, "decision_us": dict, "layer_extra_us": dict, "miss_latency_us": float,
                      "prefetch_latency_us": float, "shape": dict}


def available_hardware() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def is_profile_name(name_or_path: str | Path) -> bool:
    """Whether ``load_hardware`` reads ``name_or_path`` as a shipped profile's name (no ``.yaml``/``.yml`` suffix and
    no path separator) rather than as a path to a YAML file."""
    text = str(name_or_path)
    return not (text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text)


def profile_file(name_or_path: str | Path) -> Path:
    """The file ``load_hardware`` reads for ``name_or_path``: ``hardware/profiles/<name>.yaml`` for a name, else the
    path as given (which may not exist)."""
    return PROFILES_DIR / f"{name_or_path}.yaml" if is_profile_name(name_or_path) else Path(name_or_path)


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A profile by name (``hardware/profiles/<name>.yaml``) or by path to a YAML file (``profile_file``)."""
    text = str(name_or_path)
    by_name = is_profile_name(text)
    path = profile_file(text)
    if not path.is_file():
        if by_name:
            raise HardwareProfileError(f"unknown hardware profile {text!r}; available: {available_hardware()}")
        raise HardwareProfileError(f"hardware profile file {path} does not exist")
    try:
        data = safe_load_unique(path.read_text())
    except yaml.YAMLError as e:
        raise HardwareProfileError(f"{path}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise HardwareProfileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the profile as "
                                   f"UTF-8 YAML") from None
    profile = hardware_from_dict(data, origin=str(path))
    if by_name and profile.name != text:
        raise HardwareProfileError(f"{path}: field 'name' is {profile.name!r}; set it to the file's name {text!r}")
    return profile


def hardware_from_dict(data: Any, origin: str = "<dict>") -> HardwareProfile:
    """Build a profile from the YAML layout (also what hardware_to_dict writes); errors name origin and field."""

    def fail(message: str) -> HardwareProfileError:
        return HardwareProfileError(f"{origin}: {message}")

    if not isinstance(data, dict):
        raise fail("expected a mapping of hardware fields at the top level")
    valid = [*_REQUIRED, *_OPTIONAL, *_COPY_TABLES]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise fail(f"unknown field(s) {unknown}; valid fields: {valid}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise fail(f"missing field(s) {missing}; add them (units are in the field names)")
    tables = [k for k in _COPY_TABLES if k in data]
    if len(tables) != 1:
        raise fail(
            f"give exactly one of {list(_COPY_TABLES)} (a measured table 'h2d_GBps_by_MiB: {{0.25: 19.8, 1: 43.8}}' "
            f"or a constant link 'pcie_GBps: 25'), found {tables}"
        )
    values = {k: _typed(data[k], kind, k, fail) for k, kind in {**_REQUIRED, **_OPTIONAL}.items() if k in data}
    latency_us = values.pop("copy_latency_us")
    try:
        if "pcie_GBps" in data:
            copy: CopyCost = ConstantCopyCost(latency_us, _typed(data["pcie_GBps"], float, "pcie_GBps", fail))
        else:
            table = _typed(data["h2d_GBps_by_MiB"], dict, "h2d_GBps_by_MiB", fail)
            points = sorted(
                (_mib_to_bytes(k, fail), _typed(v, float, f"h2d_GBps_by_MiB[{k}]", fail)) for k, v in table.items()
            )
            copy = TabulatedCopyCost(latency_us, tuple(points))
    except ValueError as e:
        if str(e).startswith(origin):
            raise
        raise fail(f"copy model (copy_latency_us / {tables[0]}): {e}") from e
    values.setdefault("copy_engines", 1)
    measured = _measured_from_dict(values.pop("measured_compute", {}), fail)
    try:
        return HardwareProfile(copy=copy, measured_compute=measured, **values)
    except ValueError as e:
        raise fail(f"{e}") from e


def _typed(value: Any, kind: type, key: str, fail) -> Any:
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"field {key!r} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise fail(f"field {key!r} must be a finite number >= 0, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"field {key!r} must be an integer, got {value!r}")
        if value < 0:
            raise fail(f"field {key!r} must be >= 0, got {value!r}")
        return value
    if not isinstance(value, kind):
        raise fail(f"field {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _mib_to_bytes(key: Any, fail) -> int:
    try:
        mib = float(key)
    except (TypeError, ValueError):
        raise fail(f"h2d_GBps_by_MiB: key {key!r} must be a copy size in MiB, e.g. 0.25") from None
    nbytes = mib * MiB
    if not (nbytes >= 1 and nbytes == int(nbytes)):
        raise fail(f"h2d_GBps_by_MiB: key {key!r} MiB must be a positive whole number of bytes")
    return int(nbytes)


def _ctx_key(key: Any, where: str, fail) -> int:
    """A context length; JSON turns mapping keys into strings, so whole-number strings are accepted."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise fail(f"{where}: key {key!r} must be a context length in tokens (integer >= 0)")
    return key


def _measured_from_dict(data: dict, fail) -> tuple[tuple[str, MeasuredCompute], ...]:
    """``{model: {precision: {attention_us_by_ctx: {ctx: us}, router_us, expert_us, ...}}}``."""
    out = []
    for model, by_precision in data.items():
        where = f"measured_compute[{model}]"
        if not isinstance(by_precision, dict):
            raise fail(f"{where} must map precision (e.g. bf16) to measured fields")
        for precision, fields in by_precision.items():
            here = f"{where}[{precision}]"
            if precision not in PRECISION_BITS:      # a misspelt one would never be used, without a word
                raise fail(f"{here}: unknown precision {precision!r}; use one of {sorted(PRECISION_BITS)}")
            if not isinstance(fields, dict):
                raise fail(f"{here} must be a mapping of {list(_MEASURED_FIELDS)}")
            unknown = sorted(set(fields) - set(_MEASURED_FIELDS) - set(_MEASURED_OPTIONAL))
            missing = [k for k in _MEASURED_FIELDS if k not in fields]
            if unknown or missing:
                raise fail(f"{here}: missing {missing}, unknown {unknown}; fields are {list(_MEASURED_FIELDS)} "
                           f"and optionally {list(_MEASURED_OPTIONAL)}")
            v = {k: _typed(fields[k], kind, f"{here}.{k}", fail)
                 for k, kind in {**_MEASURED_FIELDS, **_MEASURED_OPTIONAL}.items() if k in fields}
            for by_policy in ("decision_us", "layer_extra_us"):
                v[by_policy] = tuple((str(policy), _typed(us, float, f"{here}.{by_policy}[{policy}]", fail))
                                     for policy, us in v.get(by_policy, {}).items())
            if "shape" in v:
                v["shape"] = tuple((str(dim), _typed(n, int, f"{here}.shape.{dim}", fail))
                                   for dim, n in v["shape"].items())
            attention = v.pop("attention_us_by_ctx")
            points = sorted(
                (_ctx_key(ctx, f"{here}.attention_us_by_ctx", fail), _typed(us, float, f"{here}.attention_us_by_ctx[{ctx}]", fail))
                for ctx, us in attention.items()
            )
            try:
                entry = MeasuredCompute(str(precision), tuple(points), **v)
            except ValueError as e:
                raise fail(f"{here}: {e}") from e
            out.append((str(model), entry))
    return tuple(out)


def hardware_to_dict(profile: HardwareProfile) -> dict:
    """The fully resolved profile in the YAML layout; ``hardware_from_dict`` reads it back."""
    out: dict[str, Any] = {
        "name": profile.name,
        "description": profile.description,
        "source": profile.source,
        "copy_latency_us": profile.copy.copy_latency_us,
    }
    copy = profile.copy
    if isinstance(copy, ConstantCopyCost):
        out["pcie_GBps"] = copy.pcie_GBps
    elif isinstance(copy, TabulatedCopyCost):
        out["h2d_GBps_by_MiB"] = {_bytes_to_mib(s): bw for s, bw in copy.points}
    else:
        raise TypeError(f"cannot serialise copy model {type(copy).__name__}")
    out.update(
        copy_engines=profile.copy_engines,
        hbm_GBps=profile.hbm_GBps,
        kernel_launch_us=profile.kernel_launch_us,
        kernels_per_expert=profile.kernels_per_expert,
        kernels_per_attention=profile.kernels_per_attention,
        layer_overhead_us=profile.layer_overhead_us,
        token_overhead_us=profile.token_overhead_us,
    )
    measured: dict[str, dict] = {}
    for model, m in profile.measured_compute:
        measured.setdefault(model, {})[m.precision] = {
            "attention_us_by_ctx": dict(m.attention_us_by_ctx),
            "router_us": m.router_us,
            "expert_us": m.expert_us,
            "layer_overhead_us": m.layer_overhead_us,
            "token_overhead_us": m.token_overhead_us,
            "copy_wait_us": m.copy_wait_us,
            "decision_us": dict(m.decision_us),
            "layer_extra_us": dict(m.layer_extra_us),
        }
        if m.miss_latency_us:    # written only when measured: profiles without it keep their layout and digests
            measured[model][m.precision]["miss_latency_us"] = m.miss_latency_us
        if m.prefetch_latency_us:    # the same
            measured[model][m.precision]["prefetch_latency_us"] = m.prefetch_latency_us
        if m.shape:                  # the same
            measured[model][m.precision]["shape"] = dict(m.shape)
    out["measured_compute"] = measured
    return out


def _bytes_to_mib(nbytes: int) -> int | float:
    mib = nbytes / MiB  # exact: division by a power of two
    return int(mib) if mib == int(mib) else mib
