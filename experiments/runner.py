"""One configuration in, one results row out; plus the checks a grid passes before any run starts.

Traces, their train/eval slices, hardware profiles and Belady's hit counts are cached per process:
a worker that runs many configurations of one trace loads it once. A sweep that runs worker processes
first shares its traces (``share_traces``): their arrays are written once, uncompressed, and every
process memory-maps the same pages instead of decompressing a copy of its own.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from experiments.config import SWEEP_KEYS, ConfigError, RunConfig, typed_params
from experiments.results import config_hash, row_inputs, trace_sha256
from hardware.profile import HardwareProfile, load_hardware
from offload.cache import CacheMode, ExpertCache
from offload.policy import Policy, PolicyContext, check_params
from offload.predictors import predictor_for, predictor_name
from offload.session import RunSettings, SettingsError
from policies.registry import crash_site, policy_label, resolve_policy
from sim.replay import replay_untimed
from sim.simulator import CLOCK_LIMIT_NS, Timeline, simulate
from traces import Trace, TraceError, load_trace
from traces.io import load_mapped, write_mapped

# The order of a results table's columns: the resolved configuration, what it ran on, the metrics.
CONFIG_COLUMNS = [*(k for k in SWEEP_KEYS if k != "trace"), "policy_params", "trace"]
RUN_COLUMNS = ["model", "sim_path_ran", "compute_basis", "expert_bytes", "trace_sha256", "hardware_sha256", "policy_sha256", "code_sha256",
               "train_tokens", "trace_tokens", "trace_requests"]
METRIC_COLUMNS = [
    "tokens_per_s", "hit_rate", "belady_hit_fraction", "belady_hits", "tokens", "decode_s",
    "tpot_ms_mean", "tpot_ms_p50", "tpot_ms_p99", "hits", "misses", "late_prefetches", "accesses",
    "copies", "demand_copies", "prefetch_copies", "prefetch_useful", "prefetch_wasted",
    "prefetch_cancelled", "prefetch_dropped", "bytes_moved", "replaced", "link_utilisation",
    "stall_ms_per_token",
]
ROW_COLUMNS = [*CONFIG_COLUMNS, *RUN_COLUMNS, *METRIC_COLUMNS, "config_hash"]
# perf.csv's columns: the simulator's own speed on each configuration.
PERF_COLUMNS = ["config_hash", "sim_path_ran", "wall_s", "layer_steps", "sim_layer_steps_per_wall_s"]

_traces: dict[str, tuple[str, Trace]] = {}
_slices: dict[tuple, tuple[Trace | None, Trace]] = {}
_hardware: dict[tuple, HardwareProfile] = {}
_belady: dict[tuple, int] = {}
_shared_dir: Path | None = None     # where ``share_traces`` put the mapped traces, by file digest


def cached_trace(path: str) -> Trace:
    """The trace at ``path``, loaded once per process (reloaded if the file's content changed); mapped
    from the shared copy where the sweep made one (``share_traces``)."""
    hit = _traces.get(path)
    if hit is not None and hit[0] == trace_sha256(path):
        return hit[1]
    shared = _shared_dir / trace_sha256(path) if _shared_dir is not None and os.path.isfile(path) else None
    if shared is not None and shared.is_dir():
        trace = load_mapped(shared)
    else:
        trace = load_trace(path)    # before the digest: its TraceError names a missing or malformed file
    _traces[path] = (trace_sha256(path), trace)
    return trace


def share_traces(paths, folder: Path) -> None:
    """Write each trace's arrays once to ``folder`` (by the file's digest) and use the mapped copy in this
    process and in every process it starts (``use_shared_traces`` for processes that are not forked):
    workers then share the trace's pages instead of each decompressing its own copy."""
    global _shared_dir
    _shared_dir = Path(folder)
    for path in dict.fromkeys(paths):
        trace = cached_trace(path)
        shared = _shared_dir / trace_sha256(path)
        write_mapped(trace, shared)
        _traces[path] = (trace_sha256(path), load_mapped(shared))
    _slices.clear()                 # they are views of the copies loaded before


