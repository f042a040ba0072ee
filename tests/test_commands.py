"""The engine commands one by one, end to end on the CPU with a tiny trained model (record, references,
train_gate, measure_policies with their repeats measured by real.measurement; a lossless mismatch reported;
profile's checks and profile assembly), and the rule that no command imports another command."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from real.corpus import DEFAULT_CORPUS_DIR
from traces import load_trace

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
needs_corpus = pytest.mark.skipif(not DEFAULT_CORPUS_DIR.is_dir(), reason="needs ../shared/data/corpus")


def _commands() -> dict[str, ast.Module]:
    """Every module of experiments/ that runs as a command (it has an ``if __name__ == "__main__"``)."""
    trees = {p.stem: ast.parse(p.read_text()) for p in EXPERIMENTS.glob("*.py")}
    return {name: tree for name, tree in trees.items()
            if any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)}


def test_no_command_imports_another_command():
    commands = _commands()
    assert {"engine_bench", "record", "profile", "references", "measure_policies", "train_gate", "make_tracks",
            "train_lm", "routing_compare", "sweep"} <= set(commands)
    found = []
    for name, tree in commands.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                           if node.module == "experiments" else [])
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            found += [(name, m) for m in modules if m.startswith("experiments.") and m.split(".")[1] in commands]
    assert not found, f"commands importing commands: {found}; move the shared code to real/ or traces/"


def test_profile_name_follows_the_gpu():
    from real.profile_hw import profile_name
    assert profile_name("NVIDIA H200") == "h200-measured"
    assert profile_name("NVIDIA H100 80GB HBM3") == "h100-measured"
    assert profile_name("NVIDIA A100-SXM4-80GB") == "a100-sxm4-80gb-measured"
    with pytest.raises(ValueError, match="names no GPU"):
        profile_name("NVIDIA ")


def test_write_profile_validates_before_writing(tmp_path):
    from hardware.profile import HardwareProfileError, hardware_to_dict, load_hardware
    from real.profile_hw import write_profile
    profile = {**hardware_to_dict(load_hardware("h100-pcie5")), "name": "x-measured"}
    profile.pop("pcie_GBps", None)
    with pytest.raises(HardwareProfileError):       # a negative bandwidth is refused, and nothing written
        write_profile(tmp_path / "bad.yaml", {**profile, "copy_latency_us": 10.0, "h2d_GBps_by_MiB": {1: -5.0, 16: 50.0}})
    assert not (tmp_path / "bad.yaml").exists()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    if not DEFAULT_CORPUS_DIR.is_dir():
        pytest.skip("needs ../shared/data/corpus")
    from experiments.train_lm import main as train
    model = tmp_path_factory.mktemp("lm") / "tiny-lm"
    train(["--size", "tiny", "--device", "cpu", "--max-steps", "4", "--out", str(model)])
    return model


CPU = ["--device", "cpu", "--dtype", "float32"]
DECODE = ["--prompts", "2", "--prompt-len", "5", "--new-tokens", "5"]


@needs_corpus
def test_record_references_gate_and_policies_commands(tiny_lm, tmp_path, capsys):
    from experiments import measure_policies, record, references, train_gate
    out = tmp_path / "out"
    record.main(["--model", str(tiny_lm), "--out", str(out), "--train-prompts", "3", *CPU, *DECODE])
    recorded, train = load_trace(out / "tiny-lm-trace.npz"), load_trace(out / "tiny-lm-train-trace.npz")
    assert recorded.num_tokens == 2 * (5 + 5) and recorded.hidden_states.shape[0] == recorded.num_tokens
    assert train.num_requests == 3 and train.hidden_states is None
    assert recorded.meta.extra["generated"] == recorded.meta.extra["reference_tokens"]
    assert pd.read_csv(out / "correctness.csv")["identical_to_fully_resident"].tolist() == [True]
    assert yaml.safe_load((out / "resolved_config-record.yaml").read_text())["train_prompts"] == 3

    references.main(["--model", str(tiny_lm), "--out", str(out), "--repeats", "2", *CPU, *DECODE])
    parity = json.loads((out / "hf_parity.json").read_text())
    assert parity["relative"] < 1e-4 and parity["argmax_agreement"] == 1.0
    resident = pd.read_csv(out / "engine.csv")
    assert resident["mode"].tolist() == ["fully-resident"] and resident["runs"].tolist() == [2]
    assert resident["spread_pct"].notna().all() and resident["tokens_per_s"].gt(0).all()
    runs = pd.read_csv(out / "noise_runs.csv")
    assert len(runs) == 2 and set(runs["session"]) == {"references-tiny-lm"} and runs["identical_tokens"].all()
    assert (runs["steps"] == 2 * 5).all()       # the generated steps are the timed ones

    gate = tmp_path / "gate"
    train_gate.main(["--trace", str(out / "tiny-lm-trace.npz"), "--model", str(tiny_lm), "--out", str(gate),
                     "--train-tokens", "512", "--steps", "5", "--rank", "4", "--device", "cpu", "--depth", "1"])
    policies = ["lru", "static", "lookahead"]
    args = ["--model", str(tiny_lm), "--out", str(out), "--trace", str(out / "tiny-lm-trace.npz"),
            "--train-trace", str(out / "tiny-lm-train-trace.npz"), "--slots", "2,3", "--vector-tokens", "256",
            "--score-seqs", "1", "--score-len", "8", "--depth", "1", *CPU]
    with pytest.raises(SystemExit) as exit_:        # lookahead without a gate: refused before measuring
        measure_policies.main([*args, "--policies", ",".join(policies)])
    assert exit_.value.code == 2 and "pass --gate" in capsys.readouterr().err
    measure_policies.main([*args, "--policies", ",".join(policies), "--gate", str(gate), "--repeats", "2"])
    err = capsys.readouterr().err     # the default profile holds no measured compute for this model: said so
    assert "note: sim_tokens_per_s: h100-pcie5 has no measured compute for tiny-lm" in err, err
    table = pd.read_csv(out / "policies.csv")
    assert table["policy"].tolist() == [p for p in policies for _ in (2, 3)]
    assert (table["sim_tokens_per_s"] > 0).all() and table["identical_tokens"].all()
    assert {"spread_pct", "runs", "outliers", "outlier_causes", "long_enough"} <= set(table.columns)
    assert (table["runs"] == 2).all() and table["spread_pct"].notna().all()
    on_demand = table[table["policy"].isin(["lru", "static"])]      # same slice, same routing: same hits
    assert (on_demand["hit_rate_all_steps"] - on_demand["sim_hit_rate_all_steps"]).abs().max() < 1e-9
    engine = pd.read_csv(out / "engine.csv")
    assert engine["mode"].tolist() == ["fully-resident", "engine-all-resident"] + ["live"] * 6
    assert engine["runs"].tolist() == [2] * 8
    # the 7 configurations (the all-resident engine first) interleaved: every round runs each once, the
    # order rotated by one the next round; each figure is the median of its configuration's runs
    runs = pd.read_csv(out / "noise_runs.csv")
    runs = runs[runs["session"] == "live-tiny-lm"]
    order = runs.loc[runs["round"] == 0, "config"].tolist()
    assert len(order) == 7 and order[0].startswith("mode=engine-all-resident")
    assert runs.loc[runs["round"] == 1, "config"].tolist() == order[1:] + order[:1]
    medians = runs.groupby(["mode", "policy", "cache_slots"])["tokens_per_s"].median()
    for row in engine[engine["mode"] != "fully-resident"].itertuples():
        assert row.tokens_per_s == pytest.approx(medians[row.mode, row.policy, row.cache_slots], rel=1e-12)
    floor = pd.read_csv(out / "noise_floor.csv")
    assert floor.groupby("session").size().to_dict() == {"live-tiny-lm": 7, "references-tiny-lm": 1}
    correctness = pd.read_csv(out / "correctness.csv")
    assert len(correctness) == 1 + 7          # record's row kept, then every configuration measured
    assert correctness["identical_to_fully_resident"].all() and (correctness["runs_checked"].iloc[1:] == 2).all()
    assert load_trace(out / "tiny-lm-lru-2-timed.npz").timings["copy_start_ms"].shape[1:] == (2, 2)
    settings = yaml.safe_load((out / "resolved_config-measure_policies.yaml").read_text())
    assert settings["slots"] == [2, 3] and settings["gate"] == str(gate)


@needs_corpus
def test_measure_policies_checks_its_inputs_first(tiny_lm, tmp_path, capsys):
    from experiments import measure_policies
    from traces import DEFAULT_TRACE
    base = ["--model", str(tiny_lm), "--out", str(tmp_path / "out"), "--train-trace", str(DEFAULT_TRACE),
            "--slots", "2,3", *CPU]
    for extra, message in ((["--trace", str(tmp_path / "none.npz")], "none.npz: no such file"),
                           (["--trace", str(DEFAULT_TRACE)], "not a recording of python -m experiments.record"),
                           (["--trace", str(DEFAULT_TRACE), "--slots", "1,2"], "--slots 1: "),
                           (["--trace", str(DEFAULT_TRACE), "--policies", "lru,nope"], "unknown policy 'nope'")):
        with pytest.raises(SystemExit) as exit_:
            measure_policies.main(base + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, message
    assert not (tmp_path / "out").exists()


@needs_corpus
def test_a_lossless_policy_whose_tokens_differ_is_reported(tiny_lm, tmp_path, capsys):
    """A recording whose fully-resident tokens are wrong stands in for a policy that changes the output: the
    command still writes every table, then exits 1 naming the configuration, its runs and the first
    difference."""
    from experiments import measure_policies, record
    from traces import save_trace
    out = tmp_path / "out"
    record.main(["--model", str(tiny_lm), "--out", str(out), "--train-prompts", "2", *CPU, *DECODE])
    recorded = load_trace(out / "tiny-lm-trace.npz")
    wrong = [list(tokens) for tokens in recorded.meta.extra["reference_tokens"]]
    wrong[1][2] += 1
    recorded.meta.extra["reference_tokens"] = wrong
    save_trace(recorded, out / "wrong.npz")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        measure_policies.main(["--model", str(tiny_lm), "--out", str(out), "--trace", str(out / "wrong.npz"),
                               "--train-trace", str(out / "tiny-lm-train-trace.npz"), "--policies", "lru",
                               "--slots", "2", "--vector-tokens", "256", "--score-seqs", "1", "--score-len", "8",
                               "--repeats", "1", *CPU])
    message = str(exit_.value.code)
    assert "changed the model's output" in message
    assert ("mode=live policy=lru cache_slots=2: 1 of 1 runs generated other tokens than the fully-resident "
            f"model's (round 0: request 1, token 2: {wrong[1][2] - 1} instead of {wrong[1][2]})") in message
    assert "mode=engine-all-resident" in message        # the all-resident engine is checked the same way
    correctness = pd.read_csv(out / "correctness.csv")
    assert correctness["identical_to_fully_resident"].tolist() == [True, False, False]
    assert pd.read_csv(out / "policies.csv")["identical_tokens"].tolist() == [False]


def test_profile_calibrates_this_machine_as_validate_does(tiny_lm, tmp_path):
    """``experiments.profile`` on the CPU: the calibrated profile (copy table, the model's entry with its
    per-layer overhead and copy wait, the base's analytic constants kept), the raw calibration beside it."""
    import yaml
    from experiments.profile import main
    from hardware.profile import load_hardware
    out = tmp_path / "profile"
    hardware = main(["--model", str(tiny_lm), "--out", str(out), *CPU])
    assert hardware.name == "cpu-measured" and load_hardware(out / "cpu-measured.yaml") == hardware
    data = yaml.safe_load((out / "cpu-measured.yaml").read_text())
    entry = data["measured_compute"]["tiny-lm"]["fp32"]      # the precision it ran in, named with the command
    assert data["description"].startswith("cpu, calibrated by python -m experiments.profile in fp32")
    assert {"layer_overhead_us", "copy_wait_us", "expert_us", "attention_us_by_ctx"} <= set(entry)
    assert data["hbm_GBps"] == load_hardware("h100-pcie5").hbm_GBps and data["h2d_GBps_by_MiB"]
    calibration = json.loads((out / "calibration.json").read_text())
    assert {"hits", "misses", "resident-live"} <= set(calibration["patterns"]) and "lru" in calibration["decisions"]


def test_bench_sim_refuses_bad_inputs_in_one_line(tmp_path, capsys):
    """A trace with ids out of range, a missing file, a bad window or policy: one line and exit 2, as the sweep."""
    import numpy as np
    from experiments.bench_sim import main as bench_sim
    from traces import save_trace, synthetic_trace
    good = tmp_path / "good.npz"
    save_trace(synthetic_trace(num_tokens=16, num_layers=2, num_experts=4, top_k=2, num_requests=2, seed=1), good)
    arrays = dict(np.load(good))
    arrays["experts"] = arrays["experts"] + 7        # ids past the 4 experts
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    for args, words in ((["--trace", str(bad)], "bad.npz"), (["--trace", str(tmp_path / "nope.npz")], "nope.npz"),
                        (["--copies-in-flight", "0"], "--copies-in-flight 0"), (["--profile", "lruu:4"], "lruu")):
        with pytest.raises(SystemExit) as exit_:
            bench_sim(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, err
