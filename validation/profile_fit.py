"""The calibration's raw micro-benchmarks (``real.calibration``) turned into the hardware profile the simulator
reads, each constant from one micro-benchmark and nothing from the runs being validated:

- the copy model: the link's measured copy table (``real.profile_hw.measure_copies``);
- ``attention_us_by_ctx``, ``router_us``, ``expert_us``, ``token_overhead_us``: the kernels, timed alone;
- ``layer_overhead_us``: the ``hits`` pattern (no copy at all): each step's wall time minus the kernels it
  ran, per layer (median over steps); for a live model, its all-resident live decode of training text
  (``resident-live``: a live run combines its experts inside the captured graph, a forced pattern eagerly);
- ``miss_latency_us``: the ``misses`` pattern's host clock from each layer's routing read-back to its first
  demand copy's issue (``miss_issue_us``, median over layers, the first step left out); a calibration
  without it (recorded before it was measured) leaves it out, and ``copy_wait_us`` then holds it as before;
- ``prefetch_latency_us``: the ``hits`` pattern's host clock from each layer's routing read-back to the start
  of its prefetch decision (``decide_us``, median over layers, the first step recorded left out): the launches of the
  layer's experts and of the next layer's attention, which the engine does before it decides; a calibration
  without it leaves it out (0: a prefetch decided at the host's decision time, as before);
- ``copy_wait_us``: the ``misses`` pattern (every expert copied on demand): each step's wall time minus the
  simulator's prediction of that same pattern with everything above (``miss_latency_us`` included) and no
  wait, per layer (every layer of that pattern waits on its last copy exactly once);
- ``decision_us``: per policy, its host work per layer (the controller's ``begin_layer`` and
  ``prefetch_layer``) over LRU's, from runs on a training slice;
- ``layer_extra_us``: per policy, its all-resident step time over LRU's, per layer, less what of its
  decision the layer's experts do not hide in the simulator's own model (so the two are not counted twice).

A constant that comes out negative (noise, or an effect the model lacks) is kept at 0 and reported.
"""
from __future__ import annotations

import numpy as np

from hardware.profile import MEASURED_DIMS, HardwareProfile, hardware_from_dict, hardware_to_dict
from policies.registry import resolve_policy
from traces import ModelShape
from traces.synthetic import PATTERNS, pattern_trace

SKIP_STEPS = 1      # a pattern run's first step fills the cache (hits) or carries first-touch costs


def _median_steps_us(pattern: dict) -> np.ndarray:
    return 1e3 * np.asarray(pattern["step_ms"][SKIP_STEPS:], dtype=np.float64)


def kernels_us(compute: dict, shape: ModelShape, positions: np.ndarray) -> np.ndarray:
    """Each step's kernel time (us) at its position: per-token work plus, per layer, attention at that
    context, the router and top-k experts."""
    ctx = sorted((int(c), float(t)) for c, t in compute["attention_us_by_ctx"].items())
    attention = np.interp(positions, [c for c, _ in ctx], [t for _, t in ctx])
    return compute["token_overhead_us"] + shape.num_layers * (
        attention + compute["router_us"] + shape.top_k * compute["expert_us"])


