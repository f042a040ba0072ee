"""The environment switches that choose the engine's kernels (MOE_LAB_COMPILE, MOE_LAB_REDUCTIONS,
MOE_LAB_EXPERT_GRAPHS): checked before anything runs, recorded in an engine command's settings, and in a
validation result's key when they switch the path from the defaults, so that runs of one kernel path are never
reused for another."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import refused

from real.bench.args import kernel_path, kernel_switch_error, resolved, switched_kernel_path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny-moe-trace.npz")
SWITCHES = ("MOE_LAB_COMPILE", "MOE_LAB_REDUCTIONS", "MOE_LAB_EXPERT_GRAPHS")


@pytest.fixture(autouse=True)
def no_switches(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)


def test_the_path_follows_the_device_and_the_switches(monkeypatch):
    assert kernel_path("cpu") == {"compile": False, "reductions": False, "expert_graphs": False}
    assert kernel_path("cuda") == {"compile": True, "reductions": True, "expert_graphs": True}
    assert switched_kernel_path("cuda") is None                 # the defaults: keys as before the path was recorded
    monkeypatch.setenv("MOE_LAB_REDUCTIONS", "0")
    assert kernel_path("cuda") == {"compile": True, "reductions": False, "expert_graphs": True}
    assert switched_kernel_path("cpu") == kernel_path("cpu")    # set, even to a value that changes nothing here
    monkeypatch.setenv("MOE_LAB_COMPILE", "0")
    monkeypatch.setenv("MOE_LAB_EXPERT_GRAPHS", "0")
    assert kernel_path("cuda") == {"compile": False, "reductions": False, "expert_graphs": False}


@pytest.mark.parametrize("name, value", [("MOE_LAB_REDUCTIONS", "off"), ("MOE_LAB_COMPILE", "true"),
                                         ("MOE_LAB_EXPERT_GRAPHS", "")])
def test_a_switch_other_than_0_or_1_is_refused_by_the_engine_commands(monkeypatch, capsys, tmp_path, name, value):
    """A value such as 'off' silently meant the default (reductions on)."""
    from experiments.engine_bench import main
    monkeypatch.setenv(name, value)
    refused(capsys, lambda: main(["replay", "--trace", TINY, "--device", "cpu", "--slots", "2", "--policies", "lru",
                                  "--out", str(tmp_path / "out")]), f"{name}={value!r}", "set it to 0 or 1")
    assert not (tmp_path / "out").exists()


def test_compiling_where_it_cannot_run_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MOE_LAB_COMPILE", "1")
    monkeypatch.setenv("PATH", str(tmp_path))           # no C++ compiler on it
    assert "needs a C++ compiler" in kernel_switch_error("cpu")
    from experiments.engine_bench import main
    refused(capsys, lambda: main(["replay", "--trace", TINY, "--device", "cpu", "--slots", "2", "--policies", "lru",
                                  "--out", str(tmp_path / "out")]), "MOE_LAB_COMPILE=1 asks to compile",
            "set MOE_LAB_COMPILE=0")


def test_an_engine_command_records_the_path_in_its_settings(monkeypatch, tmp_path):
    """engine.csv's settings (and the resolved config) carry the path: a configuration measured on another path
    does not match them, so it is measured again instead of skipped."""
    from experiments.engine_bench import parse_args
    argv = ["replay", "--trace", TINY, "--device", "cpu", "--slots", "2", "--policies", "lru", "--out", str(tmp_path)]
    default = resolved(parse_args(argv))["kernel_path"]
    monkeypatch.setenv("MOE_LAB_COMPILE", "1")
    switched = resolved(parse_args(argv))["kernel_path"]
    assert default == {"compile": False, "reductions": False, "expert_graphs": False}
    assert switched == {"compile": True, "reductions": True, "expert_graphs": False}


def test_validate_refuses_a_bad_switch_before_anything_runs(monkeypatch, capsys, tmp_path):
    from experiments.validate import main
    monkeypatch.setenv("MOE_LAB_REDUCTIONS", "no")
    out = tmp_path / "v"
    assert main(["--scenario", str(ROOT / "experiments" / "configs" / "validate-smoke.yaml"), "--out", str(out)]) == 2
    assert "error: MOE_LAB_REDUCTIONS='no': set it to 0 or 1" in capsys.readouterr().err
    assert not out.exists()


def test_validate_keys_a_switched_path_apart_and_keeps_the_default_keys(monkeypatch, tmp_path):
    """A result measured on the default path keeps its key (bundles measured before the path was recorded
    still reproduce); a switched path is another key, so a resumed call measures that slice again."""
    from experiments.validate import main
    out = tmp_path / "v"
    scenario = str(ROOT / "experiments" / "configs" / "validate-smoke.yaml")
    assert main(["--scenario", scenario, "--out", str(out), "--slices", "tiny-replay"]) == 0
    keys = {p.name for p in (out / "engine" / "tiny-replay").glob("*.json")}
    calibration = json.loads((out / "calibration" / "tiny-replay.json").read_text())["key"]
    again = tmp_path / "again"
    shutil.copytree(out, again)
    monkeypatch.setenv("MOE_LAB_REDUCTIONS", "0")         # no change on the CPU, but set: the path is in the keys
    assert main(["--scenario", scenario, "--out", str(again), "--slices", "tiny-replay"]) == 0
    switched = {p.name for p in (again / "engine" / "tiny-replay").glob("*.json")}
    assert keys < switched and len(switched) == 2 * len(keys)
    assert json.loads((again / "calibration" / "tiny-replay.json").read_text())["key"] != calibration
