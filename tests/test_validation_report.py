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


def test_a_policy_is_filed_by_the_hooks_its_class_overrides_whoever_wrote_it(tmp_path):
    """``family`` reads the class: a user's policy file that only chooses victims is on-demand like LRU (it was
    filed under prefetching for not being a built-in), one that overrides ``prefetch`` is prefetching, one that is
    not lossless is lossy; the built-ins keep their families, the oracle under any spelling of it."""
    mine = tmp_path / "my_policy.py"
    mine.write_text(
        "from offload.policy import Policy\nfrom policies.lru import LRU\n\n\n"
        "class Victims(Policy):\n    def choose_victim(self, scope, cache, job):\n"
        "        return next(iter(cache.evictable(scope)), None)\n\n\n"
        "class MyLRU(LRU):\n    pass\n\n\n"
        "class Ahead(LRU):\n    def prefetch(self, access):\n        return []\n\n\n"
        "class Skips(LRU):\n    lossless = False\n")
    families = {name: report.family(f"{mine}:{name}") for name in ("Victims", "MyLRU", "Ahead", "Skips")}
    assert families == {"Victims": "on-demand", "MyLRU": "on-demand", "Ahead": "prefetching", "Skips": "lossy"}
    builtin = {p: report.family(p) for p in ("lru", "lfu", "fifo", "static", "belady", "oracle", "affinity",
                                             "mixtral-offloading", "lookahead", "speculating-experts",
                                             "speculating-experts-lossy", "policies.oracle_prefetch:OraclePrefetch")}
    assert builtin == {"lru": "on-demand", "lfu": "on-demand", "fifo": "on-demand", "static": "on-demand",
                       "belady": "on-demand", "oracle": "bound", "affinity": "prefetching",
                       "mixtral-offloading": "prefetching", "lookahead": "prefetching",
                       "speculating-experts": "prefetching", "speculating-experts-lossy": "lossy",
                       "policies.oracle_prefetch:OraclePrefetch": "bound"}


def test_a_configurations_label_names_its_policy_parameters_in_a_stable_order():
    """Two configurations of one policy at other parameters (two slices of one shape) get two labels, the sweep's
    ``oracle policy.cross_tokens=false`` in each, parameters sorted by name; the ranking tells them apart; a policy
    without parameters keeps its plain label (stored bundles' labels unchanged)."""
    plain, _ = _pair_of("a", "oracle", {}, 100.0, 100.0)
    given, _ = _pair_of("b", "oracle", {"lookahead": 2, "cross_tokens": False}, 90.0, 120.0)
    table = report.rows([(plain, SIM), (given, SIM)])
    assert sorted(set(table["config"])) == ["a:oracle:4", "b:oracle policy.cross_tokens=false policy.lookahead=2:4"]
    t = table[table["metric"] == "tokens_per_s"].set_index("slice")
    assert t.loc["b", "policy_label"] == "oracle policy.cross_tokens=false policy.lookahead=2"
    assert t.loc["a", "policy_label"] == "oracle" and t.loc["a", "policy_params"] == ""
    pairs = [_pair_of("a", "lru", {}, 100.0, 90.0), _pair_of("a", "mixtral-offloading", {}, 80.0, 100.0),
             _pair_of("b", "mixtral-offloading", {"min_score": 0.5}, 120.0, 95.0)]
    ranked = report.ranking(report.rows(pairs)).iloc[0]
    assert ranked["sim_fastest"] == "mixtral-offloading"
    assert ranked["engine_fastest"] == "mixtral-offloading policy.min_score=0.5"
    assert not ranked["same_policy"]


def test_summary_only_results_keep_their_keys_and_their_parameters():
    """``import_summary`` keys a result by its configuration's fields, as before for a policy without parameters,
    and gives a parameterised one its parameters back (its label) and a key of its own."""
    table = report.rows([_pair_of("s", "oracle", {}, 100.0, 100.0),
                         _pair_of("s", "oracle", {"cross_tokens": False}, 90.0, 100.0, slots=4)])
    imported = report.import_summary(table, "runs lost")
    assert imported[0]["key"] == "summary-s-oracle-4" and imported[0]["policy_params"] == {}
    assert imported[1]["key"].startswith("summary-s-oracle-4-") and imported[1]["policy_params"] == {"cross_tokens": False}
    again = report.rows([(engine, SIM) for engine in imported])
    assert again["config"].tolist() == table["config"].tolist()


def _pair_of(slice_name, policy, params, measured, predicted, slots=4):
    engine = {**_engine([_run(measured), _run(measured)], policy=policy, slots=slots), "slice": slice_name,
              "policy_params": params}
    return engine, {**SIM, "tokens_per_s": predicted}


def test_the_summary_heading_comes_first_also_with_nothing_measured():
    """The profile line (``experiments.validate.profile_line``) heads the summary, also of an empty table, and a
    summary without heading is as it was."""
    table = report.rows([(_engine([_run(100.0), _run(100.0)]), SIM)])
    assert report.summary(table, [], heading=["profile: p"]) == "profile: p\n" + report.summary(table, [])
    assert report.summary(table.iloc[0:0], [], heading=["profile: p"]) == "profile: p\nno configuration measured yet\n"