def measured_entry(calibration: dict, profile_so_far: HardwareProfile | None = None) -> tuple[dict, dict]:
    """(the profile's ``measured_compute`` entry for the calibrated model, notes: what each constant came
    from and what was clamped). ``profile_so_far``: a profile holding the copy model, for ``copy_wait_us``
    (which needs the simulator's prediction of the misses pattern, with ``miss_latency_us`` in it); None leaves
    ``copy_wait_us`` at 0."""
    shape = ModelShape.from_dict(calibration["shape"])
    compute = calibration["compute"]
    notes: dict = {}
    hits = calibration["patterns"]["hits"]
    steps = _median_steps_us(hits)
    positions = np.arange(SKIP_STEPS, SKIP_STEPS + len(steps))
    overhead = float(np.median((steps - kernels_us(compute, shape, positions)) / shape.num_layers))
    notes["layer_overhead_us_raw"] = overhead
    live = calibration["patterns"].get("resident-live")
    if live is not None:
        steps_live = 1e3 * np.asarray(live["step_ms"], dtype=np.float64)
        live_overhead = float(np.median((steps_live - kernels_us(compute, shape, np.asarray(live["positions"])))
                                        / shape.num_layers))
        notes["layer_overhead_us_live_raw"] = live_overhead
    entry = {"attention_us_by_ctx": {int(c): float(t) for c, t in compute["attention_us_by_ctx"].items()},
             "router_us": float(compute["router_us"]), "expert_us": float(compute["expert_us"]),
             "token_overhead_us": float(compute["token_overhead_us"]),
             "layer_overhead_us": round(max(0.0, overhead), 2), "copy_wait_us": 0.0, "decision_us": {},
             "layer_extra_us": {}, "shape": {dim: getattr(shape, dim) for dim in MEASURED_DIMS}}
    # host clock stamps, one per layer: the first step carries first-touch costs (the hits pattern's first step,
    # which copies, records none, so there its first recorded step is left out)
    for pattern, stamps, constant in (("misses", "miss_issue_us", "miss_latency_us"),
                                      ("hits", "decide_us", "prefetch_latency_us")):
        values = calibration["patterns"].get(pattern, {}).get(stamps)
        if values:
            us = np.asarray(values, dtype=np.float64)
            skip = SKIP_STEPS * shape.num_layers
            latency = float(np.median(us[skip:] if len(us) > skip else us))
            notes[f"{constant}_raw"] = latency
            entry[constant] = round(max(0.0, latency), 2)
    decisions = calibration.get("decisions", {})
    base = decisions.get("lru")
    if base is not None:
        base_us = base["begin_layer_us"] + base["prefetch_layer_us"]
        for policy, d in decisions.items():
            extra = d["begin_layer_us"] + d["prefetch_layer_us"] - base_us
            notes[f"decision_us_raw[{policy}]"] = extra
            if policy != "lru":
                entry["decision_us"][resolve_policy(policy).__name__] = round(max(0.0, extra), 2)
        experts_us = shape.top_k * float(compute["expert_us"])
        for policy, d in decisions.items():
            if policy == "lru" or "resident_step_ms" not in d or "resident_step_ms" not in base:
                continue
            per_layer = 1e3 * (d["resident_step_ms"] - base["resident_step_ms"]) / shape.num_layers
            # the simulator lets the decision overlap the layer's experts; only the rest shows per layer
            unhidden = max(0.0, entry["decision_us"].get(resolve_policy(policy).__name__, 0.0) - experts_us)
            notes[f"layer_extra_us_raw[{policy}]"] = per_layer - unhidden
            entry["layer_extra_us"][resolve_policy(policy).__name__] = round(max(0.0, per_layer - unhidden), 2)
    if profile_so_far is not None:
        misses = calibration["patterns"]["misses"]
        measured = _median_steps_us(misses)
        partial = _with_entry(profile_so_far, shape.name, calibration["precision"], entry)
        predicted = _predict_pattern(partial, shape, "misses", len(misses["step_ms"]),
                                     calibration["precision"])[SKIP_STEPS:]
        wait = float(np.median((measured - predicted) / shape.num_layers))
        notes["copy_wait_us_raw"] = wait
        copy_ms = [c for c in misses.get("copy_ms", []) if c > 0]
        if copy_ms:
            expert_bytes = shape.expert_bytes(calibration["precision"])
            notes["engine_copy_us_median"] = 1e3 * float(np.median(copy_ms))
            notes["profile_copy_us"] = profile_so_far.copy.copy_ns(expert_bytes) / 1e3
        entry["copy_wait_us"] = round(max(0.0, wait), 2)
    if live is not None:     # the forced patterns' overhead served to isolate copy_wait; live runs have their own
        entry["layer_overhead_us"] = round(max(0.0, live_overhead), 2)
    return entry, notes


