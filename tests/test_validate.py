"""python -m experiments.validate on the CPU: the smoke scenario end to end (calibration, the engine grid with
the measurement discipline, the simulator's predictions, the report), resuming, predicting again from what
is stored, refusing bad scenarios; and the pieces it rests on: the profile fit recovers constants it is
given, the report's comparison and ranking."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import calibration_timed_by_the_simulator

from experiments.validate import main
from hardware.profile import load_hardware
from validation import report
from validation.scenario import ScenarioError, scenario_from_dict

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "validate-smoke.yaml"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate")
    assert main(["--scenario", str(SMOKE), "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_the_whole_bundle(smoke):
    table = pd.read_csv(smoke / "validation.csv")
    configs = {"tiny-replay": 4 * 2, "tiny-live": 2}
    assert table.groupby("slice")["config"].nunique().to_dict() == configs
    assert set(table["metric"]) == {"tokens_per_s", "hit_rate", "misses"}
    for column in ("config", "metric", "predicted", "measured", "abs_err_pct", "slice", "shape", "policy", "family",
                   "cache_slots", "precision"):
        assert column in table.columns
    tps = table[table["metric"] == "tokens_per_s"]
    assert (tps["runs"] == 2).all() and (tps["predicted"] > 0).all() and (tps["measured"] > 0).all()
    assert np.allclose(tps["abs_err_pct"], 100 * (tps["predicted"] - tps["measured"]).abs() / tps["measured"])
    # on-demand policies decide without looking at time: both clocks count the same hits and misses
    on_demand = table[(table["family"] == "on-demand") & table["metric"].isin(["hit_rate", "misses"])]
    assert len(on_demand) and (on_demand["predicted"] == on_demand["measured"]).all()
    text = (smoke / "summary.txt").read_text()
    assert "tokens/s: 10 configurations" in text and "ranking" in text and "noise floor" in text
    assert (smoke / "validation.png").stat().st_size > 10_000
    profile = load_hardware(smoke / "cpu-measured.yaml")
    entries = dict(profile.measured_compute)
    assert set(entries) == {"tiny-moe", "tiny-moe-4l"}
    assert "OraclePrefetch" in dict(entries["tiny-moe"].decision_us)
    calibration = json.loads((smoke / "calibration" / "tiny-live.json").read_text())
    assert {"hits", "misses", "alternate", "resident-live"} <= set(calibration["patterns"])     # a live model's own overhead
    assert "tiny-replay: calibration patterns' median step, simulator against engine: hits" in text
    assert "alternate (a hit layer after each miss layer) is held out of the fit" in text


def test_a_second_run_resumes_and_measures_nothing(smoke, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(smoke, out)
    def results():      # the measured runs and the calibration (a slice's inputs are rebuilt each call)
        files = [*(out / "engine").glob("*/*.json"), *(out / "calibration").glob("*.json")]
        return {p: p.stat().st_mtime_ns for p in files}

    before = results()
    assert main(["--scenario", str(SMOKE), "--out", str(out)]) == 0
    assert results() == before
    assert pd.read_csv(out / "validation.csv").equals(pd.read_csv(smoke / "validation.csv"))


def test_an_engine_change_recalibrates(smoke, tmp_path, monkeypatch):
    """The calibration measures the engine: other engine or calibration code (``calibration_code``, the engine's
    modules and the calibration's own) makes a stored calibration stale, so a resumed call calibrates again."""
    import validation.engine_side as engine_side
    out = tmp_path / "changed"
    shutil.copytree(smoke, out)
    path = out / "calibration" / "tiny-replay.json"
    before = json.loads(path.read_text())["key"]
    monkeypatch.setattr(engine_side, "calibration_code", lambda: "other engine code")
    assert main(["--scenario", str(SMOKE), "--out", str(out), "--slices", "tiny-replay"]) == 0
    assert json.loads(path.read_text())["key"] != before


def test_predict_only_needs_no_engine(smoke, tmp_path):
    out = tmp_path / "stored"
    shutil.copytree(smoke, out)
    shutil.rmtree(out / "sim")
    assert main(["--scenario", str(SMOKE), "--out", str(out), "--predict-only"]) == 0
    assert pd.read_csv(out / "validation.csv")["predicted"].tolist() == \
        pd.read_csv(smoke / "validation.csv")["predicted"].tolist()


def test_a_stored_folder_names_its_scenario(smoke, tmp_path, capsys):
    """``--predict-only`` and ``--timelines`` without ``--scenario`` take the one the folder was measured under
    (recorded by the measuring call; inferred from the slices it holds for a folder from before the record), not
    the machine's default."""
    from experiments.validate import SCENARIO_FILE, stored_scenario
    assert (smoke / SCENARIO_FILE).read_text().strip() == "validate-smoke"
    out = tmp_path / "stored"
    shutil.copytree(smoke, out)
    (out / SCENARIO_FILE).write_text(str(SMOKE) + "\n")
    assert stored_scenario(out) == str(SMOKE)
    (out / SCENARIO_FILE).unlink()
    assert stored_scenario(out) == "validate-smoke"          # only the smoke scenario has tiny-replay, tiny-live
    assert stored_scenario(tmp_path / "empty") is None
    assert main(["--out", str(out), "--predict-only"]) == 0
    assert "holds results of scenario validate-smoke" in capsys.readouterr().out
    assert pd.read_csv(out / "validation.csv")["predicted"].tolist() == \
        pd.read_csv(smoke / "validation.csv")["predicted"].tolist()
    h200 = ROOT / "experiments" / "results" / "h200" / "validation"
    assert stored_scenario(h200) == "validate-h200"           # the committed bundle predates the record


def test_a_folder_of_another_machine_or_scenario_is_refused_untouched(smoke, tmp_path, capsys):
    """Measuring into a folder another kind of device measured, or reporting it under a scenario none of whose
    slices it holds, stops with one error naming the fix, before anything in it changes."""
    import json as json_
    out = tmp_path / "other"
    shutil.copytree(smoke, out)
    copies = out / "calibration" / "copies.json"
    data = json_.loads(copies.read_text())
    data["device"] = "NVIDIA H200"
    copies.write_text(json_.dumps(data))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["--scenario", str(SMOKE), "--out", str(out), "--slices", "tiny-replay"]) == 2
    assert "made on 'NVIDIA H200'" in capsys.readouterr().err
    h200 = ROOT / "experiments" / "configs" / "validate-h200.yaml"
    assert main(["--scenario", str(h200), "--out", str(out), "--predict-only"]) == 2
    assert "none of them in scenario" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert "smoke path" in (smoke / "summary.txt").read_text()     # a CPU's errors are flagged as meaningless


