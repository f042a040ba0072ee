"""The GPU measurement command on the CPU: the whole ``live`` flow with a tiny trained model (the smoke
fast path, one run per configuration), and ``replay`` of a tiny trace's own shape with its repeats measured
by real.measurement (interleaved, the median published with its spread, runs and outliers)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from real.corpus import DEFAULT_CORPUS_DIR
from traces import load_trace, save_trace, synthetic_trace

needs_corpus = pytest.mark.skipif(not DEFAULT_CORPUS_DIR.is_dir(), reason="needs ../shared/data/corpus")


def trace_prompts(out):
    return load_trace(out / "tiny-lm-trace.npz").meta.extra["prompts"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """The tiny trained model the live tests share (trained once)."""
    from experiments.train_lm import main as train
    model = tmp_path_factory.mktemp("models") / "tiny-lm"
    train(["--size", "tiny", "--device", "cpu", "--max-steps", "6", "--out", str(model)])
    return model


GATE_ARGS = ["--gate-train-tokens", "512", "--recall-tokens", "256", "--vector-tokens", "256", "--gate-steps", "20",
             "--gate-batch", "64", "--gate-val-tokens", "256"]


@needs_corpus
def test_live_flow_on_cpu(tmp_path, capsys, tiny_lm):
    from experiments.engine_bench import main as bench
    model = tiny_lm
    out = tmp_path / "bench"
    broken = tmp_path / "broken.py"     # a policy that fails mid-run must not lose the others' rows
    broken.write_text("from policies.lru import LRU\n\nclass Broken(LRU):\n"
                      "    def on_access(self, *args):\n        raise RuntimeError('broken on purpose')\n")
    with pytest.raises(SystemExit, match="Broken failed"):
        bench(["live", "--model", str(model), "--out", str(out), "--device", "cpu", "--dtype", "float32",
               "--repeats", "1", "--prompts", "2", "--prompt-len", "6", "--new-tokens", "6", "--slots", "2,3",
               "--policies", f"lru,static,belady,{broken}:Broken,oracle,mixtral-offloading,speculating-experts-lossy,"
                           "lookahead",
               *GATE_ARGS, "--score-seqs", "2", "--score-len", "12"])
    # the simulator column means nothing where copies are synchronous, and the command says so
    printed = capsys.readouterr()
    assert "on a CPU the engine copies synchronously" in printed.out
    # the broken policy's calibration and runs: one line each, naming its file, line and hook; the
    # tracebacks in OUT/errors
    assert "Traceback" not in printed.out + printed.err
    assert re.search(rf"calibration of .*Broken failed \(RuntimeError: broken on purpose at {broken}:5 in on_access "
                     rf"\(traceback: {out}/errors/\w+\.txt\)\)", printed.out), printed.out
    for bad, message in ((["--policies", "lru,no-such-policy"], "unknown policy 'no-such-policy'"),
                         (["--slots", "1,2"], "--slots 1: .* routes to 2 of 4 experts"),
                         (["--corpus", str(tmp_path / "nowhere")], "nowhere: no such folder")):
        with pytest.raises(SystemExit) as exit_:     # checked before anything is measured or written
            bench(["live", "--model", str(model), "--out", str(tmp_path / "typo"), "--device", "cpu", *bad])
        assert exit_.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "typo").exists()
    settings = yaml.safe_load((out / "resolved_config-engine_bench-live.yaml").read_text())
    assert settings["slots"] == [2, 3] and settings["policies"][3] == f"{broken}:Broken"
    train_slice = load_trace(out / "tiny-lm-train-trace.npz")     # both clocks learn from it, not the decode
    assert train_slice.num_requests == 4 and train_slice.meta.extra["prompts"] != trace_prompts(out)
    rows = pd.read_csv(out / "engine.csv")
    assert {"model", "mode", "policy", "cache_slots", "tokens_per_s", "tpot_ms_mean", "hit_rate", "bytes_moved",
            "copy_GBps", "gpu_mem_GB"} <= set(rows.columns)
    assert rows["mode"].tolist() == ["fully-resident", "engine-all-resident"] + ["live"] * 14
    live = rows[rows["mode"] == "live"]
    assert (live["tokens_per_s"] > 0).all() and (live["runs"] == 1).all() and live["spread_pct"].isna().all()
    correctness = pd.read_csv(out / "correctness.csv")
    assert len(correctness) == 1 + 15       # the recording, then the all-resident engine and every policy
    assert correctness.loc[correctness["lossless"], "identical_to_fully_resident"].all()
    parity = json.loads((out / "hf_parity.json").read_text())
    assert parity["relative"] < 1e-4 and parity["argmax_agreement"] == 1.0
    policies = pd.read_csv(out / "policies.csv")
    assert {"policy", "cache_slots", "tokens_per_s", "spread_pct", "runs", "outliers", "outlier_causes",
            "sim_tokens_per_s", "hit_rate", "lossy"} <= set(policies.columns)
    assert len(policies) == 14 and (policies["sim_tokens_per_s"] > 0).all()
    # engine and simulator drive the same controller on the same routing, static learning from the same
    # training slice in both: on-demand hit rates agree (timing cannot change them)
    lossless = policies[policies["policy"].isin(["lru", "static", "belady"])]
    assert (lossless["hit_rate_all_steps"] - lossless["sim_hit_rate_all_steps"]).abs().max() < 1e-9
    # hit_rate counts the steps tokens/s counts (the generated tokens'), prompt_hit_rate the prompts'
    live_rows = rows[rows["mode"] == "live"]
    assert live_rows["hit_rate"].notna().all() and live_rows["prompt_hit_rate"].notna().all()
    assert (live_rows["hit_rate"] != live_rows["hit_rate_all_steps"]).any()
    assert policies.loc[policies["lossy"], "top1_agreement"].between(0, 1).all()
    # the simulator's profile is this machine's, calibrated as experiments.validate calibrates: every asked
    # policy's own host work beside LRU's (the broken one's failure recorded, not fatal)
    profile = yaml.safe_load((out / "cpu-measured.yaml").read_text())
    entry = profile["measured_compute"]["tiny-lm"]["fp32"]      # float32 on the CPU: fp32, named with the command
    assert profile["description"].startswith("cpu, calibrated by python -m experiments.engine_bench live in fp32")
    assert {"MixtralOffloading", "Lookahead"} <= set(entry["decision_us"]) and "layer_overhead_us" in entry
    calibration = json.loads((out / "calibration.json").read_text())
    assert "Broken" in str(calibration["failed"]) or "broken" in str(calibration["failed"])
    # the predictors the asked policies consult (mixtral-offloading: pregate, speculating-experts-lossy:
    # quasi, lookahead: the gate), trained and scored; the offline context gate only with --recall
    recall = pd.read_csv(out / "gate_recall.csv")
    assert set(recall["predictor"]) == {"pregate", "quasi", "lookahead", "affinity"}
    text = recall[recall["source"].str.contains("held-out text")]
    assert set(text["predictor"]) == {"pregate", "quasi", "lookahead"}
    assert (text["tokens"] == 256).all()
    gates = recall.set_index("predictor")["gate_parameters"]
    assert gates["lookahead"].max() > 0 and gates["pregate"].max() == 0
    assert (out / "tiny-lm-gate").is_dir()
    trace = load_trace(out / "tiny-lm-trace.npz")
    assert trace.hidden_states.shape[0] == trace.num_tokens == 2 * (6 + 6)
    assert set(trace.predictions) == {"pregate", "quasi", "lookahead"}
    timed = load_trace(out / "tiny-lm-lru-2-timed.npz")
    assert timed.timings["copy_start_ms"].shape == (timed.num_tokens, 2, 2)
    assert (timed.timings["copy_start_ms"] >= 0).any()


@needs_corpus
def test_live_trains_no_predictor_when_no_asked_policy_consults_one(tmp_path, monkeypatch, tiny_lm):
    import real.bench.predictor_suite as suite
    from experiments.engine_bench import main as bench

    def refused(*args, **kwargs):
        raise AssertionError("no asked policy consults a predictor: nothing may be captured or trained")

    monkeypatch.setattr(suite, "capture_hidden_states", refused)
    monkeypatch.setattr(suite, "train_lookahead_gate", refused)
    out = tmp_path / "bench"
    started = time.monotonic()
    bench(["live", "--model", str(tiny_lm), "--out", str(out), "--device", "cpu", "--dtype", "float32",
           "--repeats", "1", "--prompts", "1", "--prompt-len", "4", "--new-tokens", "3", "--slots", "2",
           "--train-prompts", "1", "--policies", "lru,belady", "--score-seqs", "1", "--score-len", "8"])
    took = time.monotonic() - started
    assert not (out / "tiny-lm-gate").exists() and not (out / "gate_recall.csv").exists()
    assert load_trace(out / "tiny-lm-trace.npz").predictions == {}
    policies = pd.read_csv(out / "policies.csv")
    assert sorted(policies["policy"]) == ["belady", "lru"] and (policies["tokens_per_s"] > 0).all()
    assert took < 60, f"{took:.0f} s"


@needs_corpus
def test_live_recall_trains_and_scores_every_predictor_whatever_the_policies(tmp_path, tiny_lm):
    from experiments.engine_bench import main as bench
    out = tmp_path / "bench"
    bench(["live", "--model", str(tiny_lm), "--out", str(out), "--device", "cpu", "--dtype", "float32",
           "--repeats", "1", "--prompts", "1", "--prompt-len", "4", "--new-tokens", "3", "--slots", "2",
           "--train-prompts", "1", "--policies", "lru", "--recall", *GATE_ARGS, "--score-seqs", "1",
           "--score-len", "8"])
    recall = pd.read_csv(out / "gate_recall.csv")
    assert set(recall["predictor"]) == {"pregate", "quasi", "lookahead", "lookahead-context", "affinity"}
    text = recall[recall["source"].str.contains("held-out text")]
    assert set(text["predictor"]) == {"pregate", "quasi", "lookahead", "lookahead-context"}
    gates = recall.set_index("predictor")["gate_parameters"]
    assert gates["lookahead-context"].max() > gates["lookahead"].max() > 0 and gates["pregate"].max() == 0
    assert (out / "tiny-lm-gate").is_dir()


def test_replay_on_cpu_publishes_the_median_of_interleaved_repeats(tmp_path, capsys, monkeypatch):
    from experiments.engine_bench import main as bench
    trace = tmp_path / "tiny.npz"
    save_trace(synthetic_trace(num_tokens=32, num_layers=2, num_experts=4, top_k=2, num_requests=4, seed=2), trace)
    out = tmp_path / "replay"
    torch.set_num_threads(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench(["replay", "--trace", str(trace), "--policies", "lru,oracle", "--slots", "2,3",
           "--max-tokens", "4", "--warmup-tokens", "2", "--repeats", "3", "--out", str(out)])
    engine = pd.read_csv(out / "engine.csv")
    assert engine[["policy", "cache_slots"]].values.tolist() == [["lru", 2], ["lru", 3], ["oracle", 2], ["oracle", 3]]
    assert (engine["model"] == "synthetic-L2-E4-k2").all() and (engine["mode"] == "shape-replay").all()
    assert list(engine.columns[4:11]) == ["tokens_per_s", "spread_pct", "runs", "errors", "outliers",
                                          "outlier_causes", "long_enough"]
    assert (engine["runs"] == 3).all() and (engine["errors"] == 0).all() and (engine["tokens"] == 4).all()
    runs = pd.read_csv(out / "noise_runs.csv")
    assert set(runs["session"]) == {"replay-synthetic-L2-E4-k2"} and len(runs) == 12
    assert runs["identical_tokens"].all() and runs["error"].isna().all() and (runs["steps"] == 4).all()
    order = runs.loc[runs["round"] == 0, "config"].tolist()
    for r in (1, 2):        # interleaved: each round runs every configuration once, the order rotated
        assert runs.loc[runs["round"] == r, "config"].tolist() == order[r:] + order[:r]
    for row in engine.itertuples():      # the figure is the median of its runs; the spread is theirs
        mine = runs[(runs["policy"] == row.policy) & (runs["cache_slots"] == row.cache_slots)]["tokens_per_s"]
        assert row.tokens_per_s == pytest.approx(mine.median(), rel=1e-12)
        assert row.spread_pct == pytest.approx(100 * (mine.max() - mine.min()) / mine.median(), rel=1e-9)
        assert row.outliers == int(runs.loc[mine.index, "outlier"].sum())
    correctness = pd.read_csv(out / "correctness.csv")     # every measured run's tokens checked, as README says
    assert correctness[["policy", "cache_slots"]].values.tolist() == engine[["policy", "cache_slots"]].values.tolist()
    assert (correctness["runs_checked"] == 3).all() and correctness["identical_to_reference"].all()
    assert correctness["reference"].str.startswith("the first lossless run's").all()
    floor = pd.read_csv(out / "noise_floor.csv")
    assert len(floor) == 4 and (floor["n"] == 3).all() and floor["warmup_passes"].ge(2).all()
    sessions = json.loads((out / "noise_sessions.json").read_text())
    assert sessions["replay-synthetic-L2-E4-k2"]["settings"]["repeats"] == 3
    captured = capsys.readouterr()
    printed = captured.out
    assert re.search(r"policy\s+cache_slots\s+tokens_per_s\s+spread_pct\s+runs", printed)
    assert "note: no CUDA device is visible: running on the CPU" in captured.err    # no silent fallback
    assert yaml.safe_load((out / "resolved_config-engine_bench-replay.yaml").read_text())["device"] == "cpu"
    assert torch.get_num_threads() == 1       # a CPU engine command times with one intra-op thread

    from experiments.noise import main as noise     # the noise command's report reads the session
    noise(["--report", str(out)])
    assert "session replay-synthetic-L2-E4-k2: 4 configurations" in capsys.readouterr().out

    # the smoke fast path: one cold run each, no warm-up; measured under other settings (--repeats 1, no
    # --warmup-tokens), the configuration gets a row of its own beside the first, told apart by its settings
    bench(["replay", "--trace", str(trace), "--device", "cpu", "--policies", "lru", "--slots", "2",
           "--max-tokens", "4", "--repeats", "1", "--out", str(out)])
    engine = pd.read_csv(out / "engine.csv")
    assert engine[["policy", "cache_slots", "repeats", "warmup_tokens"]].values.tolist() == [
        ["lru", 2, 3, 2], ["lru", 3, 3, 2], ["oracle", 2, 3, 2], ["oracle", 3, 3, 2], ["lru", 2, 1, 4]]
    assert engine["runs"].iloc[-1] == 1 and pd.isna(engine["spread_pct"].iloc[-1])
    assert json.loads((out / "noise_sessions.json").read_text())["replay-synthetic-L2-E4-k2"]["warmups"] == {}
    with pytest.raises(SystemExit) as exit_:     # checked before anything is built
        bench(["replay", "--trace", str(trace), "--device", "cpu", "--shape", "gpt-oss-20b", "--out", str(out)])
    assert exit_.value.code == 2 and "not gpt-oss-20b" in capsys.readouterr().err


def test_replay_refuses_policies_that_need_a_live_predictor_before_measuring(tmp_path, capsys):
    from experiments.engine_bench import main as bench
    trace = Path(__file__).parent / "data" / "tiny-moe-trace.npz"
    with pytest.raises(SystemExit) as exit_:
        bench(["replay", "--trace", str(trace), "--device", "cpu", "--out", str(tmp_path / "out"), "--repeats", "1",
               "--slots", "2", "--policies", "lookahead,mixtral-offloading,lru"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "--policies lookahead,mixtral-offloading: consult a live predictor (lookahead, pregate)" in err
    assert "engine_bench live" in err and "experiments.sweep trace=" in err
    assert not (tmp_path / "out").exists()          # nothing measured, nothing written


@pytest.mark.parametrize("raises, what", [("RuntimeError('broken on purpose')", "RuntimeError: broken on purpose"),
                                          ("SystemExit(3)", "SystemExit: 3")])     # a policy's sys.exit too
def test_a_failing_policy_is_reported_as_the_sweep_reports_it(tmp_path, capfd, raises, what):
    """One line on the console naming the policy's file, line and hook, its traceback in OUT/errors/, the
    other policies measured."""
    from experiments.engine_bench import main as bench
    broken = tmp_path / "bad.py"
    broken.write_text("from policies.lru import LRU\n\n\nclass Raises(LRU):\n    def on_access(self, *args):\n"
                      f"        raise {raises}\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        bench(["replay", "--trace", str(Path(__file__).parent / "data" / "tiny-moe-trace.npz"), "--device", "cpu",
               "--out", str(out), "--repeats", "1", "--slots", "2", "--policies", f"{broken}:Raises,lru"])
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err
    [error_file] = (out / "errors").glob("*.txt")
    line = f"{what} at {broken}:6 in on_access (traceback: {error_file})"
    assert f"1 of 1 runs failed ({line})" in str(exit_.value.code)
    assert f"round 0: error {line}" in printed.out
    assert "Traceback (most recent call last)" in error_file.read_text()
    engine = pd.read_csv(out / "engine.csv")
    assert engine.loc[engine["policy"] == "lru", "runs"].tolist() == [1]


def test_host_overlap_bench_runs_on_cpu(tmp_path):
    from experiments.bench_host_overlap import main as bench
    table = bench(["after", "--out", str(tmp_path), "--device", "cpu", "--prompts", "1", "--new-tokens", "4"])
    assert len(table) == 8 and (table["tokens_per_s"] > 0).all()
    assert (tmp_path / "host_overlap_after.csv").is_file()


def test_a_shape_too_large_for_host_memory_is_refused_before_anything_is_built():
    """A random-weight replay whose weights cannot fit in the host memory available is one line naming the
    shape, the gigabytes and the fix (not an allocator's traceback half-way through building it)."""
    import dataclasses
    from real.bench.args import host_memory_error
    from traces import ModelShape
    tiny = ModelShape("tiny", 2, 4, 2, 8, 16, 2, 1, 4, 10)
    assert host_memory_error(tiny, 4, "cpu") is None
    huge = dataclasses.replace(tiny, name="huge", num_layers=10**6, hidden_size=4096, expert_intermediate_size=14336)
    message = host_memory_error(huge, 2, "cuda")
    if Path("/proc/meminfo").exists():
        assert message is not None and "huge" in message and "GB of host memory" in message and "smaller shape" in message


def test_results_of_either_naming_are_read_under_the_current_names(tmp_path):
    """The reference is ``fully-resident`` (every expert on the compute device, a CPU's included); the
    committed results call it ``fully-on-gpu`` and are read as they are, and a command adding rows to such a
    file keeps one column per quantity."""
    from real.bench.table import CsvTable, read_table
    root = Path(__file__).resolve().parents[1] / "experiments" / "results"
    for folder in (root / "h100", root / "h200" / "engine_live"):
        old_engine, old_correctness = pd.read_csv(folder / "engine.csv"), pd.read_csv(folder / "correctness.csv")
        assert "fully-on-gpu" in set(old_engine["mode"]) and "identical_to_fully_on_gpu" in old_correctness
        engine, correctness = read_table(folder / "engine.csv"), read_table(folder / "correctness.csv")
        assert "fully-resident" in set(engine["mode"]) and "fully-on-gpu" not in set(engine["mode"])
        assert correctness["identical_to_fully_resident"].tolist() == old_correctness["identical_to_fully_on_gpu"].tolist()
        assert "identical_to_fully_on_gpu" not in correctness
    old = tmp_path / "correctness.csv"
    pd.DataFrame([{"policy": "all-resident-engine", "cache_slots": 4, "lossless": True,
                   "identical_to_fully_on_gpu": True}]).to_csv(old, index=False)
    table = CsvTable(old, keep=True)
    table.add({"mode": "live", "policy": "lru", "cache_slots": 2, "lossless": True, "identical_to_fully_resident": False})
    merged = pd.read_csv(old)
    assert "identical_to_fully_on_gpu" not in merged and merged["identical_to_fully_resident"].tolist() == [True, False]


def test_ctrl_c_ends_an_engine_command_in_one_line(tmp_path, capsys):
    from real.bench.engine_runs import interrupt_exits
    with pytest.raises(SystemExit) as exit_:
        with interrupt_exits(tmp_path):
            raise KeyboardInterrupt
    assert exit_.value.code == 130
    assert capsys.readouterr().err == f"interrupted: the tables in {tmp_path} hold every run that finished\n"


def test_a_configuration_measured_again_replaces_its_row(tmp_path):
    """engine.csv and correctness.csv keep what other commands wrote, but a configuration this command measures
    again replaces its earlier row (a command run twice into one OUT left two rows with nothing to tell them
    apart), whatever types the CSV gave back."""
    from real.bench.table import CONFIG_KEY, CsvTable
    path = tmp_path / "engine.csv"
    first = CsvTable(path, key=CONFIG_KEY)
    first.add({"model": "m", "mode": "shape-replay", "policy": "lru", "cache_slots": 2, "tokens_per_s": 10.0})
    first.add({"model": "m", "mode": "shape-replay", "policy": "lru", "cache_slots": 4, "tokens_per_s": 20.0})
    other = CsvTable(path, key=CONFIG_KEY)       # another command's row stays
    other.add({"model": "m", "mode": "live", "policy": "lru", "cache_slots": 2, "tokens_per_s": 30.0})
    again = CsvTable(path, key=CONFIG_KEY)
    again.replace([{"model": "m", "mode": "shape-replay", "policy": "lru", "cache_slots": 2, "tokens_per_s": 11.0}])
    table = pd.read_csv(path)
    assert len(table) == 3 and sorted(table["tokens_per_s"]) == [11.0, 20.0, 30.0]
    assert again.rows[len(again.kept):] == [{"model": "m", "mode": "shape-replay", "policy": "lru", "cache_slots": 2,
                                             "tokens_per_s": 11.0}]


# A policy of one's own that declares parameters and notes, each time it is built, what it was given and what built
# it: the check before anything runs (real/bench/args.py), the calibration, the simulator or an engine.
RECORDER = '''import inspect
import json
from pathlib import Path

from policies.lru import LRU

BUILDERS = (("calibration", "real/calibration.py"), ("simulator", "sim/simulator.py"), ("check", "real/bench/args.py"),
            ("engine", "real/engine.py"))


class Recorder(LRU):
    parameters = {"mark": "any value", "flag": "any value"}

    def __init__(self, ctx):
        super().__init__(ctx)
        files = [frame.filename.replace("\\\\", "/") for frame in inspect.stack()]
        by = next((name for name, part in BUILDERS if any(f.endswith(part) for f in files)), "other")
        with open(Path(__file__).with_name("received.jsonl"), "a") as f:
            f.write(json.dumps({"by": by, "params": dict(ctx.params)}) + "\\n")
'''


def recorder(tmp_path) -> tuple[str, Path]:
    """(the policy's spec, the file its notes go to)."""
    path = tmp_path / "recorder.py"
    path.write_text(RECORDER)
    return f"{path}:Recorder", tmp_path / "received.jsonl"


def received(notes: Path) -> list[dict]:
    return [json.loads(line) for line in notes.read_text().splitlines()]


def test_replay_gives_a_policy_its_policy_param_and_names_it_with_them(tmp_path, monkeypatch):
    """--policy-param NAME.KEY=VALUE reaches every engine the command builds for that policy (warm-ups and measured
    runs), its value read as the sweep reads one (7 an integer, false a boolean), and the tables name the
    configuration as the sweep's table does; a policy given none keeps its plain name."""
    from experiments.engine_bench import main as bench
    mine, notes = recorder(tmp_path)
    trace = tmp_path / "tiny.npz"
    save_trace(synthetic_trace(num_tokens=32, num_layers=2, num_experts=4, top_k=2, num_requests=4, seed=2), trace)
    out = tmp_path / "replay"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench(["replay", "--trace", str(trace), "--policies", f"lru,{mine},oracle", "--slots", "2",
           "--policy-param", f"{mine}.mark=7", "--policy-param", f"{mine}.flag=false",
           "--policy-param", "oracle.cross_tokens=false", "--max-tokens", "4", "--warmup-tokens", "2",
           "--repeats", "2", "--out", str(out)])
    notes = received(notes)
    assert all(n["params"] == {"mark": 7, "flag": False} for n in notes), notes
    runs = pd.read_csv(out / "noise_runs.csv")
    label = f"{mine} policy.flag=false policy.mark=7"       # as the sweep labels it: parameters sorted by name
    assert (runs["policy"] == label).sum() == 2
    assert [n["by"] for n in notes].count("engine") >= 2 + 1      # every run, and the warm-up
    assert [n["by"] for n in notes].count("check") == 1                 # built once before anything runs
    engine = pd.read_csv(out / "engine.csv")
    assert engine["policy"].tolist() == ["lru", label, "oracle policy.cross_tokens=false"]
    assert pd.read_csv(out / "correctness.csv")["policy"].tolist() == engine["policy"].tolist()
    assert set(runs["config"]) == {f"mode=shape-replay policy={p} cache_slots=2"
                                   for p in ("lru", label, "oracle policy.cross_tokens=false")}
    assert yaml.safe_load((out / "resolved_config-engine_bench-replay.yaml").read_text())["policy_param"] == [
        f"{mine}.mark=7", f"{mine}.flag=false", "oracle.cross_tokens=false"]



@needs_corpus
def test_live_gives_a_policy_its_policy_param_in_every_engine_and_the_simulator(tmp_path, tiny_lm):
    """engine_bench live builds the policy in its calibration, the simulator's column and the measured runs:
    each gets the parameters, and policies.csv (and the timed run's trace) name the policy with them."""
    from experiments.engine_bench import main as bench
    mine, notes = recorder(tmp_path)
    out = tmp_path / "bench"
    bench(["live", "--model", str(tiny_lm), "--out", str(out), "--device", "cpu", "--dtype", "float32",
           "--repeats", "1", "--prompts", "1", "--prompt-len", "4", "--new-tokens", "3", "--slots", "2",
           "--train-prompts", "1", "--policies", f"lru,{mine},oracle", "--policy-param", f"{mine}.mark=0.5",
           "--policy-param", "oracle.cross_tokens=false", "--timed-policy", "oracle", "--score-seqs", "1",
           "--score-len", "8"])
    notes = received(notes)
    assert all(n["params"] == {"mark": 0.5} for n in notes), notes
    assert {"check", "calibration", "simulator", "engine"} <= {n["by"] for n in notes}, notes
    label = f"{mine} policy.mark=0.5"
    policies = pd.read_csv(out / "policies.csv")
    assert sorted(policies["policy"]) == sorted(["lru", label, "oracle policy.cross_tokens=false"])
    mine_row = policies[policies["policy"] == label].iloc[0]       # an on-demand policy: both clocks count alike
    assert mine_row["hit_rate_all_steps"] == pytest.approx(mine_row["sim_hit_rate_all_steps"])
    assert mine_row["sim_tokens_per_s"] > 0
    assert label in set(pd.read_csv(out / "engine.csv")["policy"])
    timed = load_trace(out / "tiny-lm-oracle-2-timed.npz")     # the timed run: the policy with its parameters
    assert "policy oracle policy.cross_tokens=false, 2 slots" in timed.meta.description


@needs_corpus
def test_live_resumes_what_finished_and_stops_at_the_deadline_before_the_calibration(tmp_path, capsys, monkeypatch,
                                                                                     tiny_lm):
    """Run again with the same settings and code, live skips the configurations finished (the reference decodes
    once, untimed, for its tokens); a deadline passed before the calibration stops it there, cleanly, keeping
    what finished."""
    import experiments.engine_bench as engine_bench
    out = tmp_path / "bench"
    argv = ["live", "--model", str(tiny_lm), "--out", str(out), "--device", "cpu", "--repeats", "1", "--prompts", "1",
            "--prompt-len", "4", "--new-tokens", "3", "--slots", "2", "--policies", "lru", "--train-prompts", "1",
            "--score-seqs", "1", "--score-len", "8", *GATE_ARGS]
    engine_bench.main(argv)
    first = pd.read_csv(out / "engine.csv")
    capsys.readouterr()
    engine_bench.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("resumed: ") == 3 and " round 0" not in printed
    assert pd.read_csv(out / "engine.csv")["tokens_per_s"].tolist() == first["tokens_per_s"].tolist()
    monkeypatch.setattr(engine_bench, "deadline_passed", lambda args: True)
    engine_bench.main([*argv, "--fresh", "--prompt-len", "5", "--deadline-s", "600"])   # other settings: own rows
    printed = capsys.readouterr().out
    assert "passed before the calibration; not done: the calibration and every policy's runs" in printed
    engine = pd.read_csv(out / "engine.csv")
    assert engine[["mode", "prompt_len_tokens"]].values.tolist() == [
        ["fully-resident", 4], ["engine-all-resident", 4], ["live", 4], ["fully-resident", 5]]