FITTED_ON = {"layer_overhead_us": "hits", "prefetch_latency_us": "hits", "miss_latency_us": "misses",
             "copy_wait_us": "misses"}     # the per-layer constants fitted on a calibration pattern: which one


def clamped_constants(model_notes: dict, num_layers: int, step_ms: dict[str, float],
                      share: float = 0.01) -> list[str]:
    """The per-layer constants of one model's fit (``measured_entry``'s notes) that came out negative, were kept
    at 0 and so move the prediction of the pattern they were fitted on (``FITTED_ON``) by more than ``share`` of
    its measured median step (``step_ms``: {pattern: ms}), each as "name raw us (ms a step, % of the pattern's
    step)", e.g. "layer_overhead_us -23.3 us (+0.373 ms a step, 43 % of the hits pattern's)". The hits pattern's
    overhead is left out where a live decode's own replaces it (then the live one is named)."""
    out = []
    for constant, pattern in FITTED_ON.items():
        raw = model_notes.get(f"{constant}_raw")
        if constant == "layer_overhead_us" and "layer_overhead_us_live_raw" in model_notes:
            raw = model_notes["layer_overhead_us_live_raw"]
        step = step_ms.get(pattern)
        if raw is None or raw >= 0 or not step:
            continue
        effect_ms = -raw * num_layers / 1e3
        if effect_ms > share * step:
            out.append(f"{constant} {raw:.1f} us (+{effect_ms:.3f} ms a step, {100 * effect_ms / step:.0f} % of "
                       f"the {pattern} pattern's)")
    return out


def _with_entry(profile: HardwareProfile, model: str, precision: str, entry: dict) -> HardwareProfile:
    data = hardware_to_dict(profile)
    data["measured_compute"] = {**data.get("measured_compute", {}), model: {precision: entry}}
    return hardware_from_dict(data, origin=f"{profile.name} + {model}")


def _predict_pattern(profile: HardwareProfile, shape: ModelShape, pattern: str, steps: int,
                     precision: str) -> np.ndarray:
    """The simulator's step times (us) of a calibration pattern, as the engine ran it (LRU, top-k slots, the
    calibration's precision: its measured compute is keyed by it)."""
    from offload.session import RunSettings
    from policies.lru import LRU
    from sim.simulator import simulate
    trace = pattern_trace(shape, steps, pattern)
    result = simulate(trace, LRU, profile, RunSettings(cache_slots=shape.top_k, precision=precision))
    return np.asarray(result.token_ns, dtype=np.float64) / 1e3


def pattern_check(calibration: dict, profile: HardwareProfile) -> dict[str, tuple[float, float]]:
    """Each calibration pattern's median step (ms; its first step left out, as the fit leaves it out), as the
    simulator predicts it with ``profile`` and as the engine measured it (unmarked): {pattern: (predicted,
    measured)}. ``hits`` and ``misses`` are what the constants were fitted on; ``alternate`` (a hit layer after
    every miss layer) is held out of the fit, so its error tests the model where the two meet. A live model's
    profile takes its per-layer overhead from its own decode, not the forced patterns: there all three move
    together."""
    shape = ModelShape.from_dict(calibration["shape"])
    out = {}
    for name, pattern in calibration.get("patterns", {}).items():
        if name not in PATTERNS or not pattern.get("step_ms"):
            continue
        predicted = _predict_pattern(profile, shape, name, len(pattern["step_ms"]),
                                     calibration.get("precision", "bf16"))[SKIP_STEPS:]
        out[name] = (float(np.median(predicted)) / 1e3, float(np.median(_median_steps_us(pattern))) / 1e3)
    return out