def use_shared_traces(folder: Path | None) -> None:
    """In a worker process: map the traces ``share_traces`` wrote to ``folder`` (None: load them)."""
    global _shared_dir
    _shared_dir = None if folder is None else Path(folder)


def _slice_key(cfg: RunConfig) -> tuple:
    return (cfg.trace, trace_sha256(cfg.trace), cfg.train_fraction, cfg.max_tokens)


def trace_slices(cfg: RunConfig) -> tuple[Trace | None, Trace]:
    """(train, eval): the leading ``train_fraction`` of requests, then the rest up to ``max_tokens``.
    Every policy of a sweep replays the same eval slice."""
    trace = cached_trace(cfg.trace)
    key = _slice_key(cfg)
    if key not in _slices:
        train, rest = trace.split(cfg.train_fraction)
        if rest is None:
            raise ConfigError(f"train_fraction={cfg.train_fraction} leaves no requests to replay; use a value below 1")
        _slices[key] = (train, rest.head_tokens(cfg.max_tokens) if cfg.max_tokens else rest)
    return _slices[key]


def hardware_for(cfg: RunConfig) -> HardwareProfile:
    overrides = cfg.hardware_overrides()
    key = (cfg.hardware, tuple(sorted(overrides.items())))
    if key not in _hardware:
        _hardware[key] = load_hardware(cfg.hardware).with_overrides(**overrides)
    return _hardware[key]


def belady_hits(cfg: RunConfig) -> int:
    """Hits of Belady's MIN on the same eval slice, slots and mode: the bound for eviction."""
    key = (*_slice_key(cfg), cfg.cache_slots, cfg.cache_mode)
    if key not in _belady:
        train, run = trace_slices(cfg)
        stats = replay_untimed(run, resolve_policy("belady"), RunSettings(cfg.cache_slots, cfg.cache_mode),
                               train_trace=train)
        _belady[key] = stats.hits
    return _belady[key]


# Rough wall seconds per layer-step on one core of the 2-core machine (the fast path 0.1-0.2 us, the
# reference 15-30 us) and per configuration (the Belady bound, writing the row): what a sweep orders its
# work by and bases its time estimate on before it has measured its own speed.
_SECONDS_PER_STEP = {"fast": 2e-7, "reference": 2e-5}
_SECONDS_PER_CONFIG = 0.02


def expected_seconds(cfg: RunConfig) -> float:
    """About how long ``run_config(cfg)`` takes, from the eval slice's layer-steps and the path it takes."""
    from sim.fast_path import kernel_for     # numba's import is paid only by a sweep that asks
    _, run = trace_slices(cfg)
    fast = cfg.sim_path == "auto" and kernel_for(cfg.policy, dict(cfg.policy_params)) is not None
    return _SECONDS_PER_CONFIG + run.num_tokens * run.num_layers * _SECONDS_PER_STEP["fast" if fast else "reference"]


def _settings(cfg: RunConfig) -> RunSettings:
    return RunSettings(cache_slots=cfg.cache_slots, cache_mode=cfg.cache_mode, precision=cfg.precision,
                       prefetch_depth=cfg.prefetch_depth, prompt_tokens=cfg.prompt_tokens,
                       policy_params=dict(cfg.policy_params), copies_in_flight=cfg.copies_in_flight)


