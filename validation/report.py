"""The comparison: ``validation.csv`` in long format, ``summary.txt`` (one screen) and the data of the
predicted-against-measured plot (``plots.validation``).

``validation.csv`` has one row per configuration and metric (``tokens_per_s``, ``hit_rate``, ``misses``):
``config`` (its label, ``config_label``: slice, policy with the parameters the slice gives it, cache size), every
configuration column (slice, shape, mode, policy, ``policy_label`` (the policy with its parameters, as the sweep
names it), ``policy_params`` (those parameters as JSON, empty for none), family, cache_slots, precision), ``predicted`` (the simulator), ``measured`` (the engine: median of its runs), ``abs_err_pct``
(|predicted - measured| / measured, %), and for tokens/s the engine's noise floor ``noise_floor_pct``
(max - min over median of the runs, ``real.measurement``), ``runs``, ``measured_min``/``measured_max`` and
``within_noise`` (the error is no larger than the floor), and beside them, never instead, the same figure over
the runs that saw no outside perturbation (``measured_clean``: median tokens/s of the runs whose ``causes`` hold
none of ``host_slow``, ``clock_low``, ``gc``, ``steal``, as ``real.measurement.floor_table`` counts them;
``runs_clean``; ``signed_err_clean_pct``): on a host that switches speed, how much of an error is the host's
state during the runs rather than the model. Where the slice's calibration recorded the host's speed
(``real.calibration``'s ``host_cal_ms``), also over the runs in the calibration's own host state
(``measured_same_host``: both of a run's host calibration loops within ``SAME_HOST_PCT`` of the calibration's
median; ``runs_same_host``, ``signed_err_same_host_pct``): what the profile's host constants were measured in.
Last, on every row, the profile the predictions come from (``experiments.validate.profile_record``): ``profile``
(its name), ``profile_file`` (relative to OUT when it lies there), ``profile_sha256`` and ``profile_from``
(``fitted`` from OUT's calibrations, or ``--profile``); the summary's first line names the same.

Policy families (``family``), from what the policy's class is, whoever wrote it: ``lossy`` (``lossless`` False: runs
other experts than routed), ``bound`` (the oracle, ``policies.oracle_prefetch.OraclePrefetch``), ``prefetching``
(overrides the ``prefetch`` hook: trace-based or predictive prefetch), ``on-demand`` (keeps the base class's
``prefetch``, which never prefetches: LRU, LFU, FIFO, static, Belady, and a user's policy that only chooses victims;
their hits do not depend on timing, so both clocks must count them identically).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from policies.registry import policy_label as sweep_policy_label
from offload.policy import Policy
from policies.registry import resolve_policy
from real.measurement import PERTURBATIONS, spread_pct     # the causes from outside the engine's own work
from validation.store import digest

METRICS = ("tokens_per_s", "hit_rate", "misses")
# a run is in the calibration's host state when both its host calibration loops are within this of the
# calibration's median (the same band as real.measurement.Discipline.host_slow_pct: the two speeds seen on the
# H200's host are ~1 : 2 apart, its jitter within a state a few %)
SAME_HOST_PCT = 20.0


def calibration_host_ms(calibration: dict | None) -> float | None:
    """The median of the host calibration loop (ms) over every part of a slice's calibration that recorded it
    (the patterns, a live model's resident decode, each policy's decision costs); None if none did (a
    calibration from before the loop was recorded)."""
    if not calibration:
        return None
    parts = [*calibration.get("patterns", {}).values(), *calibration.get("decisions", {}).values()]
    values = [v for part in parts if isinstance(part, dict) for v in part.get("host_cal_ms", [])]
    return float(np.median(values)) if values else None


def family(policy: str) -> str:
    """The policy's family (module docstring), from its class: a user's policy file is filed by what it overrides,
    as a built-in one is, not by its name."""
    cls = resolve_policy(policy)
    if not cls.lossless:
        return "lossy"
    if cls is resolve_policy("oracle"):
        return "bound"
    return "on-demand" if cls.prefetch is Policy.prefetch else "prefetching"


def policy_label(policy: str, params: dict | None = None) -> str:
    """``policy`` with the parameters given to it, sorted by name, as the sweep and the engine commands name it
    (``oracle policy.cross_tokens=false``); its name alone when it is given none."""
    return sweep_policy_label(policy, sorted((params or {}).items()))


def config_label(slice_name: str, policy: str, params: dict | None, slots: int) -> str:
    """A configuration's label: ``slice:policy:slots``, the policy with its parameters (``policy_label``), so two
    configurations of one policy at other parameters are told apart."""
    return f"{slice_name}:{policy_label(policy, params)}:{slots}"


def _same_host(run: dict, host_ms: float) -> bool:
    band = host_ms * SAME_HOST_PCT / 100
    return all(abs(run.get(k, float("nan")) - host_ms) <= band for k in ("host_cal_before_ms", "host_cal_after_ms"))


def measured(engine: dict, host_ms: float | None = None) -> dict:
    """The engine's figures of one configuration: median tokens/s, hit rate and misses over its runs, their
    min and max, the run count and the noise floor (spread); the same median over the runs without an outside
    perturbation (``clean``) and, given the calibration's host loop ``host_ms``, over the runs in its host
    state (``same_host``). A result whose runs were not kept carries these in ``summary``
    (``import_summary``)."""
    runs = [r for r in engine["runs"] if not r.get("error")]
    if not runs:
        summary = dict(engine["summary"])
        if summary["runs"] < 2:
            summary["floor"] = float("nan")      # one run has no floor
        return summary
    tps = [r["tokens_per_s"] for r in runs]
    clean = [r["tokens_per_s"] for r in runs if not PERTURBATIONS & set((r.get("causes") or "").split(";"))]
    same = [r["tokens_per_s"] for r in runs if host_ms is not None and _same_host(r, host_ms)]
    return {"tokens_per_s": float(np.median(tps)), "hit_rate": float(np.median([r["hit_rate"] for r in runs])),
            "misses": float(np.median([r["misses"] for r in runs])), "min": min(tps), "max": max(tps),
            "runs": len(tps), "floor": spread_pct(tps),
            "clean": float(np.median(clean)) if clean else float("nan"), "clean_runs": len(clean),
            "same_host": float(np.median(same)) if same else float("nan"), "same_host_runs": len(same)}


def import_summary(table: pd.DataFrame, note: str) -> list[dict]:
    """Engine results holding only the figures of an earlier ``validation.csv`` (its measured columns), for
    configurations whose runs did not survive: ``note`` says why. Predictions are recomputed from them."""
    out = []
    for _, g in table.groupby("config", sort=False):
        by = {r.metric: r for r in g.itertuples()}
        t = by["tokens_per_s"]
        params = _params_of(getattr(t, "policy_params", None))
        # keyed by the configuration's fields, not its label: the keys of tables without parameters stay as they were
        key = f"summary-{t.slice}-{t.policy}-{int(t.cache_slots)}".replace(":", "-") + (
            f"-{digest(params)[:8]}" if params else "")
        out.append({"key": key, "slice": t.slice, "policy": t.policy, "policy_params": params,
                    "cache_slots": int(t.cache_slots), "mode": t.mode, "shape": t.shape, "precision": t.precision,
                    "runs": [], "note": note,
                    "summary": {"tokens_per_s": t.measured, "hit_rate": by["hit_rate"].measured,
                                "misses": by["misses"].measured, "min": t.measured_min, "max": t.measured_max,
                                "runs": int(t.runs), "floor": t.noise_floor_pct if t.runs > 1 else float("nan")}})
    return out


def _params_of(text) -> dict:
    """A ``policy_params`` cell of ``validation.csv`` (JSON) as a dict; {} for an empty cell or a table from before
    the column."""
    return json.loads(text) if isinstance(text, str) and text else {}


def rows(pairs: list[tuple[dict, dict]], host_ms: dict[str, float | None] | None = None) -> pd.DataFrame:
    """The long table from (engine result, prediction) pairs; ``host_ms``: per slice, its calibration's host
    loop (``calibration_host_ms``), for the runs in the calibration's host state. An engine result's
    ``policy_params`` (the parameters its slice gave the policy) enter its label."""
    out = []
    for engine, sim in pairs:
        cal_host = (host_ms or {}).get(engine["slice"])
        m = measured(engine, cal_host)
        params = engine.get("policy_params") or {}
        columns = {"slice": engine["slice"], "shape": engine["shape"], "mode": engine["mode"],
                   "policy": engine["policy"], "policy_label": policy_label(engine["policy"], params),
                   "policy_params": json.dumps(params, sort_keys=True) if params else "",
                   "family": family(engine["policy"]), "cache_slots": engine["cache_slots"],
                   "precision": engine["precision"], "compute_basis": sim.get("compute_basis")}
        label = config_label(engine["slice"], engine["policy"], params, engine["cache_slots"])
        for metric in METRICS:
            v, p = m[metric], float(sim[metric])
            err = 100 * abs(p - v) / v if v else (0.0 if p == v else float("inf"))
            row = {"config": label, **columns, "metric": metric, "predicted": p, "measured": v, "abs_err_pct": err,
                   "signed_err_pct": 100 * (p - v) / v if v else float("nan")}
            if metric == "tokens_per_s":
                row.update(noise_floor_pct=m["floor"], runs=m["runs"], measured_min=m["min"], measured_max=m["max"],
                           within_noise=bool(err <= m["floor"]), raw_runs=bool(engine["runs"]),
                           measured_clean=m.get("clean", float("nan")), runs_clean=m.get("clean_runs", 0),
                           signed_err_clean_pct=100 * (p - m["clean"]) / m["clean"] if m.get("clean") else float("nan"),
                           calibration_host_ms=float("nan") if cal_host is None else cal_host,
                           measured_same_host=m.get("same_host", float("nan")), runs_same_host=m.get("same_host_runs", 0),
                           signed_err_same_host_pct=(100 * (p - m["same_host"]) / m["same_host"] if m.get("same_host")
                                                     else float("nan")))
            out.append(row)
    return pd.DataFrame(out)


def ranking(table: pd.DataFrame) -> pd.DataFrame:
    """Per (shape, cache size): the fastest lossless non-oracle policy by each clock, and whether the
    simulator's pick is the engine's or within the engine's noise floor of it."""
    t = table[(table["metric"] == "tokens_per_s") & table["family"].isin(["on-demand", "prefetching"])]
    out = []
    for (shape, slots), g in t.groupby(["shape", "cache_slots"], sort=True):
        if len(g) < 2:
            continue
        sim_pick = g.loc[g["predicted"].idxmax()]
        eng_pick = g.loc[g["measured"].idxmax()]
        gap = 100 * (eng_pick["measured"] - sim_pick["measured"]) / eng_pick["measured"]
        floors = [f for f in (sim_pick["noise_floor_pct"], eng_pick["noise_floor_pct"]) if not np.isnan(f)]
        floor = max(floors) if floors else float("nan")     # one run each: no floor, so nothing is within it
        same = sim_pick["policy_label"] == eng_pick["policy_label"]      # one policy at other parameters is another
        out.append({"shape": shape, "cache_slots": slots, "sim_fastest": sim_pick["policy_label"],
                    "engine_fastest": eng_pick["policy_label"], "gap_pct": gap, "noise_floor_pct": floor,
                    "same_policy": same, "same_or_within_noise": same or gap <= floor})
    return pd.DataFrame(out)


