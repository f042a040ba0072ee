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


def _host_run(tps, before, after, causes=""):
    return {**_run(tps, causes), "host_cal_before_ms": before, "host_cal_after_ms": after}


def test_the_calibrations_host_loop_is_the_median_over_every_part_that_recorded_it():
    calibration = {"patterns": {"hits": {"host_cal_ms": [2.0, 2.2]}, "misses": {"host_cal_ms": [2.4, 9.0]},
                                "alternate": {"step_ms": [1.0]}},
                   "decisions": {"lru": {"host_cal_ms": [2.1, 2.3]}}}
    assert report.calibration_host_ms(calibration) == 2.25
    assert report.calibration_host_ms({"patterns": {"hits": {"step_ms": [1.0]}}}) is None   # recorded before it existed
    assert report.calibration_host_ms(None) is None


def test_same_host_runs_are_those_whose_both_loops_lie_within_the_band_of_the_calibrations():
    runs = [_host_run(100.0, 2.0, 2.1), _host_run(70.0, 4.0, 4.2), _host_run(90.0, 2.0, 4.1),   # slow after
            _host_run(104.0, 2.3, 1.7), _host_run(60.0, 5.0, 5.0)]
    table = report.rows([(_engine(runs), SIM)], host_ms={"s": 2.0})
    t = table[table["metric"] == "tokens_per_s"].iloc[0]
    assert t["runs_same_host"] == 2 and t["measured_same_host"] == 102.0     # 100 and 104 (2.3 and 1.7 within 20 %)
    assert t["measured"] == 90.0 and t["calibration_host_ms"] == 2.0
    text = report.summary(table, [])
    assert "in its calibration's host state" in text and "s: the calibration's host loop 2.00 ms; 2 of 5 runs" in text
    slow = report.rows([(_engine(runs), SIM)], host_ms={"s": 4.1}).query("metric == 'tokens_per_s'").iloc[0]
    assert slow["runs_same_host"] == 1 and slow["measured_same_host"] == 70.0       # 4.0 / 4.2 only


def test_without_a_calibration_host_loop_there_is_no_same_host_figure():
    runs = [_host_run(100.0, 2.0, 2.1)]
    t = report.rows([(_engine(runs), SIM)]).iloc[0]
    assert t["runs_same_host"] == 0 and math.isnan(t["measured_same_host"]) and math.isnan(t["calibration_host_ms"])
    assert "host state" not in report.summary(report.rows([(_engine(runs), SIM)]), [])
