"""engine.csv's rows record the settings they were measured under, a row is replaced only by a re-measurement
under the same settings, a finished row is not measured again (resume, --fresh), the deadline bounds warm-ups
and the first round, a failed configuration is marked as such, and hit_rate counts the steps tokens/s counts.
All on the CPU with a tiny synthetic trace (``engine_bench replay --repeats 1``: one cold run each)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import cpu_replay as replay




def test_rows_carry_their_settings_and_other_settings_keep_their_rows(tmp_path, tiny_replay_trace):
    out = tmp_path / "out"
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2,3")
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2", "--max-tokens", "3")     # other settings: a row beside
    engine = pd.read_csv(out / "engine.csv")
    assert engine[["cache_slots", "max_tokens", "tokens"]].values.tolist() == [[2, 4, 4], [3, 4, 4], [2, 3, 3]]
    assert {"device", "dtype", "repeats", "warmup_tokens", "trace", "trace_sha256", "shape"} <= set(engine.columns)
    assert (engine["dtype"] == "float32").all() and (engine["device"] == "cpu").all()
    settings = [json.loads(s) for s in engine["settings"]]
    assert settings[0] == settings[1] and settings[0]["max_tokens"] == 4 and settings[2]["max_tokens"] == 3
    assert "out" not in settings[0] and "slots" not in settings[0] and "deadline_s" not in settings[0]
    assert engine["engine_code"].str.fullmatch(r"[0-9a-f]{16}").all()
    correctness = pd.read_csv(out / "correctness.csv")    # replay's correctness rows: stamped and kept alike
    assert correctness[["cache_slots", "max_tokens"]].values.tolist() == [[2, 4], [3, 4], [2, 3]]
    # the same settings again, forced: the row is replaced, not repeated
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "3", "--fresh")
    again = pd.read_csv(out / "engine.csv")
    assert again[["cache_slots", "max_tokens"]].values.tolist() == [[2, 4], [2, 3], [3, 4]]


def test_a_file_without_settings_columns_still_loads_and_its_rows_stay(tmp_path, tiny_replay_trace):
    out = tmp_path / "out"
    out.mkdir()
    pd.DataFrame([{"model": "synthetic-L2-E4-k2", "mode": "shape-replay", "policy": "lru", "cache_slots": 2,
                   "tokens_per_s": 1.0, "runs": 1, "errors": 0}]).to_csv(out / "engine.csv", index=False)
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2")
    engine = pd.read_csv(out / "engine.csv")
    assert len(engine) == 2 and engine["tokens_per_s"].iloc[0] == 1.0       # measured again: beside, not over it
    assert engine["settings"].iloc[0] == "unrecorded" and engine["engine_code"].iloc[0] == "unrecorded"
    assert engine["settings"].iloc[1].startswith("{")


def test_a_finished_configuration_is_skipped_and_fresh_measures_it_again(tmp_path, tiny_replay_trace, capsys):
    out = tmp_path / "out"
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2")
    first = pd.read_csv(out / "engine.csv")
    runs = len(pd.read_csv(out / "noise_runs.csv"))
    capsys.readouterr()
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2,3")
    printed = capsys.readouterr().out
    assert printed.count("resumed: ") == 1 and "policy=lru cache_slots=2 skipped" in printed
    assert "policy=lru cache_slots=3 round 0" in printed and "policy=lru cache_slots=2 round 0" not in printed
    engine = pd.read_csv(out / "engine.csv")
    assert engine["tokens_per_s"].iloc[0] == first["tokens_per_s"].iloc[0] and len(engine) == 2
    noise = pd.read_csv(out / "noise_runs.csv")         # the skipped configuration's runs stay in the noise files
    assert len(noise) == runs + 1 and noise["cache_slots"].tolist() == [2, 3]
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2", "--fresh")
    printed = capsys.readouterr().out
    assert "resumed: " not in printed and "policy=lru cache_slots=2 round 0" in printed


def test_a_row_of_other_engine_code_or_cut_short_is_measured_again(tmp_path, tiny_replay_trace, capsys, monkeypatch):
    import experiments.engine_bench as bench
    out = tmp_path / "out"
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2")
    monkeypatch.setattr(bench, "code_digest", lambda: "0123456789abcdef")      # the engine's code changed
    capsys.readouterr()
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2")
    assert "resumed: " not in capsys.readouterr().out
    engine = pd.read_csv(out / "engine.csv")
    assert engine["engine_code"].tolist() == ["0123456789abcdef"]           # same settings: replaced
    frame = engine.assign(runs=0, errors=1, failed=True)     # a failed (or interrupted) row is not finished
    frame.to_csv(out / "engine.csv", index=False)
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2")
    assert "resumed: " not in capsys.readouterr().out
    assert pd.read_csv(out / "engine.csv")["runs"].tolist() == [1]


def test_the_deadline_bounds_warm_ups_and_the_first_round(tmp_path, tiny_replay_trace, capsys):
    """A deadline already passed: no warm-up and no round starts, one line says what was not measured, exit 0."""
    from real.measurement import Config, Discipline, Measurement, RunOutput
    import time
    calls = []

    def run(config, warmup):
        calls.append((config.label, warmup))
        return RunOutput([1.0, 1.0])
    configs = [Config({"policy": "a"}), Config({"policy": "b"})]
    report = Measurement(run, configs, Discipline(repeats=3), deadline_s=1.0, started=time.monotonic() - 5,
                         calibrate=lambda n: 1.0).run_all()
    assert calls == [] and report.rows == []
    assert "before the warm-up of policy=a" in report.info["stopped"] and "policy=b" in report.info["stopped"]
    # without warm-up (--repeats 1), the first round does not start either
    report = Measurement(run, configs, Discipline(repeats=1, warmup=False), deadline_s=1.0,
                         started=time.monotonic() - 5, calibrate=lambda n: 1.0).run_all()
    assert calls == [] and report.info["stopped"].startswith("after 0 of 1 rounds")
    # the command: stops cleanly, says so, writes no row
    out = tmp_path / "out"
    replay(tiny_replay_trace, out, "--policies", "lru", "--slots", "2", "--deadline-s", "0.001")
    assert "measurement: stopped after 0 of 1 rounds" in capsys.readouterr().out
    from real.bench.table import read_table
    assert not (out / "engine.csv").exists() or read_table(out / "engine.csv").empty


def test_a_warm_up_past_the_deadline_is_not_started(capsys):
    """The second configuration's warm-up would end past the deadline at the first one's pace: it and the rest
    are not measured; the first is."""
    from real.measurement import Config, Discipline, Measurement, RunOutput
    import time
    clock = [0.0]
    calls = []

    def run(config, warmup):
        calls.append((config.fields["policy"], warmup))
        clock[0] += 4.0
        return RunOutput([1.0, 1.0])
    configs = [Config({"policy": "a"}), Config({"policy": "b"})]
    real_monotonic = time.monotonic
    start = real_monotonic()
    m = Measurement(run, configs, Discipline(repeats=2, warmup_max_passes=2), deadline_s=10.0, started=start,
                    calibrate=lambda n: 1.0)
    import real.measurement as measurement
    measurement.time.monotonic = lambda: start + clock[0]
    try:
        report = m.run_all()
    finally:
        measurement.time.monotonic = real_monotonic
    assert ("b", True) not in calls and ("b", False) not in calls
    assert {r["config"] for r in report.rows} <= {"policy=a"}
    assert "not measured: policy=b" in report.info["stopped"]


def test_a_failed_configuration_is_marked_and_the_command_exits_non_zero(tmp_path, tiny_replay_trace):
    broken = tmp_path / "bad.py"
    broken.write_text("from policies.lru import LRU\n\n\nclass Raises(LRU):\n    def on_access(self, *args):\n"
                      "        raise RuntimeError('broken on purpose')\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        replay(tiny_replay_trace, out, "--policies", f"{broken}:Raises,lru", "--slots", "2")
    assert exit_.value.code not in (0, None)
    engine = pd.read_csv(out / "engine.csv").set_index("policy")
    bad = engine.loc[f"{broken}:Raises"]
    assert bool(bad["failed"]) and "RuntimeError: broken on purpose" in bad["error"] and pd.isna(bad["tokens_per_s"])
    assert not bool(engine.loc["lru", "failed"]) and pd.isna(engine.loc["lru", "error"])
    floor = pd.read_csv(out / "noise_floor.csv").set_index("policy")      # the noise files say it too
    assert bool(floor.loc[f"{broken}:Raises", "failed"]) and "broken on purpose" in floor.loc[f"{broken}:Raises", "error"]


def test_a_live_runs_hit_rate_counts_the_generated_steps_and_the_prompts_apart():
    """decode_hit_rate / decode_misses count the steps tokens/s counts (each request's generated tokens);
    prompt_hit_rate the prompt steps; hit_rate and misses every step (what experiments.validate compares with
    the simulator): the two parts add up to the whole, step by step as the engine counts them."""
    from offload.session import RunSettings
    from policies.lru import LRU
    from real.bench.engine_runs import EngineRuns, generated_steps
    from real.engine import OffloadEngine
    from real.measurement import Config
    from real.shape_model import random_model
    from traces import synthetic_trace
    shape = synthetic_trace(num_tokens=8, num_layers=2, num_experts=4, top_k=2, num_requests=2, seed=3).model
    model = random_model(shape, "cpu", torch.float32, max_len=24)
    prompts = [[1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8, 9, 10]]
    engines = []

    def build(config):
        engines.append(OffloadEngine(model, shape, LRU, RunSettings(cache_slots=2)))
        return engines[-1]
    out = EngineRuns(model, shape, build, lambda e, warmup: e.generate(prompts, 3),
                     timed=generated_steps(prompts, 3))(Config({"policy": "lru"}), False)
    c = out.columns
    accesses = (6 + 3 + 7 + 3) * shape.num_layers * shape.top_k
    decode_accesses = 2 * 3 * shape.num_layers * shape.top_k
    hits = c["hit_rate"] * accesses
    split = c["decode_hit_rate"] * decode_accesses + c["prompt_hit_rate"] * (accesses - decode_accesses)
    assert split == pytest.approx(hits) and 0 <= c["decode_misses"] <= c["misses"]
    assert c["decode_hit_rate"] != c["hit_rate"] or c["prompt_hit_rate"] == c["hit_rate"]
    # a replay times every step: the decode figures are the whole run's, no prompt steps
    trace = synthetic_trace(num_tokens=12, num_layers=2, num_experts=4, top_k=2, num_requests=2, seed=3)
    whole = EngineRuns(model, shape, build, lambda e, warmup: e.replay(trace, 8))(Config({"policy": "lru"}), False)
    assert whole.columns["decode_hit_rate"] == whole.columns["hit_rate"]
    assert whole.columns["decode_misses"] == whole.columns["misses"]
    assert whole.columns["prompt_hit_rate"] != whole.columns["prompt_hit_rate"]       # NaN: no untimed step


@pytest.mark.parametrize("mode", ["live", "replay"])
def test_the_help_says_what_the_deadline_bounds_and_offers_fresh(mode, capsys):
    from experiments.engine_bench import main as bench
    with pytest.raises(SystemExit):
        bench([mode, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "before every configuration's warm-up" in text and "before the first round" in text
    assert "--fresh" in text


def test_rows_of_a_command_that_records_no_engine_code_are_never_taken_as_measured(tmp_path):
    """experiments.references and measure_policies pass their settings but no engine code: their rows carry the
    settings (told apart, replaced under the same ones) and read 'unrecorded' as their code, so a resumed command
    measures them again."""
    from real.bench.table import engine_table, measured_rows
    settings = {"device": "cpu", "dtype": "float32", "repeats": 1, "prompt_len": 4, "out": "x"}
    engine_table(tmp_path, settings).add({"model": "m", "mode": "fully-resident", "policy": "none", "cache_slots": 4,
                                          "tokens_per_s": 1.0, "runs": 1, "errors": 0})
    row = pd.read_csv(tmp_path / "engine.csv").iloc[0]
    assert row["engine_code"] == "unrecorded" and row["prompt_len_tokens"] == 4 and '"out"' not in row["settings"]
    assert measured_rows(tmp_path, settings) == []
    assert len(measured_rows(tmp_path, {**settings, "engine_code": "abc"})) == 0
    engine_table(tmp_path, {**settings, "engine_code": "abc"}).add({"model": "m", "mode": "fully-resident",
                                                                     "policy": "none", "cache_slots": 4, "runs": 1})
    assert len(pd.read_csv(tmp_path / "engine.csv")) == 1       # same settings: replaced, now with its code
    assert len(measured_rows(tmp_path, {**settings, "engine_code": "abc"})) == 1