def summary(table: pd.DataFrame, notes: list[str], heading: list[str] = ()) -> str:
    """One screen: error of tokens/s per shape and per family, the noise floor, hit/miss agreement and the
    ranking, read against the goals (median <= 3 %, max <= 8 %); ``heading``'s lines first (the profile the
    predictions come from)."""
    if table.empty:
        return "".join(f"{line}\n" for line in heading) + "no configuration measured yet\n"
    t = table[table["metric"] == "tokens_per_s"]
    single = int((t["runs"] < 2).sum())
    lines = [*heading, f"tokens/s: {len(t)} configurations over {t['shape'].nunique()} shapes and {t['policy'].nunique()} "
             f"policies; |error| median {t['abs_err_pct'].median():.1f} %, max {t['abs_err_pct'].max():.1f} % "
             f"(goal 3 % / 8 %); engine noise floor median {t['noise_floor_pct'].median():.1f} %, max "
             f"{t['noise_floor_pct'].max():.1f} %" + (f" (not known for {single} configurations of one run)" if single else "")
             + f"; errors within the floor: {int(t['within_noise'].sum())}/{len(t)}",
             f"signed error (simulator - engine): median {t['signed_err_pct'].median():+.1f} %"]
    clean = t.dropna(subset=["signed_err_clean_pct"])
    if len(clean):      # a diagnostic beside the figures above, never instead of them
        lines.append(f"against each configuration's runs without an outside perturbation (no host_slow, clock_low, gc "
                     f"or steal), at the {len(clean)} of {len(t)} configurations that have any: |error| median "
                     f"{clean['signed_err_clean_pct'].abs().median():.1f} %, max {clean['signed_err_clean_pct'].abs().max():.1f} %, "
                     f"signed median {clean['signed_err_clean_pct'].median():+.1f} %")
    same = t.dropna(subset=["signed_err_same_host_pct"])
    if len(same):
        lines.append(f"against each configuration's runs in its calibration's host state (host loop within "
                     f"{SAME_HOST_PCT:.0f} % of the calibration's), at the {len(same)} of {len(t)} configurations that "
                     f"have any: |error| median {same['signed_err_same_host_pct'].abs().median():.1f} %, max "
                     f"{same['signed_err_same_host_pct'].abs().max():.1f} %, signed median "
                     f"{same['signed_err_same_host_pct'].median():+.1f} %")
    for name, g in t.dropna(subset=["calibration_host_ms"]).groupby("slice", sort=True):
        lines.append(f"  {name}: the calibration's host loop {g['calibration_host_ms'].iloc[0]:.2f} ms; "
                     f"{int(g['runs_same_host'].sum())} of {int(g['runs'].sum())} runs in that state")
    lines.append("")
    t = t.assign(within_noise=t["within_noise"].astype(int))     # a count per group, also of one configuration
    for by in ("shape", "family"):
        g = t.groupby(by).agg(configs=("abs_err_pct", "size"), err_median=("abs_err_pct", "median"),
                              err_max=("abs_err_pct", "max"), signed_median=("signed_err_pct", "median"),
                              floor_median=("noise_floor_pct", "median"), within=("within_noise", "sum"),
                              clean_signed_median=("signed_err_clean_pct", "median"))
        lines += [f"by {by}:", g.to_string(float_format=lambda x: f"{x:.1f}"), ""]
    h = table[(table["metric"].isin(["hit_rate", "misses"])) & (table["family"] == "on-demand")]
    if len(h):          # (a grid of prefetching policies only has none)
        same = h.groupby("config").apply(lambda g: bool((g["predicted"] == g["measured"]).all()), include_groups=False)
        lines.append(f"hits and misses identical in both clocks (on-demand policies): {int(same.sum())}/{len(same)}"
                     + ("" if same.all() else f"; differ: {', '.join(same.index[~same.values])}"))
    other = table[(table["metric"] == "hit_rate") & (table["family"] != "on-demand")]
    if len(other):
        lines.append(f"hit rate, timing-dependent policies: |error| median {other['abs_err_pct'].median():.2f} %, "
                     f"max {other['abs_err_pct'].max():.2f} %")
    r = ranking(table)
    if len(r):
        lines += ["", f"ranking (fastest lossless non-oracle policy), at {len(r)} (shape, cache size): the same policy "
                      f"at {int(r['same_policy'].sum())}, the same or within the engine's noise floor of it at "
                      f"{int(r['same_or_within_noise'].sum())}",
                  r.to_string(index=False, float_format=lambda x: f"{x:.1f}")]
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"