@pytest.mark.parametrize("change, words", [
    ({"colour": 1}, "unknown key"),
    ({"hardware": "h100"}, "hardware: unknown hardware profile 'h100'"),     # before the calibration, not after it
    ({"slices": {"a": {"mode": "replay", "trace": "nope.npz", "policies": ["lru"], "cache_slots": [2]}}}, "does not exist"),
    ({"slices": {"a": {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "policies": ["lru"],
                       "cache_slots": [1]}}}, "outside [2, 6]"),
    ({"slices": {"a": {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "policies": ["lfru"],
                       "cache_slots": [2]}}}, "lfru"),
    ({"slices": {"a": {"mode": "live", "policies": ["lru"], "cache_slots": [2]}}}, "needs 'model'"),
    ({"repeats": 0}, "repeats"),
    ({"slices": {"a": {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "policies": [],
                       "cache_slots": [2]}}}, "at least one entry"),
    ({"slices": {"a": {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "policies": ["lru"],
                       "cache_slots": [2, 2]}}}, "cache_slots lists 2 more than once"),
    ({"slices": {"a": {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "policies": ["lru", "lru"],
                       "cache_slots": [2]}}}, "policies lists lru more than once"),
])
def test_a_bad_scenario_is_refused_naming_the_field(change, words, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = {"repeats": 2, "slices": {"a": {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz",
                                           "policies": ["lru"], "cache_slots": [2]}}, **change}
    with pytest.raises(ScenarioError, match=words.replace("[", r"\[")):
        scenario_from_dict(data, "scenario.yaml")


def test_a_malformed_shape_file_is_a_scenario_error(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad-shape.yaml"
    bad.write_text("num_layers: [3\n")
    data = {"slices": {"a": {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "shape": str(bad),
                             "policies": ["lru"], "cache_slots": [2]}}}
    with pytest.raises(ScenarioError, match="shape: .*bad-shape.yaml: not valid YAML"):
        scenario_from_dict(data, "scenario.yaml")


def test_a_predictive_policy_needs_a_live_slice(monkeypatch):
    monkeypatch.chdir(ROOT)
    data = {"slices": {"a": {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "policies": ["lookahead"],
                             "cache_slots": [2]}}}
    with pytest.raises(ScenarioError, match="live predictor 'lookahead'.*live slice"):
        scenario_from_dict(data, "scenario.yaml")


def test_the_builtin_scenario_runs_from_any_directory(monkeypatch, tmp_path):
    from validation.scenario import load_scenario
    monkeypatch.chdir(tmp_path)
    scenario = load_scenario("validate-smoke")        # its paths name repository files
    assert all(Path(s.trace or s.shape).is_file() for s in scenario.slices)


def _tiny_replay_scenario(tmp_path: Path, policies: list[str], **fields) -> Path:
    """A one-slice scenario file: the tiny shape's committed trace replayed, one run each, at 2 slots (and
    ``fields``)."""
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump({"repeats": 1, "slices": {"tiny": {
        "mode": "replay", "shape": str(ROOT / "tests" / "data" / "tiny-moe.yaml"),
        "trace": str(ROOT / "tests" / "data" / "tiny-moe-trace.npz"), "max_tokens": 6, "warmup_tokens": 2,
        "policies": policies, "cache_slots": [2], "precision": "fp32", **fields}}}))
    return path


@pytest.mark.parametrize("raises, what", [("RuntimeError('boom')", "RuntimeError: boom"),
                                          ("SystemExit(3)", "SystemExit: 3")])
def test_a_failing_policy_is_one_line_naming_its_hook_and_the_call_fails(tmp_path, capfd, raises, what):
    """A user's policy that raises: its calibration and runs are one line each naming its file, line and hook
    (the tracebacks in OUT/errors), the other policies are measured and reported, the summary says it failed
    (not "not measured yet"), and the call exits 1."""
    policy = tmp_path / "mine.py"
    policy.write_text("from policies.lru import LRU\n\n\nclass Raises(LRU):\n    def on_access(self, *args):\n"
                      f"        raise {raises}\n")
    scenario = _tiny_replay_scenario(tmp_path, ["lru", f"{policy}:Raises"])
    out = tmp_path / "out"
    assert main(["--scenario", str(scenario), "--out", str(out)]) == 1
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err
    site = f"{what} at {policy}:6 in on_access (traceback: {out}/errors/"
    assert f"calibration of {policy}:Raises failed ({site}" in printed.err
    assert f"slice=tiny policy={policy}:Raises cache_slots=2: 1 of 1 runs failed ({site}" in printed.err
    assert any("Traceback (most recent call last)" in p.read_text() for p in (out / "errors").glob("*.txt"))
    summary = (out / "summary.txt").read_text()
    assert f"{policy}:Raises at 2 slots failed in all 1 runs ({site}" in summary
    table = pd.read_csv(out / "validation.csv")
    assert set(table["policy"]) == {"lru"}


def test_a_slice_gives_a_policy_its_parameters_in_both_clocks(tmp_path, monkeypatch):
    """``policy_params``: the sweep's policy.NAME for validate. Checked when the scenario loads (a policy not in
    the slice, a parameter the policy does not declare), passed to the engine's and the simulator's settings
    of that policy only, and part of its results' key (a result measured at other parameters is not reused);
    a policy without parameters keeps the key it had."""
    from validation.engine_side import engine_key, replay_inputs
    monkeypatch.chdir(ROOT)
    body = {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "shape": "tests/data/tiny-moe.yaml",
            "policies": ["lru", "oracle"], "cache_slots": [2]}
    plain = scenario_from_dict({"slices": {"a": body}}, "scenario.yaml").slices[0]
    given = scenario_from_dict({"slices": {"a": {**body, "policy_params": {"oracle": {"cross_tokens": False}}}}},
                               "scenario.yaml").slices[0]
    assert given.settings(2, "oracle").policy_params == {"cross_tokens": False}
    assert given.settings(2, "lru").policy_params == {} and given.settings(2).policy_params == {}
    inputs = replay_inputs(plain)
    assert engine_key(plain, inputs, "lru", 2) == engine_key(given, inputs, "lru", 2)
    assert engine_key(plain, inputs, "oracle", 2) != engine_key(given, inputs, "oracle", 2)
    for params, words in (({"belady": {"x": 1}}, "names ['belady'], not among its policies"),
                          ({"oracle": {"crosstokens": False}}, "policy_params of oracle: policy OraclePrefetch has no "
                                                                "parameter 'crosstokens'"),
                          ({"oracle": 3}, "policy_params maps a policy")):
        with pytest.raises(ScenarioError, match=re.escape(words)):
            scenario_from_dict({"slices": {"a": {**body, "policy_params": params}}}, "scenario.yaml")
    # the whole call: calibration (each policy's all-resident engine with its own parameters), runs, report; a
    # user's on-demand policy file (it only chooses victims) beside them
    mine = tmp_path / "my_policy.py"
    mine.write_text("from offload.policy import Policy\n\n\nclass Victims(Policy):\n"
                    "    def choose_victim(self, scope, cache, job):\n"
                    "        return next(iter(cache.evictable(scope)), None)\n")
    scenario = _tiny_replay_scenario(tmp_path, ["lru", "oracle", f"{mine}:Victims"],
                                     policy_params={"oracle": {"cross_tokens": False}})
    assert main(["--scenario", str(scenario), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "validation.csv")
    assert set(table["policy"]) == {"lru", "oracle", f"{mine}:Victims"}
    # the configuration's label names its parameters (in the csv, the summary and the timelines)
    assert set(table["config"]) == {"tiny:lru:2", "tiny:oracle policy.cross_tokens=false:2", f"tiny:{mine}:Victims:2"}
    # the user's policy is filed by what it is: on-demand, and both clocks count its hits alike
    assert dict(zip(table["policy"], table["family"])) == {"lru": "on-demand", "oracle": "bound",
                                                          f"{mine}:Victims": "on-demand"}
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "hits and misses identical in both clocks (on-demand policies): 2/2" in summary
    assert "prefetching" not in summary
    from experiments.validate import timelines
    from validation.scenario import load_scenario
    from validation.store import Store
    loaded = load_scenario(scenario)
    assert timelines(loaded, loaded.slices, Store(tmp_path / "out")) == 0
    lines = pd.read_csv(tmp_path / "out" / "timelines_tiny.csv")
    assert "tiny:oracle policy.cross_tokens=false:2" in set(lines["config"])


def test_a_stored_result_of_other_policy_parameters_is_not_taken_for_the_slices(tmp_path, monkeypatch):
    """When no result has this checkout's key (the engine's code changed since), the report takes the last one of
    the same inputs, but never one recorded at other parameters of the policy; one from before parameters were
    recorded is taken, as before."""
    from validation.engine_side import replay_inputs, stored_result
    from validation.store import Store
    monkeypatch.chdir(ROOT)
    body = {"mode": "replay", "trace": "tests/data/tiny-moe-trace.npz", "shape": "tests/data/tiny-moe.yaml",
            "policies": ["oracle"], "cache_slots": [2], "policy_params": {"oracle": {"cross_tokens": False}}}
    sl = scenario_from_dict({"slices": {"a": body}}, "scenario.yaml").slices[0]
    inputs, store = replay_inputs(sl), Store(tmp_path)
    result = {"key": "old", "policy": "oracle", "cache_slots": 2, "model_id": inputs.model_id, "runs": [],
              "written_at": "2026-01-01T00:00:00+00:00"}
    store.write(store.path("engine", "a", "old"), {**result, "policy_params": {}})
    assert stored_result(sl, inputs, store, "oracle", 2) == (None, False)
    store.write(store.path("engine", "a", "old"), {**result, "policy_params": {"cross_tokens": False}})
    assert stored_result(sl, inputs, store, "oracle", 2)[0]["key"] == "old"
    store.write(store.path("engine", "a", "old"), result)       # recorded before the parameters were
    assert stored_result(sl, inputs, store, "oracle", 2) == (store.read(store.path("engine", "a", "old")), True)


def test_a_slice_deadline_is_an_equal_share_of_the_time_left():
    from experiments.validate import slice_deadline
    assert slice_deadline(300.0, 0.0, 3) == 100.0
    assert slice_deadline(300.0, 40.0, 2) == 170.0      # the first slice left 60 s unused: the next two share them
    assert slice_deadline(300.0, 100.0, 1) == 300.0     # the last slice gets all that is left
    assert slice_deadline(300.0, 290.0, 4) == 292.5
    assert slice_deadline(300.0, 330.0, 2) == 300.0     # past the deadline: no share beyond it


def test_slices_share_the_deadline_and_an_early_stop_is_named_and_resumed(tmp_path, capsys, monkeypatch):
    """Two slices under one deadline: the first gets half the time left (its calibration included), the second
    all that is left after it, and both are measured; a slice whose measurement stopped early is named at the
    end with how to resume it, and the same command resumes it, the complete slice taking no share then."""
    import validation.engine_side as engine_side
    body = {"mode": "replay", "shape": str(ROOT / "tests" / "data" / "tiny-moe.yaml"),
            "trace": str(ROOT / "tests" / "data" / "tiny-moe-trace.npz"), "max_tokens": 6, "warmup_tokens": 2,
            "cache_slots": [2], "precision": "fp32"}
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump({"repeats": 2, "slices": {"a": {**body, "policies": ["lru"]},
                                                                 "b": {**body, "policies": ["belady"]}}}))
    out = tmp_path / "out"
    command = ["--scenario", str(scenario), "--out", str(out), "--deadline-s", "1000"]
    deadlines, measurement = [], engine_side.Measurement

    class FirstStopsAfterOneRound(measurement):
        """The first slice's measurement stops after one round, as a deadline stops it (what validate does with a
        stopped slice is under test here, not how real.measurement decides to stop)."""
        def __init__(self, *args, deadline_s=None, **kwargs):
            deadlines.append(deadline_s)
            self.first = len(deadlines) == 1
            if self.first:
                kwargs["runs_wanted"] = {label: 1 for label in kwargs["runs_wanted"]}
            super().__init__(*args, deadline_s=deadline_s, **kwargs)

        def run_all(self):
            report = super().run_all()
            if self.first:
                report.info["stopped"] = "after 1 of 2 rounds (the test's deadline)"
            return report

    monkeypatch.setattr(engine_side, "Measurement", FirstStopsAfterOneRound)
    assert main(command) == 3       # INCOMPLETE_EXIT: call again
    printed = capsys.readouterr().out
    assert re.search(r"^a: this call's share of the deadline: until 50[01] s \(of 1000 s; 2 slices left\)$", printed,
                     re.MULTILINE)
    assert "b: this call's share of the deadline: until 1000 s (of 1000 s; 1 slice left)" in printed
    assert 500 <= deadlines[0] < 502 and deadlines[1] == 1000
    runs = pd.read_csv(out / "noise_floor.csv").set_index("slice")["runs"].to_dict()
    assert runs == {"a": 1, "b": 2}
    end = printed[printed.index("-> "):]
    assert "validate: incomplete: a: measurement stopped after 1 of 2 rounds" in end
    assert "run the same command again to resume it" in end and "incomplete: b" not in end

    monkeypatch.setattr(engine_side, "Measurement", measurement)
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "a: this call's share of the deadline: until 1000 s (of 1000 s; 1 slice left)" in printed
    assert "incomplete" not in printed
    assert pd.read_csv(out / "noise_floor.csv").set_index("slice")["runs"].to_dict() == {"a": 2, "b": 2}


def test_a_grid_of_prefetching_policies_only_is_reported(tmp_path, capsys):
    """No on-demand configuration: the report leaves the hit/miss agreement line out instead of failing after
    every run was measured; a group of one configuration counts its 'within' as 0 or 1."""
    scenario = _tiny_replay_scenario(tmp_path, ["oracle"])
    out = tmp_path / "out"
    assert main(["--scenario", str(scenario), "--out", str(out)]) == 0
    summary = (out / "summary.txt").read_text()
    assert "tokens/s: 1 configurations" in summary and "hits and misses identical" not in summary
    assert "True" not in summary and "False" not in summary


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("")
    assert main(["--out", str(path)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_bad_scenario_file_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("slices: {a: {mode: replay}}\n")
    assert main(["--scenario", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "missing 'policies'" in capsys.readouterr().err


def test_the_fit_recovers_the_constants_that_made_the_patterns():
    """Calibration patterns timed by the simulator itself with known host costs: the fit must return them."""
    entry, _, _ = calibration_timed_by_the_simulator(
        {"layer_overhead_us": 70.0, "copy_wait_us": 25.0},
        decisions={"lru": {"begin_layer_us": 3.0, "prefetch_layer_us": 1.0},
                   "oracle": {"begin_layer_us": 4.0, "prefetch_layer_us": 9.5}})
    assert entry["layer_overhead_us"] == pytest.approx(70.0, abs=0.01)
    assert entry["copy_wait_us"] == pytest.approx(25.0, abs=0.01)
    assert entry["decision_us"] == {"OraclePrefetch": 9.5}


@pytest.mark.parametrize("shape_name", ["mixtral-8x7b", "gpt-oss-20b"])
def test_the_calibration_patterns_hit_and_miss_where_they_say(shape_name):
    """LRU at top-k slots per layer (as the engine runs them): ``hits`` misses only its first step, ``misses``
    every access, ``alternate`` hits at even layers and misses at odd ones after its first step."""
    from offload.session import RunSettings
    from policies.lru import LRU
    from sim.replay import replay_untimed
    from traces import load_shape
    from traces.synthetic import pattern_trace
    shape = load_shape(shape_name)
    L, K, T = shape.num_layers, shape.top_k, 6
    counts = {p: replay_untimed(pattern_trace(shape, T, p), LRU, RunSettings(cache_slots=K)) for p in
              ("hits", "misses", "alternate")}
    assert (counts["hits"].hits, counts["misses"].hits) == ((T - 1) * L * K, 0)
    assert counts["alternate"].hits == (T - 1) * ((L + 1) // 2) * K
    assert counts["alternate"].misses == L * K + (T - 1) * (L // 2) * K
    narrow = dataclasses.replace(shape, num_experts=2 * K - 1)
    with pytest.raises(ValueError, match="'alternate' needs at least 2 \\* top_k experts"):
        pattern_trace(narrow, T, "alternate")


def test_the_held_out_alternate_pattern_shows_a_cost_the_fitted_constants_lack():
    """``pattern_check``: the alternating pattern (a hit layer after every miss layer), held out of the fit, is
    predicted exactly when the engine behaves as the model does, and an extra cost of hit layers after a miss
    (here 15 us each) shows as the simulator's shortfall on it, by that much."""
    from hardware.profile import hardware_from_dict
    from offload.session import RunSettings
    from policies.lru import LRU
    from sim.simulator import simulate
    from traces import load_shape
    from traces.synthetic import pattern_trace
    from validation.profile_fit import SKIP_STEPS, pattern_check
    _, _, fitted = calibration_timed_by_the_simulator({"layer_overhead_us": 70.0, "copy_wait_us": 25.0})
    profile = hardware_from_dict(fitted, "fitted")
    shape = load_shape(str(ROOT / "tests" / "data" / "tiny-moe.yaml"))
    run = simulate(pattern_trace(shape, 24, "alternate"), LRU, profile, RunSettings(cache_slots=shape.top_k))
    step_ms = np.asarray(run.token_ns) / 1e6
    calibration = {"shape": shape.to_dict(), "patterns": {"alternate": {"step_ms": step_ms.tolist()}}}
    predicted, measured = pattern_check(calibration, profile)["alternate"]
    assert predicted == pytest.approx(measured, rel=1e-9)
    after_a_miss = (shape.num_layers - 1) // 2          # even layers from 2 on follow an odd (missing) layer
    slower = step_ms + 15e-3 * after_a_miss
    calibration["patterns"]["alternate"]["step_ms"] = slower.tolist()
    predicted, measured = pattern_check(calibration, profile)["alternate"]
    assert measured - predicted == pytest.approx(15e-3 * after_a_miss, rel=1e-6)
    assert measured == pytest.approx(float(np.median(slower[SKIP_STEPS:])))


def _pair(policy, slots, measured, predicted, shape="s", floor_runs=(1.0, 1.0, 1.0)):
    runs = [{"tokens_per_s": measured * f, "hit_rate": 0.5, "misses": 10} for f in floor_runs]
    engine = {"slice": "x", "shape": shape, "mode": "replay", "policy": policy, "cache_slots": slots,
              "precision": "bf16", "runs": runs}
    return engine, {"tokens_per_s": predicted, "hit_rate": 0.5, "misses": 10, "compute_basis": "measured"}


def test_ranking_agrees_only_within_the_noise_floor():
    pairs = [_pair("lru", 4, 100, 110), _pair("belady", 4, 105, 100),        # the simulator picks lru, the engine belady
             _pair("lru", 8, 100, 100, floor_runs=(0.9, 1.0, 1.1)), _pair("belady", 8, 105, 99)]
    ranked = report.ranking(report.rows(pairs)).set_index("cache_slots")
    assert ranked.loc[4, "sim_fastest"] == "lru" and ranked.loc[4, "engine_fastest"] == "belady"
    assert not ranked.loc[4, "same_or_within_noise"]      # 4.8 % apart, the runs agree exactly
    assert ranked.loc[8, "same_or_within_noise"] and not ranked.loc[8, "same_policy"]   # inside lru's 20 % spread
    text = report.summary(report.rows(pairs), [])
    assert "the same policy at 0, the same or within the engine's noise floor of it at 1" in text


def test_a_ranking_of_single_runs_has_no_floor_and_nothing_within_it():
    """One run each: the floor is unknown (it was shown as 0.0 %), and no pick counts as within it unless the
    policies are the same."""
    pairs = [_pair("lru", 4, 100, 110, floor_runs=(1.0,)), _pair("belady", 4, 105, 100, floor_runs=(1.0,)),
             _pair("lru", 8, 100, 110, floor_runs=(1.0,)), _pair("belady", 8, 90, 100, floor_runs=(1.0,))]
    ranked = report.ranking(report.rows(pairs)).set_index("cache_slots")
    assert np.isnan(ranked.loc[4, "noise_floor_pct"]) and not ranked.loc[4, "same_or_within_noise"]
    assert np.isnan(ranked.loc[8, "noise_floor_pct"]) and ranked.loc[8, "same_or_within_noise"]   # the same policy


def test_results_of_other_engine_code_are_reported_with_the_files_changed_since(smoke, tmp_path, monkeypatch, capsys):
    """Each engine result records its engine files' digests; a checkout whose engine code differs still reports
    the stored measurement, and its note names the files changed since the runs."""
    import experiments.validate as validate
    import validation.engine_side as engine_side
    out = tmp_path / "other"
    shutil.copytree(smoke, out)
    stored = json.loads(next((out / "engine" / "tiny-replay").glob("*.json")).read_text())
    assert stored["engine_files"] and "real/engine.py" in stored["engine_files"]
    monkeypatch.setattr(engine_side, "engine_code", lambda: "other engine code")
    changed = {**stored["engine_files"], "real/engine.py": "0" * 16}
    monkeypatch.setattr(validate, "engine_files", lambda: changed)
    assert main(["--scenario", str(SMOKE), "--out", str(out), "--predict-only"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "tiny-replay: 8 configurations whose key this checkout does not reproduce" in summary
    assert "engine files changed since their runs: real/engine.py" in summary
    assert pd.read_csv(out / "validation.csv")["measured"].tolist() == \
        pd.read_csv(smoke / "validation.csv")["measured"].tolist()


def test_the_fitted_patterns_are_predicted_at_the_calibrations_precision(smoke):
    """The simulator gives back the ``hits`` pattern exactly as the fit built it, at the calibration's own
    precision (float32 on a CPU; its measured compute is keyed by it, where a bf16 default fell back to the
    analytic model: -79 %): each step's kernels timed alone plus the fitted per-layer overhead, to the
    simulator's whole-ns rounding of each constant. Against the engine's own median it is then within 10 % where
    that overhead came out >= 0; where a loaded machine made the kernels alone slower than the steps that run them
    (+43 % seen in CI), the overhead is kept at 0 and the summary line says so. ``misses`` adds a CPU's copies,
    which a shared machine times loosely (+31 % seen in CI), so it is held to 60 %, still far from the bug's -79 %."""
    import re
    import yaml
    from traces import ModelShape
    from validation.profile_fit import SKIP_STEPS, clamped_constants, kernels_us, pattern_check
    calibration = json.loads((smoke / "calibration" / "tiny-replay.json").read_text())
    shape = ModelShape.from_dict(calibration["shape"])
    entry = yaml.safe_load((smoke / "cpu-measured.yaml").read_text())["measured_compute"][shape.name][
        calibration["precision"]]
    positions = np.arange(SKIP_STEPS, len(calibration["patterns"]["hits"]["step_ms"]))
    built = np.median(kernels_us(entry, shape, positions) + shape.num_layers * entry["layer_overhead_us"]) / 1e3
    predicted, measured = pattern_check(calibration, load_hardware(smoke / "cpu-measured.yaml"))["hits"]
    # the simulator keeps each constant in whole ns: up to half a ns off per rounded term, a few per layer
    assert predicted == pytest.approx(built, abs=1e-6 * (shape.num_layers * (3 + shape.top_k) + 1))
    line = next(x for x in (smoke / "summary.txt").read_text().splitlines()
                if x.startswith("tiny-replay: calibration patterns"))
    notes = json.loads((smoke / "profile_fit_notes.json").read_text())[shape.name]
    named = [c for c in clamped_constants(notes, shape.num_layers, {"hits": measured})
             if c.startswith("layer_overhead_us")]
    if named:
        assert predicted > measured and f"kept at 0: {named[0]}" in line, line
    else:
        assert abs(predicted / measured - 1) < 0.1, line
    predicted, measured = map(float, re.search(r"misses ([\d.]+) / ([\d.]+) ms", line).groups())
    assert abs(predicted / measured - 1) < 0.6, line


def test_constants_fitted_below_zero_are_named_where_they_move_their_pattern():
    from validation.profile_fit import clamped_constants
    notes = {"layer_overhead_us_raw": -23.3, "miss_latency_us_raw": 40.0, "copy_wait_us_raw": -3.0,
             "prefetch_latency_us_raw": -10.0, "decision_us_raw[oracle]": -9.0, "engine_copy_us_median": -1.0}
    steps = {"hits": 0.864, "misses": 20.0}
    # 16 layers: the overhead moves hits by 0.373 ms, the copy wait misses by 0.048 ms (0.24 %, below 1 %)
    assert clamped_constants(notes, 16, steps) == [
        "layer_overhead_us -23.3 us (+0.373 ms a step, 43 % of the hits pattern's)",
        "prefetch_latency_us -10.0 us (+0.160 ms a step, 19 % of the hits pattern's)"]
    assert clamped_constants(notes, 16, steps, share=0.001)[-1].startswith("copy_wait_us -3.0 us")
    # a live slice's overhead is its own decode's: the forced hits pattern's is not what the profile holds
    live = {"layer_overhead_us_raw": -50.0, "layer_overhead_us_live_raw": 2.0}
    assert clamped_constants(live, 16, steps) == []
    assert clamped_constants({"layer_overhead_us_raw": 3.0}, 16, steps) == []
    assert clamped_constants({"layer_overhead_us_raw": -3.0}, 16, {}) == []      # no pattern measured: no scale


@pytest.mark.parametrize("steps", ["1", "0", "-3", "x"])
def test_calibration_steps_below_two_are_refused_in_one_line(steps, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--scenario", str(SMOKE), "--out", str(tmp_path / "o"), "--calibration-steps", steps])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--calibration-steps" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_every_slices_inputs_are_checked_before_anything_runs(tmp_path, capsys):
    """A live slice's checkpoint (missing, or a weight file cut short), tokenizer, corpus and gate, and a slice
    whose weights exceed the host memory, are found before the first slice starts: one line each naming the slice,
    the path and the fix, exit 2, nothing measured or written (they were found when each slice started, after the
    slices before it had run)."""
    from safetensors.torch import save_file
    tiny = yaml.safe_load((ROOT / "tests" / "data" / "tiny-moe.yaml").read_text())
    hf = {"model_type": "mixtral", "vocab_size": tiny["vocab_size"], "hidden_size": tiny["hidden_size"],
          "intermediate_size": tiny["expert_intermediate_size"], "num_hidden_layers": tiny["num_layers"],
          "num_attention_heads": tiny["num_attention_heads"], "num_key_value_heads": tiny["num_kv_heads"],
          "head_dim": tiny["head_dim"], "num_local_experts": tiny["num_experts"],
          "num_experts_per_tok": tiny["top_k"], "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "max_position_embeddings": 128}
    broken, untokenized = tmp_path / "broken", tmp_path / "untokenized"
    for folder in (broken, untokenized):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hf))
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00cut short")
    import torch
    save_file({"x": torch.zeros(1)}, str(untokenized / "model.safetensors"))
    (tmp_path / "corpus").mkdir()
    huge = tmp_path / "huge.yaml"
    huge.write_text(yaml.safe_dump({**tiny, "name": "huge", "hidden_size": 1 << 16, "expert_intermediate_size": 1 << 16}))
    live = {"mode": "live", "policies": ["lru"], "cache_slots": [2], "prompts": 1, "prompt_len": 4, "new_tokens": 2}
    replay = {"mode": "replay", "trace": str(ROOT / "tests" / "data" / "tiny-moe-trace.npz"), "policies": ["lru"],
              "cache_slots": [2], "precision": "fp32"}
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump({"repeats": 1, "slices": {
        "fine": {**replay, "shape": str(ROOT / "tests" / "data" / "tiny-moe.yaml")},
        "gone": {**live, "model": str(tmp_path / "nope")},
        "broken": {**live, "model": str(broken), "corpus": str(tmp_path / "no-corpus")},
        "notext": {**live, "model": str(untokenized), "corpus": str(tmp_path / "corpus"), "gate": str(tmp_path / "g")},
        "huge": {**replay, "shape": str(huge)}}}, sort_keys=False))
    out = tmp_path / "out"
    assert main(["--scenario", str(scenario), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    where = f"of {scenario}: "
    assert err[0] == f"error: slice gone {where}model: {tmp_path / 'nope'}: checkpoint directory does not exist; pass " \
                     f"the folder that holds config.json and model.safetensors (or give the slice another 'model')"
    assert err[1].startswith(f"error: slice broken {where}model: {broken / 'model.safetensors'}: not a readable "
                             f"safetensors file") and err[1].endswith("download this file again (or give the slice "
                                                                      "another 'model')")
    assert err[2] == f"error: slice broken {where}corpus {tmp_path / 'no-corpus'} is not a directory; pass the text " \
                     f"corpus (../shared/data/corpus) with --corpus, or fix the slice's 'corpus'"
    assert err[3] == f"error: slice notext {where}model {untokenized}: no tokenizer loads from it (ValueError); save " \
                     f"the model's tokenizer into the folder (tokenizer.save_pretrained)"
    assert err[4] == f"error: slice notext {where}gate {tmp_path / 'g'} is not a directory; train one with python -m " \
                     f"experiments.train_gate (after experiments.record), or drop the slice's 'gate'"
    assert err[5].startswith(f"error: slice huge {where}shape huge: its weights need ") and \
        err[5].endswith("(in the scenario: give the slice fewer 'layers' or a smaller 'shape')")
    assert len(err) == 6 and not out.exists()


def test_a_calibration_the_deadline_cannot_fit_is_not_started(smoke, tmp_path, capsys):
    """Under a deadline a slice whose calibration would run past it is not started (a calibration is not cut
    midway): the time its previous calibration took is the estimate, what is left is said, the calibration
    and the runs already stored are kept, the slices that fit are measured, and the end names the slice."""
    out = tmp_path / "stale"
    shutil.copytree(smoke, out)
    live = out / "calibration" / "tiny-live.json"
    stale = {**json.loads(live.read_text()), "key": "of other engine code", "wall_s": 5000.0}
    live.write_text(json.dumps(stale))
    lost = next((out / "engine" / "tiny-replay").glob("*.json"))        # the replay slice has a run to measure
    config = (lambda r: (r["policy"], r["cache_slots"]))(json.loads(lost.read_text()))
    lost.unlink()
    began = time.time()
    assert main(["--scenario", str(SMOKE), "--out", str(out), "--deadline-s", "1000"]) == 3      # incomplete
    printed = capsys.readouterr().out
    assert re.search(r"^tiny-live: calibration not started \(nor its runs\): its previous calibration took 5000 s, "
                     r"and \d+ s are left of the deadline of 1000 s \(run again to resume\)$", printed, re.MULTILINE)
    assert "validate: incomplete: tiny-live: calibration not started" in printed[printed.index("-> "):]
    assert json.loads(live.read_text()) == stale
    remeasured = [p for p in (out / "engine" / "tiny-replay").glob("*.json") if p.stat().st_mtime >= began and
                  (lambda r: (r["policy"], r["cache_slots"]))(json.loads(p.read_text())) == config]
    assert remeasured and "tiny-replay: calibration not started" not in printed


def test_without_an_earlier_calibration_the_estimate_is_conservative_and_said(tmp_path, capsys):
    """No calibration of the slice in OUT to go by: it is taken to need ``UNKNOWN_CALIBRATION_S``, so a deadline
    shorter than that starts nothing, says why, and writes no report (nothing to fit a profile from)."""
    from experiments.validate import UNKNOWN_CALIBRATION_S
    scenario = _tiny_replay_scenario(tmp_path, ["lru"])
    out = tmp_path / "out"
    deadline = f"{UNKNOWN_CALIBRATION_S - 60:.0f}"
    # no progress is possible: the call says so and fails (it passed with 0, so a CI job never noticed)
    assert main(["--scenario", str(scenario), "--out", str(out), "--deadline-s", deadline]) == 3
    printed = capsys.readouterr().out
    assert (f"tiny: calibration not started (nor its runs): it has no calibration in OUT to go by, so it is taken to "
            f"need {UNKNOWN_CALIBRATION_S:.0f} s (a conservative guess") in printed
    assert "no slice calibrated" in printed and "validate: incomplete: tiny: calibration not started" in printed
    assert not (out / "calibration" / "tiny.json").exists() and not list((out / "engine").glob("*/*.json"))
    assert not (out / "summary.txt").exists()


def test_a_report_names_the_profile_its_predictions_come_from(smoke, tmp_path):
    """--predict-only --profile X rewrites the report and sim/ in place: the summary's first line, validation.csv's
    profile columns and each new prediction name the profile (name, file, sha256, fitted or given), so a
    bundle says which profile made it; the fitted one's file is named relative to OUT (a copied bundle records
    the same), and the existing columns keep their values."""
    from traces.digest import file_sha256
    fitted = pd.read_csv(smoke / "validation.csv")
    sha = file_sha256(smoke / "cpu-measured.yaml")
    assert (smoke / "summary.txt").read_text().splitlines()[0] == \
        f"profile: cpu-measured (cpu-measured.yaml in OUT, fitted from OUT's calibrations; sha256 {sha})"
    assert fitted[["profile", "profile_file", "profile_sha256", "profile_from"]].drop_duplicates().values.tolist() == \
        [["cpu-measured", "cpu-measured.yaml", sha, "fitted"]]
    out = tmp_path / "stored"
    shutil.copytree(smoke, out)
    other = tmp_path / "merged.yaml"
    data = yaml.safe_load((smoke / "cpu-measured.yaml").read_text())
    other.write_text(yaml.safe_dump({**data, "name": "merged"}, sort_keys=False))
    assert main(["--scenario", str(SMOKE), "--out", str(out), "--predict-only", "--profile", str(other)]) == 0
    record = ["merged", str(other.resolve()), file_sha256(other), "--profile"]
    assert (out / "summary.txt").read_text().splitlines()[0] == \
        f"profile: merged (--profile {other.resolve()}; sha256 {record[2]})"
    table = pd.read_csv(out / "validation.csv")
    assert table[["profile", "profile_file", "profile_sha256", "profile_from"]].drop_duplicates().values.tolist() == \
        [record]
    assert table["measured"].tolist() == fitted["measured"].tolist()
    predictions = [json.loads(p.read_text()) for p in (out / "sim").glob("*/*.json")]
    assert predictions and all([p[k] for k in ("profile", "profile_file", "profile_sha256", "profile_from")] == record
                               for p in predictions)


@pytest.mark.parametrize("mode", ["--predict-only", "--timelines"])
def test_slices_with_predict_only_or_timelines_is_refused_untouched(smoke, tmp_path, capsys, mode):
    """--slices selects what a call measures; --predict-only reports every slice OUT holds (a report of some would
    replace the whole bundle's summary with a part of it, and it used to re-predict all of them regardless), and
    --timelines names its own slices: one line, exit 2, nothing written."""
    out = tmp_path / "stored"
    shutil.copytree(smoke, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    command = ["--scenario", str(SMOKE), "--out", str(out), "--slices", "tiny-replay"]
    assert main(command + (["--predict-only"] if mode == "--predict-only" else ["--timelines", "tiny-live"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --slices with " + mode), err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("seconds", ["0", "-5", "soon"])
def test_a_deadline_that_is_not_positive_is_refused_in_one_line(seconds, tmp_path, capsys):
    """--deadline-s 0 meant no deadline (``args.deadline_s or ...``) and -5 measured nothing, then failed with a
    misleading message: both refused before anything runs."""
    with pytest.raises(SystemExit) as exit_:
        main(["--scenario", str(SMOKE), "--out", str(tmp_path / "o"), "--deadline-s", seconds])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --deadline-s" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_damaged_trace_is_refused_before_anything_runs(tmp_path, capsys):
    """A replay slice whose trace is cut short used to raise traces.io.TraceError's traceback when the slice started
    (after the copy table and the slices before it): one line naming the slice, the file and the fix, exit 2,
    nothing written."""
    cut = tmp_path / "cut.npz"
    whole = (ROOT / "tests" / "data" / "tiny-moe-trace.npz").read_bytes()
    cut.write_bytes(whole[:len(whole) // 2])
    scenario = _tiny_replay_scenario(tmp_path, ["lru"], trace=str(cut))
    out = tmp_path / "out"
    assert main(["--scenario", str(scenario), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: slice tiny of {scenario}: trace: {cut}: file: file is truncated or corrupt") and \
        err.rstrip().endswith(f"(a committed trace: git checkout -- {cut}; or give the slice another 'trace')"), err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()


def test_results_of_another_key_with_the_same_engine_files_are_reported_generically(smoke, tmp_path, monkeypatch):
    """A stored result whose key this checkout does not reproduce while no engine file changed (a policy's source, the
    slice's inputs or a gate): the note says so rather than naming files; a configuration of the slice with no result
    at all, last in the grid, is reported as not measured (the note read the last configuration's result, None)."""
    import validation.engine_side as engine_side
    out = tmp_path / "other"
    shutil.copytree(smoke, out)
    for path in (out / "engine" / "tiny-replay").glob("*.json"):
        if (lambda r: (r["policy"], r["cache_slots"]))(json.loads(path.read_text())) == ("affinity", 3):
            path.unlink()
    monkeypatch.setattr(engine_side, "engine_code", lambda: "other inputs, same files")
    assert main(["--scenario", str(SMOKE), "--out", str(out), "--predict-only"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "tiny-replay: affinity at 3 slots not measured yet" in summary
    assert ("tiny-replay: 7 configurations whose key this checkout does not reproduce (the engine's code, a policy's "
            "source, the slice's inputs or a gate differ since their runs; reported as measured); engine files changed "
            "since their runs: (none: a policy's source, the slice's inputs or a gate differ)") in summary