def fit_profile(base: HardwareProfile, name: str, device: str, copies: dict, calibrations: list[dict],
                command: str = "python -m experiments.validate") -> tuple[dict, dict]:
    """(the measured profile in the YAML layout, notes per model). ``base``: the constants nothing here
    measures (HBM bandwidth and launch costs of the analytic model, copy engines); ``copies``: the copy
    table; ``calibrations``: one per model; ``command``: the command that calibrated, named in the
    profile's description with the precisions it calibrated."""
    data = hardware_to_dict(base)
    data.pop("pcie_GBps", None)
    precisions = ", ".join(sorted({c["precision"] for c in calibrations}))
    calibrated = f"calibrated by {command}" + (f" in {precisions}" if precisions else "")
    data.update(name=name, description=f"{device}, {calibrated} (base: {base.name})",
                source="real.calibration micro-benchmarks on this machine, turned into constants by "
                       "validation.profile_fit: copies one at a time, kernels alone, synthetic hit/miss "
                       "patterns, each policy's host work on a training slice",
                copy_latency_us=copies["copy_latency_us"],
                h2d_GBps_by_MiB={float(k) if "." in str(k) else int(k): v for k, v in copies["h2d_GBps_by_MiB"].items()},
                measured_compute={})
    notes = {}
    profile = hardware_from_dict(data, origin=name)
    for calibration in calibrations:
        entry, model_notes = measured_entry(calibration, profile)
        model = calibration["shape"]["name"]
        data["measured_compute"].setdefault(model, {})[calibration["precision"]] = entry
        notes[model] = model_notes
    hardware_from_dict(data, origin=name)       # raises HardwareProfileError naming the field
    return data, notes


def copy_table(device) -> dict:
    """The link's copy table on ``device`` (``real.profile_hw.measure_copies``) as the fit and the stores
    keep it: the device's name, the latency (us) and GB/s by copy size in MiB (keys as text)."""
    import torch
    from real.profile_hw import COPY_SIZES_MIB, measure_copies
    cuda = device.type == "cuda"
    latency_us, table = measure_copies(device, sizes_MiB=COPY_SIZES_MIB if cuda else COPY_SIZES_MIB[:3])
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "copy_latency_us": latency_us,
            "h2d_GBps_by_MiB": {str(k): v for k, v in table.items()}}


def calibrate_and_fit(model, shape: ModelShape, base: HardwareProfile, name: str, precision: str, device,
                      policies, settings, slots: int, train, prefetch_depth: int, predictors_at=None,
                      train_prompts=None, new_tokens: int = 0,
                      command: str = "python -m experiments.validate",
                      on_error=None) -> tuple[dict, dict, dict]:
    """One model's whole calibration on this machine, fitted: (the profile in the YAML layout, the raw
    calibration, the fit's notes). The copy table (``real.profile_hw.measure_copies``), the model's
    micro-benchmarks (``real.calibration.calibrate_model``, with a live model's training-text decode when
    ``train_prompts`` are given) and ``policies``' host work and all-resident steps
    (``real.calibration.calibrate_policies``, on the training slice ``train``), turned into constants by
    ``fit_profile`` over ``base``. ``model``: a ``real.model.MoEModel`` with its experts on the host;
    ``device``: the torch device it computes on; ``command``: the command calibrating, named in the profile;
    ``on_error``: ``calibrate_policies``'s."""
    from real.calibration import calibrate_model, calibrate_policies
    copies = copy_table(device)
    device_name = copies["device"]
    raw = calibrate_model(model, shape, live_prompts=train_prompts, new_tokens=new_tokens)
    decisions, failed = calibrate_policies(model, shape, policies, settings, slots, train, prefetch_depth,
                                           predictors_at, train_prompts, new_tokens, on_error)
    calibration = {"shape": shape.to_dict(), "precision": precision, "device": device_name, **raw,
                   "decisions": decisions, "failed": failed, "copies": copies}
    data, notes = fit_profile(base, name, device_name, copies, [calibration], command)
    return data, calibration, notes
