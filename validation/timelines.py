"""The per-layer timelines of both clocks side by side: where the simulator's time per token differs from the
engine's, layer by layer (issue 14: "where the error is large, compare the per-layer timelines of both clocks").

    python -m experiments.validate --scenario validate-h200 --out OUT --timelines moe-lm-replay,moe-lm-random

For every configuration of a slice whose engine result has a timed run (``OUT/engine/<slice>/<key>-timed.npz``,
``validation.engine_side``: one extra run with ``record_layer_timings``), the simulator replays the same steps
(``SliceInputs.timed``) with the same training slice, settings and profile as ``validation.sim_side.predict``,
on its reference path with the timeline recorded, and both clocks are cut into the same per-layer quantities.
Only the timed steps count (a live slice's prompt steps are left out, as in tokens/s). The slice's calibration
patterns (``hits``, ``misses``: LRU at top-k slots, forced routing, timings recorded; their first step left out
as the fit leaves it out) are compared the same way against the simulator's replay of the pattern, rows
``calibration:<pattern>``. Writes ``OUT/timelines_<slice>.csv`` (long format) and returns a compact table.

The engine's figures are its *timed* run's: one run with the marks recorded, beside the measured repeats
(unmarked) that tokens/s is compared on. Recording costs the host time on the critical path (three timing
CUDA events created and recorded per layer, one of them between the routing read-back and the expert launches;
each copy's events made timing ones), so a timed run is slower than the repeats: ``timed_over_measured_us_per_layer`` is the timed run's
mean step less the repeats' (1 / median tokens/s), per layer (the runs' noise is in it too). Layer times
of the engine are therefore upper bounds of an unmarked run's; compare shapes and differences between kinds
of layer, and read absolute gaps against that column. The calibration patterns are marked runs too; a live
slice's per-layer overhead comes from an unmarked all-resident live decode instead (``resident-live``, graphs
combining in the layer), so its ``calibration:`` rows are not expected to agree (forced routing, eager).

What each quantity is, in each clock
------------------------------------
The engine's marks (``real.engine``): ``layer_start_ms[t, l]`` is a CUDA event recorded on the compute stream
just before the layer's front graph is launched (the front graph = the previous layer's combine, then this
layer's attention and router; layer 0's has no combine, it follows the step's embedding); ``layer_ms[t, l]``
runs from it to an event recorded after the layer's expert launches (so to the end of the layer's experts on
the GPU, or later if the host launched them late); ``copy_start_ms``/``copy_end_ms`` are events on the copy
stream around each copy an expert of the layer waited for (-1: it was resident). All are ms from one base
event, in float32 (resolution about 0.03 us at 0.3 s from the base, 1 us at 10 s). ``step_ms`` is the host's
wall time of the step (``perf_counter`` from the step's start to the next token's read-back): what tokens/s
is made of. The simulator's layer start is its host time (``now_ns``) when the layer turn begins, i.e. the
end of the previous layer (the max of its experts' end and the host's decision), and for layer 0 the token's
start plus ``token_overhead``; its experts, copies and token ends are its timeline's (``sim.simulator``).

``missing`` (0, 1, 2+): the layer's experts that waited for a copy: a demand fetch or a prefetch still in
    flight or queued (the controller's needs with a copy job, ``OffloadController.begin_layer``). Engine: its
    entries with ``copy_start_ms >= 0``. Simulator: the same needs, recorded from its controller. For an
    on-demand policy both clocks count the same layers (``miss_layers_differ`` says how many differ).
    ``0 after 0``, ``0 after 1+``: hit layers after a hit layer, after a miss layer of the same step (layer 0
    in neither): in the engine a layer after a wait for a copy takes longer (the host wakes from a blocking
    read-back); the simulator charges every hit layer alike.
``layer_*_us`` (start of layer l to start of layer l+1). Engine: ``layer_start[t, l+1] - layer_start[t, l]``:
    this layer's attention and router, the routing read-back and the host's bookkeeping (the GPU idle), the
    wait for copies, the experts, and the next front graph's combine of this layer's experts; the last layer
    of a step has no next start in the step: ``layer_ms`` (its combine falls into the per-token work).
    Simulator: ``start[t, l+1] - start[t, l]`` (the last layer: to the token's end): attention(context) +
    router + ``layer_overhead`` + the policy's ``layer_extra``, then the experts (``expert_us`` each, after
    their copies plus ``copy_wait``), or the host's decision if longer. Not comparable at the edges: the
    engine's layer 0 lacks a combine and its last layer's combine is in the per-token work, while the
    simulator charges every layer the same overhead (the fitted ``layer_overhead`` holds one combine).
``to_copy_us`` (miss layers): the layer's start to the start of its first waited-for copy. Engine: front
    graph on the GPU + read-back + ``begin_layer`` + the feeder's pump, or the copy stream's backlog; a
    prefetch already in flight gives a negative value. Simulator: attention + router + layer overhead +
    layer extra (everything it charges before routing), or the copy lane's backlog.
``copy_us``: one copy's duration (each waited-for copy; copy stream start to end). ``copies_span_us``: first
    copy's start to the last's end (two misses: both copies, one after the other on one copy engine).
``after_copy_us``: the last waited-for copy's end to the layer's end (the next layer's start): in the engine
    the copy's event reaching the compute stream, the experts, the next front's launch; in the simulator
    ``copy_wait`` + the experts still to run + the host's decision if it ends later.
    For a miss layer ``to_copy + copies_span + after_copy = layer`` in both clocks.
``token_mean_us``, ``tokens_per_s``: the clock's own time per timed step (engine: ``step_ms`` of the timed run,
    one run, which may differ from the median of the measured repeats: ``measured_tokens_per_s`` is that
    median, ``predicted_tokens_per_s`` the stored prediction).
``per_token_us`` by part (``hit`` layers, ``miss`` layers, ``work``): the mean over timed steps of the summed
    layer times of that kind, and the rest of the step (``work`` = step time - all its layers). Engine work:
    host start of the step to the layer-0 mark (embedding) and the last layer's end to the next token's
    read-back (its combine, final norm, LM head, argmax, the synchronisation); simulator work:
    ``token_overhead`` exactly. Engine ``work`` mixes the host's clock (the step) and the GPU's (the
    layers); both count real time. The three parts add up to ``token_mean_us`` in each clock, so the
    difference (simulator - engine) splits exactly: ``share_pct`` is each part's share of it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hardware.profile import HardwareProfile
from policies.registry import resolve_policy
from traces import load_trace
from validation.engine_side import SliceInputs, stored_result
from validation.report import config_label, policy_label
from validation.scenario import Slice
from validation.store import Store

CLASSES = ("0", "1", "2+")
PARTS = ("hit", "miss", "work")


@dataclass
class Layers:
    """One clock's per-layer timeline of the timed steps, in us: ``start``/``time`` [T, L] (start of the
    layer, start to the next layer's start), ``missing`` [T, L], per miss layer ``to_copy``/``span``/``after``
    (NaN where no copy), ``copies`` [T, L, K] (each waited-for copy's duration, NaN where none), ``token`` [T]
    (the step's time)."""
    start: np.ndarray
    time: np.ndarray
    missing: np.ndarray
    to_copy: np.ndarray
    span: np.ndarray
    after: np.ndarray
    copies: np.ndarray
    token: np.ndarray

    @property
    def work(self) -> np.ndarray:
        return self.token - self.time.sum(axis=1)

    def masked(self, mask: np.ndarray) -> Layers:
        return Layers(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))


def _miss_parts(start, end, copy_start, copy_end):
    """(to_copy, span, after) per layer (NaN without a copy) from per-layer [T, L] start/end and [T, L, K]
    copy start/end (NaN where resident)."""
    with np.errstate(all="ignore"):
        first = np.nanmin(np.where(np.isnan(copy_start), np.inf, copy_start), axis=2)
        last = np.nanmax(np.where(np.isnan(copy_end), -np.inf, copy_end), axis=2)
    has = np.isfinite(first)
    first, last = np.where(has, first, np.nan), np.where(has, last, np.nan)
    return first - start, last - first, end - last


def engine_layers(trace) -> Layers:
    """The engine's timeline from a timed trace (module docstring)."""
    tm = trace.timings
    missing_keys = [k for k in ("layer_start_ms", "layer_ms", "copy_start_ms", "copy_end_ms", "step_ms") if k not in tm]
    if missing_keys:
        raise ValueError(f"the timed trace has no {missing_keys}: record it with record_layer_timings")
    start = np.asarray(tm["layer_start_ms"], np.float64) * 1e3
    layer = np.asarray(tm["layer_ms"], np.float64) * 1e3
    end = np.concatenate([start[:, 1:], start[:, -1:] + layer[:, -1:]], axis=1)
    cs = np.asarray(tm["copy_start_ms"], np.float64)
    ce = np.asarray(tm["copy_end_ms"], np.float64)
    copied = cs >= 0
    cs, ce = np.where(copied, cs * 1e3, np.nan), np.where(copied, ce * 1e3, np.nan)
    to_copy, span, after = _miss_parts(start, end, cs, ce)
    return Layers(start, end - start, copied.sum(axis=2), to_copy, span, after, ce - cs,
                  np.asarray(tm["step_ms"], np.float64) * 1e3)


def sim_layers(inputs: SliceInputs, policy: str, settings, profile: HardwareProfile):
    """The simulator's timeline of the same steps: (Layers, the SimResult). Its reference path with the timeline
    recorded, which notes each layer's start (the host's time as its turn begins) and the copies its experts
    waited for (``sim.simulator.Timeline.layer_start_ns``, ``layer_waits``)."""
    from sim import simulator
    trace = inputs.timed
    T, L, K = trace.num_tokens, trace.num_layers, trace.model.top_k
    run = simulator.simulate(trace, resolve_policy(policy), profile, settings, train_trace=inputs.train,
                             record_timeline=True, path="reference")
    start = np.full((T, L), -1, np.int64)
    for t, l, ns in run.timeline.layer_start_ns:
        start[t, l] = ns
    waits = {(t, l): copies for t, l, copies in run.timeline.layer_waits}
    if (start < 0).any() or len(waits) != T * L:
        raise RuntimeError("the simulator's timeline does not cover every layer turn: validation.timelines "
                           "must follow sim.simulator")
    token_end = np.asarray(run.timeline.token_end_ns, np.int64)
    end = np.concatenate([start[:, 1:], token_end[:, None]], axis=1)
    cs = np.full((T, L, K), np.nan)
    ce = np.full((T, L, K), np.nan)
    missing = np.zeros((T, L), np.int64)
    for (t, l), copies in waits.items():
        missing[t, l] = len(copies)
        for k, (started, finished) in enumerate(copies[:K]):
            cs[t, l, k], ce[t, l, k] = started, finished
    to_copy, span, after = _miss_parts(start, end, cs, ce)
    us = 1e-3
    layers = Layers(start * us, (end - start) * us, missing, to_copy * us, span * us, after * us, (ce - cs) * us, np.asarray(run.token_ns, np.float64) * us)
    return layers, run


def _classes(missing: np.ndarray) -> dict[str, np.ndarray]:
    return {"0": missing == 0, "1": missing == 1, "2+": missing >= 2}


def _hits_by_previous(missing: np.ndarray) -> dict[str, np.ndarray]:
    """Hit layers after a hit layer and after a miss layer of the same step (layer 0 is in neither)."""
    hit = missing == 0
    after_miss = np.zeros_like(hit)
    after_miss[:, 1:] = missing[:, :-1] > 0
    later = np.zeros_like(hit)
    later[:, 1:] = True
    return {"0 after 0": hit & later & ~after_miss, "0 after 1+": hit & after_miss}


def _med(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(np.median(x)) if len(x) else float("nan")


def clock_rows(layers: Layers) -> list[tuple[str, str, float]]:
    """(missing, quantity, value) of one clock."""
    rows = []
    classes = _classes(layers.missing)
    for name, sel in classes.items():
        rows += [(name, "layers", float(sel.sum())), (name, "layer_median_us", _med(layers.time[sel])),
                 (name, "layer_mean_us", float(layers.time[sel].mean()) if sel.any() else float("nan"))]
        if name != "0":
            rows += [(name, "to_copy_median_us", _med(layers.to_copy[sel])),
                     (name, "copies_span_median_us", _med(layers.span[sel])),
                     (name, "after_copy_median_us", _med(layers.after[sel]))]
    for name, sel in _hits_by_previous(layers.missing).items():
        rows += [(name, "layers", float(sel.sum())), (name, "layer_median_us", _med(layers.time[sel]))]
    miss = layers.missing > 0
    rows += [("1+", "to_copy_median_us", _med(layers.to_copy[miss])),
             ("1+", "copy_median_us", _med(layers.copies.ravel())),
             ("1+", "after_copy_median_us", _med(layers.after[miss]))]
    T = len(layers.token)
    parts = per_token_parts(layers)
    rows += [(part, "per_token_us", parts[part]) for part in PARTS]
    rows += [("all", "token_mean_us", float(layers.token.mean())),
             ("all", "tokens_per_s", T / (layers.token.sum() * 1e-6)), ("all", "steps", float(T))]
    return rows


def per_token_parts(layers: Layers) -> dict[str, float]:
    """Mean per step of hit-layer time, miss-layer time and the rest (they add up to the mean step)."""
    hit = layers.missing == 0
    T = len(layers.token)
    return {"hit": float(np.where(hit, layers.time, 0).sum() / T),
            "miss": float(np.where(hit, 0, layers.time).sum() / T),
            "work": float(layers.work.mean())}


@dataclass
class Config:
    """One configuration's two timelines. ``measured_tokens_per_s``: the median of the engine's measured
    (unmarked) repeats, NaN for a calibration pattern; ``predicted_tokens_per_s``: the stored prediction;
    ``miss_layers_differ``: timed steps' layers whose missing class (0, 1, 2+) differs between the clocks;
    ``routing_differs``: timed steps whose routing differs between the engine's timed run and the replayed
    steps (a live run's own decode)."""
    slice: str
    policy: str
    cache_slots: int
    engine: Layers
    sim: Layers
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    miss_layers_differ: int
    routing_differs: int
    note: str = ""
    policy_params: dict = dataclasses.field(default_factory=dict)    # what the slice gives the policy

    @property
    def label(self) -> str:
        return config_label(self.slice, self.policy, self.policy_params, self.cache_slots)

    @property
    def marks_us_per_layer(self) -> float:
        """The timed (marked) run's mean step over the measured repeats' (1 / median tokens/s), per layer: what
        recording the marks costs, if the runs are otherwise alike (their noise is in it too)."""
        if not np.isfinite(self.measured_tokens_per_s) or self.measured_tokens_per_s <= 0:
            return float("nan")
        return (float(self.engine.token.mean()) - 1e6 / self.measured_tokens_per_s) / self.engine.time.shape[1]


def _pair(slice_name, policy, slots, eng: Layers, sim: Layers, mask: np.ndarray, eng_experts, sim_experts,
          measured_tps=float("nan"), predicted_tps=float("nan"), notes=()) -> Config:
    """Both timelines cut to their common steps and ``mask`` (the timed ones)."""
    notes = list(notes)
    T = min(len(eng.token), len(sim.token))
    if len(eng.token) != len(sim.token):
        notes.append(f"the engine's timed run has {len(eng.token)} steps, the simulator's {len(sim.token)}: the "
                     f"first {T} compared")
    mask = np.asarray(mask[:T], bool)
    routing = np.sort(eng_experts[:T][mask], axis=-1) != np.sort(sim_experts[:T][mask], axis=-1)

    def cut(layers: Layers) -> Layers:
        full = np.zeros(len(layers.token), bool)
        full[:T] = mask
        return layers.masked(full)
    eng, sim = cut(eng), cut(sim)
    return Config(slice_name, policy, slots, eng, sim, measured_tps, predicted_tps,
                  int((np.minimum(eng.missing, 2) != np.minimum(sim.missing, 2)).sum()),
                  int(routing.any(axis=-1).sum()), "; ".join(notes))


def compare_config(sl: Slice, inputs: SliceInputs, result: dict, profile: HardwareProfile, store: Store) -> Config:
    """Both clocks' timelines of one configuration (``result``: its engine result, whose timed run exists)."""
    from validation.report import measured
    policy, slots = result["policy"], int(result["cache_slots"])
    timed = load_trace(store.path("engine", sl.name, result["key"], "-timed.npz"))
    eng = engine_layers(timed)
    sim, run = sim_layers(inputs, policy, sl.settings(slots, policy), profile)
    notes = []
    stored = store.read(store.path("sim", sl.name, result["key"]))
    if stored and stored.get("token_ns") is not None:
        mask = np.asarray(inputs.mask[:len(run.token_ns)], bool)
        if np.asarray(stored["token_ns"], np.int64).tolist() != np.asarray(run.token_ns, np.int64)[mask].tolist():
            notes.append("this replay differs from the stored prediction (profile or simulator changed since: "
                         "run --predict-only)")
    pair = _pair(sl.name, policy, slots, eng, sim, inputs.mask, timed.experts, inputs.timed.experts,
                 measured(result)["tokens_per_s"], float(stored["tokens_per_s"]) if stored else float("nan"), notes)
    return dataclasses.replace(pair, policy_params=sl.params_of(policy))


def calibration_configs(sl: Slice, store: Store, profile: HardwareProfile) -> tuple[list[Config], dict]:
    """The slice's calibration patterns (``real.calibration.run_pattern``: LRU at top-k slots, forced routing;
    its run with layer timings recorded) against the simulator's replay of the same pattern, their first step left out as
    the fit leaves it out; and, from the same calibration, the all-resident LRU decode of the training slice
    (unmarked): ``{"resident_lru_us_per_layer": (its median step - token_overhead) / layers}``."""
    from types import SimpleNamespace

    from offload.session import RunSettings
    from traces import ModelShape
    from traces.synthetic import PATTERNS, pattern_trace
    from validation.profile_fit import SKIP_STEPS
    calibration = store.read(store.calibration_path(sl.name))
    if calibration is None:
        return [], {}
    shape = ModelShape.from_dict(calibration["shape"])
    configs = []
    for name in PATTERNS:
        pattern = calibration.get("patterns", {}).get(name)
        if not pattern or not pattern.get("layer_timings"):
            continue
        timings = {k: np.asarray(v, np.float64) for k, v in pattern["layer_timings"].items()}
        # the step times of the run that recorded these timings (calibrations before the event-free fit
        # timed one run, with its events: step_ms then)
        timings["step_ms"] = np.asarray(pattern.get("marked_step_ms", pattern["step_ms"]), np.float64)
        eng = engine_layers(SimpleNamespace(timings=timings))
        trace = pattern_trace(shape, len(pattern["step_ms"]), name)
        sim, _ = sim_layers(SimpleNamespace(timed=trace, train=None), "lru",
                            RunSettings(cache_slots=int(pattern.get("slots", shape.top_k)),
                                        precision=calibration.get("precision", sl.precision)), profile)
        mask = np.arange(len(pattern["step_ms"])) >= SKIP_STEPS
        configs.append(_pair(sl.name, f"calibration:{name}", int(pattern.get("slots", shape.top_k)), eng, sim, mask,
                             trace.experts, trace.experts))
    extra = {}
    lru = calibration.get("decisions", {}).get("lru", {})
    if "resident_step_ms" in lru:
        token = float(calibration["compute"]["token_overhead_us"])
        extra["resident_lru_us_per_layer"] = (1e3 * lru["resident_step_ms"] - token) / shape.num_layers
    return configs, extra


def compare_slice(sl: Slice, inputs: SliceInputs, profile: HardwareProfile, store: Store,
                  kernel_path: dict | None = None) -> tuple[list[Config], list[str]]:
    """Every configuration of ``sl`` with a timed engine run, in the slice's order; and notes on the others.
    ``kernel_path``: as ``validation.engine_side.engine_key``'s."""
    configs, notes = [], []
    for policy in sl.policies:
        for slots in sl.cache_slots:
            result, _ = stored_result(sl, inputs, store, policy, slots, kernel_path)
            if result is None:
                notes.append(f"{sl.name}: {policy} at {slots} slots not measured")
                continue
            if not store.path("engine", sl.name, result["key"], "-timed.npz").is_file():
                notes.append(f"{sl.name}: {policy} at {slots} slots has no timed run")
                continue
            configs.append(compare_config(sl, inputs, result, profile, store))
    return configs, notes


def long_table(configs: list[Config]) -> pd.DataFrame:
    """The long CSV: slice, config, policy, cache_slots, clock (engine, sim, sim-engine), missing (0, 1, 2+, 1+;
    hit, miss, work for the per-token parts; all), quantity, value (module docstring)."""
    rows = []
    for c in configs:
        head = {"slice": c.slice, "config": c.label, "policy": c.policy, "cache_slots": c.cache_slots}
        for clock, layers in (("engine", c.engine), ("sim", c.sim)):
            rows += [{**head, "clock": clock, "missing": m, "quantity": q, "value": v} for m, q, v in clock_rows(layers)]
        rows += [{**head, "clock": "engine", "missing": "all", "quantity": "measured_tokens_per_s",
                  "value": c.measured_tokens_per_s},
                 {**head, "clock": "engine", "missing": "all", "quantity": "timed_over_measured_us_per_layer",
                  "value": c.marks_us_per_layer},
                 {**head, "clock": "sim", "missing": "all", "quantity": "predicted_tokens_per_s",
                  "value": c.predicted_tokens_per_s},
                 {**head, "clock": "sim-engine", "missing": "all", "quantity": "miss_layers_differ",
                  "value": float(c.miss_layers_differ)},
                 {**head, "clock": "sim-engine", "missing": "all", "quantity": "routing_differs",
                  "value": float(c.routing_differs)}]
        e, s = per_token_parts(c.engine), per_token_parts(c.sim)
        total = sum(s.values()) - sum(e.values())
        for part in PARTS:
            diff = s[part] - e[part]
            rows += [{**head, "clock": "sim-engine", "missing": part, "quantity": "per_token_us", "value": diff},
                     {**head, "clock": "sim-engine", "missing": part, "quantity": "share_pct",
                      "value": 100 * diff / total if total else float("nan")}]
        rows.append({**head, "clock": "sim-engine", "missing": "all", "quantity": "token_mean_us", "value": total})
    return pd.DataFrame(rows, columns=["slice", "config", "policy", "cache_slots", "clock", "missing", "quantity",
                                       "value"])


COLUMNS = ["config", "clock", "n0", "L0", "L0|0", "L0|1+", "n1", "L1", "n2+", "L2+", "to_copy", "copy", "after", "hit/tok",
           "miss/tok", "work", "token", "tok/s"]
LEGEND = ("n0/n1/n2+: layers with 0/1/2+ experts waiting for a copy; L0/L1/L2+: their median time, start to next "
          "start (us); L0|0, L0|1+: hit layers after a hit layer, after a miss layer (layer 0 in neither); to_copy, copy, after: miss layers' median layer start -> first copy start, one copy's "
          "duration, last copy end -> layer end (us); hit/tok, miss/tok, work: per step, the hit layers' and the "
          "miss layers' summed time and the rest (us), adding up to token (the mean step, us); the engine's figures "
          "are its timed run's (marked), tok/s too")


def _row(config: str, clock: str, layers: Layers) -> dict:
    """The compact screen's line of one clock: the same figures as its ``clock_rows``, by short names."""
    value = {(missing, quantity): v for missing, quantity, v in clock_rows(layers)}
    row = {"config": config, "clock": clock}
    for name in CLASSES:
        row[f"n{name}"] = int(value[name, "layers"])
        row[f"L{name}"] = value[name, "layer_median_us"]
        if name == "0":
            for label, previous in zip(("L0|0", "L0|1+"), ("0 after 0", "0 after 1+")):
                row[label] = value[previous, "layer_median_us"]
    row.update({"to_copy": value["1+", "to_copy_median_us"], "copy": value["1+", "copy_median_us"],
                "after": value["1+", "after_copy_median_us"], "hit/tok": value["hit", "per_token_us"],
                "miss/tok": value["miss", "per_token_us"], "work": value["work", "per_token_us"],
                "token": value["all", "token_mean_us"], "tok/s": value["all", "tokens_per_s"]})
    return row


def _difference(c: Config) -> str:
    e, s = per_token_parts(c.engine), per_token_parts(c.sim)
    token = sum(e.values())
    total = sum(s.values()) - token
    parts = ", ".join(f"{p} {s[p] - e[p]:+.0f}" for p in PARTS)
    text = f"sim - engine per step {total:+.0f} us ({100 * total / token:+.1f} %) = {parts}"
    if abs(total) >= 0.02 * token:
        text += " (shares " + ", ".join(f"{p} {100 * (s[p] - e[p]) / total:.0f} %" for p in PARTS) + ")"
    if np.isfinite(c.measured_tokens_per_s):
        timed = len(c.engine.token) / (c.engine.token.sum() * 1e-6)
        text += (f"; measured repeats {c.measured_tokens_per_s:.1f} tok/s (timed run {100 * (timed / c.measured_tokens_per_s - 1):+.1f} %, "
                 f"{c.marks_us_per_layer:+.1f} us per layer), prediction {c.predicted_tokens_per_s:.1f} "
                 f"({100 * (c.predicted_tokens_per_s / c.measured_tokens_per_s - 1):+.1f} %)")
    for count, what in ((c.miss_layers_differ, "layers' missing class differs"), (c.routing_differs, "steps' routing differs")):
        if count:
            text += f"; {count} {what}"
    return "    " + text + (f"; {c.note}" if c.note else "")


def compact(configs: list[Config], extra: dict | None = None) -> str:
    """One screen: per configuration a line per clock (layer counts and median times by missing experts, the
    miss layers' parts, the per-step parts) and a line splitting the difference, with the measured repeats."""
    rows, spans = [], []
    for c in configs:
        name = f"{policy_label(c.policy, c.policy_params)}@{c.cache_slots}"
        rows += [_row(name, "engine", c.engine), _row(name, "sim", c.sim)]
        spans.append(c)
    if not rows:
        return "(no configuration with a timed run)"
    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("n0", "n1", "n2+"):
        table[col] = table[col].astype("Int64")
    body = table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.1f}").splitlines()
    out = [body[0]]
    for i, c in enumerate(spans):
        out += body[1 + 2 * i: 3 + 2 * i]
        out.append(_difference(c))
    if extra and "resident_lru_us_per_layer" in extra:
        out.append(f"calibration: LRU's all-resident decode of the training slice (no marks) takes "
                   f"{extra['resident_lru_us_per_layer']:.1f} us per layer (its median step less token_overhead, "
                   f"over layers)")
    return "\n".join(out + [LEGEND])


def write(configs: list[Config], out: Path, slice_name: str) -> Path:
    from traces.io import atomic_write
    path = Path(out) / f"timelines_{slice_name}.csv"
    table = long_table(configs)
    atomic_write(path, lambda f: table.to_csv(f, index=False))
    return path
