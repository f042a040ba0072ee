"""The simulator's prediction of every engine result of a slice: the same timed steps (``SliceInputs.timed``),
the same training slice, policy and settings, on the calibrated profile. Stored per result, keyed by the
engine result's key, the profile's content and the simulator's code (``validation.store``)."""
from __future__ import annotations

import json

import numpy as np

from hardware.profile import HardwareProfile, hardware_to_dict
from offload.metrics import tpot_summary
from policies.registry import resolve_policy
from sim.simulator import simulate
from validation.scenario import Slice
from validation.store import Store, digest, sim_code


def fallback_note(profile: HardwareProfile, shape, precision: str) -> str | None:
    """None when ``profile`` holds measured compute for ``shape`` at ``precision``; else which model the
    simulator falls back to, and the error to expect from it."""
    if profile.compute_cost(shape, precision).basis == "measured":
        return None
    return (f"{profile.name} has no measured compute for {shape.name} at {precision}: the simulator uses the analytic "
            f"model (weight bytes over HBM bandwidth plus kernel launches, host costs from the profile's defaults). "
            f"On the H200's calibrated shapes that model's layer takes 0.24-0.67x the measured one (its experts are "
            f"within -3..+36 %, but it charges 5 us of host overhead a layer where 44-265 us were measured), so expect "
            f"it to be optimistic by as much; calibrate the shape with python -m experiments.validate (a replay slice "
            f"of random weights needs no checkpoint)")


def predict(sl: Slice, inputs, result: dict, profile: HardwareProfile, store: Store,
            record: dict[str, str] | None = None) -> dict:
    """The prediction of one engine result (``validation.engine_side``), computed once per inputs; ``record``
    (the profile's name, file and sha256, as the report records them) is written into a new prediction, so a
    prediction in sim/ names the profile that made it (one found by its key was made by a profile of the same
    content)."""
    key = digest({"engine": result["key"], "profile": json.dumps(hardware_to_dict(profile), sort_keys=True),
                  "code": sim_code()})
    path = store.path("sim", sl.name, result["key"])
    found = store.read(path)
    if found is not None and found.get("key") == key:
        return found
    cls = resolve_policy(result["policy"])
    run = simulate(inputs.timed, cls, profile, sl.settings(result["cache_slots"], result["policy"]), train_trace=inputs.train)
    token_ns = np.asarray(run.token_ns, dtype=np.int64)[inputs.mask[:len(run.token_ns)]]
    timing = tpot_summary(token_ns)
    m = run.metrics
    found = {"key": key, "engine_key": result["key"], "slice": sl.name, "policy": result["policy"],
             "cache_slots": result["cache_slots"], "tokens_per_s": timing["tokens_per_s"],
             "tpot_ms_mean": timing["tpot_ms_mean"], "hit_rate": m["hit_rate"], "misses": m["misses"],
             "copies": m["copies"], "stall_ms_per_token": m.get("stall_ms_per_token"), "sim_path": run.path,
             "compute_basis": profile.compute_cost(inputs.shape, sl.precision).basis,
             **(record or {}), "token_ns": token_ns.tolist()}
    store.write(path, found)
    return found
