"""validation.report's figure over the runs without an outside perturbation: beside the median of all runs,
never instead of it."""
import math

from validation import report


def _engine(runs, policy="lru", slots=4):
    return {"slice": "s", "shape": "moe-lm", "mode": "replay", "policy": policy, "cache_slots": slots,
            "precision": "bf16", "runs": runs}


def _run(tps, causes=""):
    return {"tokens_per_s": tps, "hit_rate": 0.5, "misses": 10, "causes": causes, "error": None}


SIM = {"tokens_per_s": 110.0, "hit_rate": 0.5, "misses": 10, "compute_basis": "measured"}


def test_clean_median_leaves_out_perturbed_runs_and_keeps_the_all_runs_figure():
    runs = [_run(100.0), _run(80.0, "host_slow"), _run(104.0, "halves"), _run(70.0, "gc;host_slow"), _run(102.0)]
    table = report.rows([(_engine(runs), SIM)])
    t = table[table["metric"] == "tokens_per_s"].iloc[0]
    assert t["measured"] == 100.0                      # the median of all five runs is unchanged
    assert t["measured_clean"] == 102.0                # 100, 104 ('halves' is the engine's own), 102
    assert t["runs_clean"] == 3
    assert math.isclose(t["signed_err_clean_pct"], 100 * (110 - 102) / 102)
    assert math.isclose(t["signed_err_pct"], 10.0)


def test_no_clean_run_gives_nan_and_the_summary_counts_only_configurations_with_some():
    perturbed = _engine([_run(90.0, "host_slow"), _run(95.0, "steal")], slots=2)
    clean = _engine([_run(100.0), _run(100.0)], slots=4)
    table = report.rows([(perturbed, SIM), (clean, SIM)])
    t = table[table["metric"] == "tokens_per_s"].set_index("cache_slots")
    assert math.isnan(t.loc[2, "measured_clean"]) and t.loc[2, "runs_clean"] == 0
    text = report.summary(table, [])
    assert "at the 1 of 2 configurations that have any: |error| median 10.0 %, max 10.0 %" in text


def test_runs_without_causes_recorded_count_as_clean():
    runs = [{"tokens_per_s": 50.0, "hit_rate": 0.5, "misses": 1, "error": None}]     # an older store's run
    t = report.rows([(_engine(runs), SIM)]).iloc[0]
    assert t["measured_clean"] == 50.0 and t["runs_clean"] == 1