def run_config(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(row, perf): the deterministic results row, and the simulator's own speed on this run."""
    inputs = row_inputs(cfg)        # before the run: the row is keyed by what it was computed from
    train, run = trace_slices(cfg)
    shape = run.model
    hardware = hardware_for(cfg)
    result = simulate(run, resolve_policy(cfg.policy), hardware, _settings(cfg), train_trace=train,
                      path=cfg.sim_path)
    bound = belady_hits(cfg)
    h = config_hash(cfg, inputs)
    row = cfg.to_dict()
    row["policy_params"] = json.dumps(row["policy_params"], sort_keys=True)
    row.update(
        model=shape.name,
        sim_path_ran=result.path,
        compute_basis=hardware.compute_cost(shape, cfg.precision).basis,     # measured, or the analytic model
        expert_bytes=shape.expert_bytes(cfg.precision),
        **inputs,
        train_tokens=train.num_tokens if train is not None else 0,
        trace_tokens=run.num_tokens,
        trace_requests=run.num_requests,
        **result.metrics,
        belady_hits=bound,
        belady_hit_fraction=result.metrics["hits"] / bound if bound else None,
        config_hash=h,
    )
    perf = dict(zip(PERF_COLUMNS, (h, result.path, result.wall_s, result.layer_steps, result.layer_steps_per_wall_s)))
    return row, perf


def record_timeline(cfg: RunConfig, tokens: int = 20) -> Timeline:
    """The event timeline of the first ``tokens`` tokens of ``cfg``'s eval slice."""
    train, run = trace_slices(cfg)
    head = run.head_tokens(tokens)
    result = simulate(head, resolve_policy(cfg.policy), hardware_for(cfg), _settings(cfg),
                      train_trace=train, record_timeline=True)
    timeline = result.timeline
    n = min(tokens, len(timeline.token_end_ns))
    end_ns = timeline.token_end_ns[n - 1]
    return Timeline(compute=[e for e in timeline.compute if e.token < n],
                    copies=[c for c in timeline.copies if c.start_ns < end_ns],
                    token_end_ns=timeline.token_end_ns[:n], preloaded=timeline.preloaded,
                    layer_start_ns=[m for m in timeline.layer_start_ns if m[0] < n],
                    layer_waits=[w for w in timeline.layer_waits if w[0] < n])


def compute_notes(configs: list[RunConfig]) -> list[str]:
    """One line per (hardware, model, precision) whose profile measures compute for other models only
    (``HardwareProfile.unmatched_measurement_note``), and per policy whose host decision time a measured entry
    leaves out while it holds other policies' (a prefetching class renamed or misspelt in ``decision_us`` is charged
    none)."""
    notes = []
    for cfg in configs:
        hardware, shape = hardware_for(cfg), trace_slices(cfg)[1].model
        note = hardware.unmatched_measurement_note(shape, cfg.precision)
        cost = hardware.compute_cost(shape, cfg.precision)
        measured = dict(cost.decision_ns_by_policy)
        policy_cls = resolve_policy(cfg.policy)
        name = policy_cls.__name__
        # (the calibration measures decisions beside LRU's, the baseline; an on-demand policy's is about LRU's)
        prefetches = policy_cls.prefetch is not Policy.prefetch
        if note is None and measured and prefetches and name not in measured:
            note = (f"hardware {hardware.name} measures the host's decision time per layer of {', '.join(sorted(measured))} "
                    f"on {shape.name} at {cfg.precision}, not of {name}: its runs charge none; calibrate it with python -m "
                    f"experiments.profile (or experiments.validate), which measure every policy they are given")
        if note is not None and note not in notes:
            notes.append(note)
    return notes


def validate_grid(configs: list[RunConfig]) -> None:
    """Raise ConfigError / TraceError / ValueError naming the first bad value, before any run starts."""
    # imported here: a check before the runs, not code a row is computed by (ROW_MODULES, the rows' key)
    from experiments.hook_signatures import check_hook_signatures
    for policy, params in {(c.policy, typed_params(c.policy_params)): (c.policy, c.policy_params)
                           for c in configs}.values():
        policy_cls = resolve_policy(policy)
        check_hook_signatures(policy, policy_cls)
        try:
            check_params(policy_cls, dict(params))
        except ValueError as err:
            raise ConfigError(f"policy={policy}: {err} (a policy.NAME goes to every policy of the grid: sweep a "
                              f"parameterised policy in a call of its own, with its own --out, to compare it with "
                              f"others)") from None
    for cfg in configs:
        hardware_for(cfg)
        _check_numbers(cfg)
        if cfg.sim_path not in ("auto", "reference"):
            raise ConfigError(f"sim_path={cfg.sim_path!r} is not valid; use auto (the exact fast path where "
                              f"one exists) or reference (always the reference model)")
        try:
            _settings(cfg)     # the run's own settings check: slots, mode, depth, prompt length
        except SettingsError as err:
            raise ConfigError(_slots_below_top_k(cfg) or str(err)) from None
        try:
            train, run = trace_slices(cfg)
        except (ConfigError, TraceError):
            raise
        except ValueError as err:
            raise ConfigError(f"{cfg.trace}: {err}") from None
        shape = run.model
        try:
            shape.expert_bytes(cfg.precision)
        except ValueError as err:
            raise ConfigError(f"precision: {err}") from None
        mismatch = hardware_for(cfg).measured_shape_error(shape, cfg.precision)
        if mismatch:
            raise ConfigError(f"{cfg.trace}: {mismatch}")
        _check_clock_range(cfg, run)
        try:
            ExpertCache(shape.num_layers, shape.num_experts, cfg.cache_slots, cfg.cache_mode, shape.top_k)
        except ValueError as err:
            raise ConfigError(f"model {shape.name}: {err}") from None
    _check_policies_build(configs)


def _slots_below_top_k(cfg: RunConfig) -> str | None:
    """For ``cache_slots`` below 1: the cache's own refusal on the trace's model, which names the real minimum
    (its top-k), as for any slot count below that; None where the trace does not load here (its error comes
    once the settings pass), or the slots or mode are not what is wrong."""
    if cfg.cache_slots >= 1 or cfg.cache_mode not in {m.value for m in CacheMode}:
        return None
    try:
        shape = trace_slices(cfg)[1].model
    except ValueError:      # ConfigError, TraceError
        return None
    try:
        ExpertCache(shape.num_layers, shape.num_experts, cfg.cache_slots, cfg.cache_mode, shape.top_k)
    except ValueError as err:
        return f"model {shape.name}: {err}"
    return None


# Default tracks to point a user at: the committed trace that holds them, and the command that adds them.
_TRACKS_FIX = ("use a trace with prediction tracks (e.g. traces/moe-lm-h100.npz: lookahead, pregate, quasi) "
               "or compute them from a recording: python -m experiments.make_tracks")


def _check_policies_build(configs: list[RunConfig]) -> None:
    """Each policy built as its runs will build it, once per distinct context (policy, parameters, trace
    slices, depth, slots, mode, the hardware's estimates): the prediction track it reads must be in the
    trace, and its constructor must not raise at every context of the grid. Whatever it raises there (a
    ValueError by which it refuses its inputs: no training slice, a parameter of the wrong type or value; any
    other exception, SystemExit included) would fail every run of that policy at its start, the grid's
    results for it all lost after the whole sweep's time: it is one ConfigError here, naming the file and line
    in the policy's code. A constructor that raises at some contexts only (one slot count) is left to fail
    those configurations' runs, each reported like any failing configuration while the others finish."""
    seen = set()
    built: dict[tuple, int] = {}               # (policy, parameters) -> distinct contexts built
    refused: dict[tuple, ConfigError] = {}     # (policy, parameters) -> the first context's refusal
    failed: dict[tuple, int] = {}              # (policy, parameters) -> contexts whose constructor raised
    for cfg in configs:
        # The context from the configuration alone (the hardware's estimates follow from its profile, overrides,
        # precision and the trace), so a repeat is skipped before any work.
        key = (cfg.policy, typed_params(cfg.policy_params), *_slice_key(cfg), cfg.prefetch_depth, cfg.cache_slots,
               cfg.cache_mode, cfg.hardware, tuple(sorted(cfg.hardware_overrides().items())), cfg.precision)
        if key in seen:
            continue
        seen.add(key)
        policy_cls = resolve_policy(cfg.policy)
        params = dict(cfg.policy_params)
        label = policy_label(cfg.policy, cfg.policy_params)
        train, run = trace_slices(cfg)
        track = predictor_name(policy_cls, params)
        if track is not None and track not in run.predictions:
            have = ", ".join(sorted(run.predictions)) or "none"
            raise ConfigError(f"policy={label} reads the prediction track {track!r}, which {cfg.trace} does not "
                              f"hold (it has: {have}); {_TRACKS_FIX}")
        copy_ns, layer_ns = hardware_for(cfg).prefetch_estimates(run.model, cfg.precision)
        mode = _settings(cfg).cache_mode
        slice_note = f" (train_fraction={cfg.train_fraction})" if train is None else ""
        try:
            predictor = predictor_for(policy_cls, params, cfg.prefetch_depth, trace=run)
        except ValueError as err:
            raise ConfigError(f"policy={label}{slice_note}: {err}") from None
        group = (cfg.policy, typed_params(cfg.policy_params))
        built[group] = built.get(group, 0) + 1
        try:
            policy_cls(PolicyContext(run.model, cfg.cache_slots, mode, cfg.prefetch_depth, run, train, params,
                                     predictor=predictor, expert_copy_ns=copy_ns, layer_compute_ns=layer_ns))
        except (Exception, SystemExit) as err:  # noqa: BLE001  (whatever the constructor raises fails its runs)
            failed[group] = failed.get(group, 0) + 1
            site = crash_site(policy_cls, err)
            refused.setdefault(group, ConfigError(
                # the policy refuses its inputs, in its own words with the fix
                f"policy={label}{slice_note}: {' '.join(str(err).split())} (at {site})" if isinstance(err, ValueError)
                else f"policy={label}{slice_note} cache_slots={cfg.cache_slots}: building the policy raised "
                     f"{type(err).__name__}: {' '.join(str(err).split())} at {site}; fix its __init__"))
    for group, refusal in refused.items():
        if failed[group] == built[group]:
            raise refusal


def _check_clock_range(cfg: RunConfig, run: Trace) -> None:
    """Refuse a link so slow that the run's simulated time could pass ``sim.simulator.CLOCK_LIMIT_NS``: every
    layer-step missing all its top-k experts, one copy after another, beside the layer's own compute. That
    bounds every on-demand run, whose fast path's int64 kernels would wrap silently; a prefetching policy's
    extra copies are caught when its run ends (``simulate``)."""
    hardware = hardware_for(cfg)
    shape = run.model
    copy_ns = hardware.copy.copy_ns(shape.expert_bytes(cfg.precision))
    layer_ns = hardware.prefetch_estimates(shape, cfg.precision)[1]
    worst_ns = run.num_tokens * shape.num_layers * (shape.top_k * copy_ns + layer_ns)
    if worst_ns >= CLOCK_LIMIT_NS:
        given = " ".join(f"{k}={v}" for k, v in cfg.hardware_overrides().items()) or f"hardware={cfg.hardware}"
        raise ConfigError(f"{given}: one expert's copy takes {copy_ns / 1e9:.3g} s, so {run.num_tokens} tokens of "
                          f"{shape.name} could take longer than the simulator's nanosecond clock holds (~146 years); "
                          f"use a faster link (pcie_GBps) or a smaller copy_latency_us")


def _check_numbers(cfg: RunConfig) -> None:
    """The sweep's own keys; those of the run itself are ``RunSettings``'."""
    for f in dataclasses.fields(cfg):      # every row is stored as int64 columns (parquet)
        value = getattr(cfg, f.name)
        if type(value) is int and not -2**63 <= value < 2**63:
            raise ConfigError(f"{f.name}={value} does not fit a 64-bit integer; use a smaller value")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise ConfigError(f"max_tokens={cfg.max_tokens} is out of range; use max_tokens >= 1")
    if not 0.0 <= cfg.train_fraction < 1.0:
        raise ConfigError(f"train_fraction={cfg.train_fraction} is out of range; use 0 <= train_fraction < 1")
