"""python -m experiments.validate given what a fresh user gives it: a profile by name, a replay trace of another
model than its shape, a damaged file in OUT, an output it cannot write, a NaN deadline, an OUT that does not exist.
Each is one line naming the thing and the fix, exit 2, before anything is measured or written (or, for a damaged
stored result in a measuring call, measured again, saying so)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import refused

from experiments.validate import main
from hardware.profile import PROFILES_DIR
from traces.digest import file_sha256
from validation.scenario import ScenarioError, scenario_from_dict

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _scenario(path: Path, **slices) -> Path:
    path.write_text(yaml.safe_dump({"repeats": 1, "slices": slices}, sort_keys=False))
    return path


def _replay(**fields) -> dict:
    """A tiny replay slice: one run of LRU at 2 slots, a few tokens."""
    return {"mode": "replay", "shape": str(DATA / "tiny-moe.yaml"), "trace": str(DATA / "tiny-moe-trace.npz"),
            "max_tokens": 6, "warmup_tokens": 2, "policies": ["lru"], "cache_slots": [2], "precision": "fp32",
            **fields}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """(scenario, OUT): a one-slice replay measured once; each test works on its own copy of OUT."""
    folder = tmp_path_factory.mktemp("measured")
    scenario = _scenario(folder / "scenario.yaml", tiny=_replay())
    out = folder / "out"
    assert main(["--scenario", str(scenario), "--out", str(out)]) == 0
    return scenario, out


def _copy(measured, tmp_path) -> tuple[Path, Path]:
    scenario, out = measured
    shutil.copytree(out, tmp_path / "out")
    return scenario, tmp_path / "out"


def _files(out: Path) -> dict:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _exit(*argv):
    return lambda: sys.exit(main([str(a) for a in argv]))


def test_a_profile_given_by_name_is_its_profile_file(measured, tmp_path):
    """--profile a100-pcie4 (a name, as hardware= takes it) predicted, then hashed './a100-pcie4' as a path
    (FileNotFoundError): the report records hardware/profiles/a100-pcie4.yaml and its sha256."""
    scenario, out = _copy(measured, tmp_path)
    assert main(["--scenario", str(scenario), "--out", str(out), "--predict-only", "--profile", "a100-pcie4"]) == 0
    path = PROFILES_DIR / "a100-pcie4.yaml"
    assert (out / "summary.txt").read_text().splitlines()[0] == \
        f"profile: a100-pcie4 (--profile {path}; sha256 {file_sha256(path)})"
    table = pd.read_csv(out / "validation.csv")
    assert table[["profile", "profile_file", "profile_sha256", "profile_from"]].drop_duplicates().values.tolist() == \
        [["a100-pcie4", str(path), file_sha256(path), "--profile"]]


def test_a_replay_trace_of_another_model_is_refused_with_the_other_inputs(tmp_path, capsys):
    """A trace of tiny-moe (3 layers) under the 4-layer shape raised Trace.for_shape's ValueError as a traceback
    (exit 1) when its slice started, after the copy table was timed: the pre-run check lists it with the other
    slices' problems, naming slice, trace and shape, exit 2, nothing written."""
    cut = tmp_path / "cut.npz"
    whole = (DATA / "tiny-moe-trace.npz").read_bytes()
    cut.write_bytes(whole[:len(whole) // 2])
    scenario = _scenario(tmp_path / "scenario.yaml", other=_replay(shape=str(DATA / "tiny-moe-4l.yaml")),
                         damaged=_replay(trace=str(cut)))
    out = tmp_path / "out"
    assert main(["--scenario", str(scenario), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err), err
    assert err[0] == (f"error: slice other of {scenario}: trace {DATA / 'tiny-moe-trace.npz'} does not fit shape "
                      f"{DATA / 'tiny-moe-4l.yaml'}: a trace of tiny-moe (3 layers, top-2 of 6) cannot route "
                      f"tiny-moe-4l (4 layers, top-2 of 6); give the slice a trace of that shape, or a 'shape' (or "
                      f"'layers') its routing covers")
    assert err[1].startswith(f"error: slice damaged of {scenario}: trace: {cut}")
    assert not out.exists()


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_a_damaged_stored_result_is_refused_by_a_report_naming_it(measured, tmp_path, capsys):
    """An engine result cut short gave json's JSONDecodeError traceback: --predict-only and --timelines (which
    cannot measure it again) name it in one line, to delete and measure again, exit 2, OUT untouched."""
    scenario, out = _copy(measured, tmp_path)
    damaged = sorted((out / "engine" / "tiny").glob("*.json"))[0]
    _cut(damaged)
    before = _files(out)
    for mode in (["--predict-only"], ["--timelines", "tiny"]):
        line = refused(capsys, _exit("--scenario", scenario, "--out", out, *mode), str(damaged), "not valid JSON",
                       "delete it, then measure it again", f"python -m experiments.validate --out {out}")
        assert line.startswith(f"error: {damaged}: ")
        assert _files(out) == before


@pytest.mark.parametrize("content, words", [("{}", "fields key, slice, policy, cache_slots, runs missing"),
                                             ('{"runs": 5}', "missing or of another type"),
                                             (None, "a run in 'runs' is not an object")])
def test_a_stored_result_that_is_json_but_no_result_is_named_too(measured, tmp_path, capsys, content, words):
    """Valid JSON without a result's fields ({} , runs not a list) passed the check and gave KeyError or
    TypeError tracebacks in the report."""
    scenario, out = _copy(measured, tmp_path)
    damaged = sorted((out / "engine" / "tiny").glob("*.json"))[0]
    if content is None:
        content = json.dumps({**json.loads(damaged.read_text()), "runs": [1]})
    damaged.write_text(content)
    line = refused(capsys, _exit("--scenario", scenario, "--out", out, "--predict-only"), str(damaged), words,
                   "delete it, then measure it again")
    assert line.startswith(f"error: {damaged}: not a whole result")


def test_a_damaged_timed_run_is_named_as_a_stored_result(measured, tmp_path, capsys):
    """A timed run cut short, under --timelines, gave two tracebacks advising to re-export the trace with
    traces.io.save_trace: one line naming it as a stored result to delete and measure again."""
    scenario, out = _copy(measured, tmp_path)
    damaged = sorted((out / "engine" / "tiny").glob("*-timed.npz"))[0]
    _cut(damaged)
    line = refused(capsys, _exit("--scenario", scenario, "--out", out, "--timelines", "tiny"), str(damaged),
                   "not a whole trace", "delete it, then measure it again")
    assert "re-export" not in line and "save_trace" not in line


def test_a_measuring_call_measures_a_damaged_result_again(measured, tmp_path, capsys):
    """As the sweep recomputes a damaged row: a measuring call names the damaged engine result and timed run in
    one line each, measures them again (rewriting them) and reports every configuration."""
    scenario, out = _copy(measured, tmp_path)
    result = sorted((out / "engine" / "tiny").glob("*.json"))[0]
    timed = result.with_name(result.stem + "-timed.npz")
    _cut(result)
    _cut(timed)
    assert main(["--scenario", str(scenario), "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"validate: damaged: {result}: not valid JSON (") and lines[0].endswith(
        "; read as not measured: a measuring call of its slice measures it again, which rewrites it")
    assert lines[1].startswith(f"validate: damaged: {timed}: not a whole trace (") and lines[1].endswith(
        "; removed (unreadable: nothing is lost); a measuring call of its slice makes the timed run again")
    assert json.loads(result.read_text())["runs"] and timed.is_file()
    assert len(pd.read_csv(out / "validation.csv")) == len(pd.read_csv(measured[1] / "validation.csv"))


@pytest.mark.parametrize("mode", [[], ["--predict-only"]])
def test_an_output_it_cannot_write_is_refused_before_anything_runs(measured, tmp_path, capsys, mode):
    """OUT/validation.png a folder gave IsADirectoryError's traceback after measuring and predicting: refused up
    front in one line, as the engine commands refuse a result in the way; so is a file where a store folder goes."""
    scenario, out = _copy(measured, tmp_path)
    (out / "validation.png").unlink()
    (out / "validation.png").mkdir()
    before = _files(out)
    refused(capsys, _exit("--scenario", scenario, "--out", out, *mode),
            f"--out {out}: {out / 'validation.png'} is a folder where validate writes a file; move it away")
    assert _files(out) == before
    shutil.rmtree(out / "validation.png")
    shutil.rmtree(out / "sim")
    (out / "sim").write_text("")
    refused(capsys, _exit("--scenario", scenario, "--out", out, *mode), f"{out / 'sim'} is a file")


def test_a_timelines_file_in_the_way_is_refused(measured, tmp_path, capsys):
    scenario, out = _copy(measured, tmp_path)
    (out / "timelines_tiny.csv").mkdir()
    refused(capsys, _exit("--scenario", scenario, "--out", out, "--timelines", "tiny"),
            f"{out / 'timelines_tiny.csv'} is a folder where validate writes a file")


@pytest.mark.parametrize("deadline", [".nan", "-.inf", "0"])
def test_a_scenario_deadline_that_is_not_positive_is_refused_as_the_cli_does(deadline):
    """deadline_s: .nan was accepted ('until nan s'); --deadline-s nan is refused: the same rule (not > 0)."""
    data = yaml.safe_load(f"deadline_s: {deadline}\nrepeats: 1")
    with pytest.raises(ScenarioError, match="deadline_s must be a positive number of seconds"):
        scenario_from_dict({**data, "slices": {"tiny": _replay()}}, "s.yaml")


@pytest.mark.parametrize("mode", [["--predict-only"], ["--timelines", "tiny-replay"]])
def test_a_report_of_a_folder_that_does_not_exist_creates_nothing(tmp_path, capsys, mode):
    """--predict-only or --timelines on a missing OUT made an empty folder and exited 1: one line, exit 2."""
    out = tmp_path / "none"
    refused(capsys, _exit("--out", out, *mode), f"--out {out}: no such folder", "measure first")
    assert not out.exists()


def test_a_report_of_a_folder_without_calibration_is_exit_2(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    refused(capsys, _exit("--scenario", "validate-smoke", "--out", out, "--predict-only"),
            "holds no calibration yet", "measure first")


def test_a_damaged_copy_table_is_refused_by_a_measuring_call_too(measured, tmp_path, capsys):
    """The copy table names the device OUT's results come from (a folder of another machine's is refused): a
    damaged one is not measured again silently, even by a measuring call."""
    scenario, out = _copy(measured, tmp_path)
    _cut(out / "calibration" / "copies.json")
    before = _files(out)
    refused(capsys, _exit("--scenario", scenario, "--out", out), f"{out / 'calibration' / 'copies.json'}: not valid "
            f"JSON", "delete it, then measure it again")
    assert _files(out) == before
