"""python -m experiments.noise on the CPU: a tiny trace's own shape, two sessions sharing OUT's files,
an interleaved A/B, the host probe and the report."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from experiments.noise import main as noise
from conftest import refused
from traces import save_trace, synthetic_trace


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "tiny.npz"
    save_trace(synthetic_trace(num_tokens=32, num_layers=2, num_experts=4, top_k=2, num_requests=4, seed=2), path)
    return path


def test_sessions_share_the_files_and_the_report_reads_them(tiny_trace, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--trace", str(tiny_trace), "--max-tokens", "4", "--warmup-tokens", "2", "--out", str(out)]
    noise(common + ["--session", "before", "--configs", "lru:2,oracle:3", "--repeats", "2", "--no-warmup",
                    "--no-rotate"])
    noise(common + ["--session", "gc", "--configs", "lru:2", "--repeats", "1", "--ab", "quiet-gc"])
    runs = pd.read_csv(out / "noise_runs.csv")
    assert runs.groupby("session").size().to_dict() == {"before": 4, "gc": 2}
    assert runs["error"].isna().all() and (runs["steps"] == 4).all()
    assert runs["host_ms_per_layer"].notna().all() and runs["sm_mhz_median"].isna().all()   # no NVML here
    before = runs[runs["session"] == "before"]
    assert before["cold"].sum() == 2 and list(before["config"][:2]) == list(before["config"][2:])
    assert sorted(runs.loc[runs["session"] == "gc", "quiet_gc"]) == [False, True]
    floor = pd.read_csv(out / "noise_floor.csv")
    assert len(floor) == 4 and list(floor["n"]) == [2, 2, 1, 1]
    assert {"median_tokens_per_s", "spread_pct", "long_enough", "outliers", "outlier_causes"} <= set(floor.columns)
    sessions = json.loads((out / "noise_sessions.json").read_text())
    assert set(sessions) == {"before", "gc"} and sessions["gc"]["settings"]["shape"] == "synthetic-L2-E4-k2"
    assert sessions["before"]["warmups"] == {} and len(sessions["gc"]["warmups"]) == 2
    # the same session again replaces its rows, and leaves the other's
    noise(common + ["--session", "gc", "--configs", "lru:3", "--repeats", "1", "--no-warmup", "--no-quiet-gc"])
    runs = pd.read_csv(out / "noise_runs.csv")
    assert runs.groupby("session").size().to_dict() == {"before": 4, "gc": 1}
    noise(["--host-probe", "0.2", "--probe-per-core", "0.05", "--out", str(out)])
    probe = pd.read_csv(out / "host_probe.csv")
    assert (probe["core"] == "any").sum() >= 3 and (probe["cal_ms"] > 0).all()
    capsys.readouterr()
    noise(["--report", str(out)])
    printed = capsys.readouterr().out
    assert "host probe: calibration" in printed and "session before" in printed and "session gc" in printed


BAD_ARGUMENTS = [
    (["--shape", "mixtral-8x7b"], ["not mixtral-8x7b", "drop --shape"]),
    (["--slots", "5"], ["--slots 5", "use cache sizes in 2..4"]),
    (["--configs", "lru:2,oracle:5"], ["--configs oracle:5", "use cache sizes in 2..4"]),
    (["--ab", "decode-core"], ["--ab decode-core needs --decode-core"]),
    (["--policies", "lru,no-such-policy", "--slots", "2"], ["--policies", "unknown policy 'no-such-policy'"]),
    (["--policies", ""], ["--policies", "no policy given"]),
    (["--policies", "lru,lru"], ["--policies", "lru given more than once"]),
    (["--slots", ""], ["--slots", "'' is not an integer"]),
    (["--slots", "2,x"], ["--slots", "'x' is not an integer"]),
    (["--slots", "2,3,2"], ["--slots", "2 given more than once"]),
    (["--configs", "lru"], ["--configs", "'lru': expected POLICY:SLOTS"]),
    (["--configs", "lru:x"], ["--configs", "'x' is not an integer"]),
    (["--configs", "lru:2,lru:2"], ["--configs", "lru:2 given more than once"]),
    (["--configs", "nope:2"], ["--configs", "unknown policy 'nope'"]),
    (["--repeats", "0"], ["--repeats", "0: must be at least 1"]),
    (["--repeats", "-2"], ["--repeats", "-2: must be at least 1"]),
    (["--max-tokens", "0"], ["--max-tokens", "0: must be at least 1"]),
    (["--max-tokens", "-3"], ["--max-tokens", "-3: must be at least 1"]),
    (["--warmup-tokens", "0"], ["--warmup-tokens", "0: must be at least 1"]),
    (["--decode-core", "-1"], ["--decode-core", "-1: must be at least 0"]),
    (["--decode-core", "4096"], ["--decode-core 4096", "not one of this process's CPUs"]),
    (["--deadline-s", "-1"], ["--deadline-s", "-1: must be positive"]),
    (["--deadline-s", "0"], ["--deadline-s", "0: must be positive"]),
    (["--session", ""], ["--session", "give the session a name"]),
    (["--session", "host-probe"], ["--session", "host probe's entry", "another name"]),
    (["--dtype", "float8"], ["--dtype", "invalid choice: 'float8'"]),
    (["--device", "gpu"], ["--device", "invalid choice: 'gpu'"]),
    (["--trace", "/nonexistent.npz"], ["--trace", "/nonexistent.npz: no such file"]),
]


@pytest.mark.parametrize("extra, words", BAD_ARGUMENTS, ids=[" ".join(e) for e, _ in BAD_ARGUMENTS])
def test_arguments_are_checked_before_the_model_is_built(tiny_trace, tmp_path, capsys, extra, words):
    """Each bad value is one line naming the option and the fix, exit code 2, before the model is built and
    before anything is written (they were tracebacks, an IndexError, or silently measured: a repeated
    configuration, a non-positive token count or deadline)."""
    out = tmp_path / "out"
    refused(capsys, lambda: noise(["--trace", str(tiny_trace), "--out", str(out), "--device", "cpu", "--slots", "2,3",
                                   "--max-tokens", "4", *extra]), *words)
    assert not out.exists()


def test_a_replay_shape_of_another_top_k_is_refused(tiny_trace, tmp_path, capsys):
    """A --shape with the trace's layers and experts but another top-k (the runs failed inside the model's
    combine, every configuration NaN)."""
    shape = tmp_path / "k3.yaml"
    shape.write_text("name: tiny-k3\nnum_layers: 2\nnum_experts: 4\ntop_k: 3\nhidden_size: 16\n"
                     "expert_intermediate_size: 16\nnum_attention_heads: 2\nnum_kv_heads: 1\nhead_dim: 8\n"
                     "vocab_size: 64\n")
    refused(capsys, lambda: noise(["--trace", str(tiny_trace), "--shape", str(shape), "--slots", "3", "--device", "cpu",
                                   "--max-tokens", "4", "--out", str(tmp_path / "out")]), "top-2 of 4 experts", "top-3 of 4 experts",
            "drop --shape")


@pytest.mark.parametrize("where", ["a-file", "engine-dir", "errors-file"])
def test_an_out_it_cannot_write_is_refused(tiny_trace, tmp_path, capsys, where):
    """--out a file, or a folder holding a folder named like a result file, or a file named like the errors
    folder: found before anything is measured (the first write failed after the runs)."""
    out = tmp_path / "out"
    if where == "a-file":
        out.write_text("x")
        words = ["is a file, not a folder"]
    elif where == "engine-dir":
        (out / "noise_floor.csv").mkdir(parents=True)
        words = ["noise_floor.csv is a folder where the command writes a file"]
    else:
        out.mkdir()
        (out / "errors").write_text("x")
        words = ["errors is a file where the command keeps a folder"]
    refused(capsys, lambda: noise(["--trace", str(tiny_trace), "--slots", "2", "--device", "cpu", "--out", str(out)]),
            f"--out {out}", *words)
    assert not (out / "noise_runs.csv").exists()


@pytest.mark.parametrize("extra, words", [(["--host-probe", "0"], ["--host-probe", "0: must be positive"]),
                                          (["--host-probe", "0.1", "--probe-per-core", "-1"],
                                           ["--probe-per-core", "-1: must be positive"]),
                                          (["--report", "/nonexistent"], ["--report", "no such folder"])])
def test_the_probe_and_report_options_are_checked(tmp_path, capsys, extra, words):
    refused(capsys, lambda: noise([*extra, "--out", str(tmp_path / "out")]), *words)
    assert not (tmp_path / "out").exists()


def test_a_report_of_a_folder_without_a_session_or_with_a_damaged_file_is_refused(tmp_path, capsys):
    """An empty folder printed "no sessions measured" and exited 0; a damaged noise_sessions.json was a
    JSONDecodeError traceback."""
    refused(capsys, lambda: noise(["--report", str(tmp_path)]), "--report", "holds no noise session",
            "python -m experiments.noise")
    (tmp_path / "noise_floor.csv").write_text("session,policy\nx,lru\n")
    (tmp_path / "noise_sessions.json").write_text('{"x": ')
    refused(capsys, lambda: noise(["--report", str(tmp_path)]), "noise_sessions.json is damaged", "delete it")
    (tmp_path / "noise_sessions.json").write_text('{"host-probe": {}}')
    (tmp_path / "noise_floor.csv").write_text('"a,b\n')
    refused(capsys, lambda: noise(["--report", str(tmp_path)]), "noise_floor.csv is damaged", "delete it")


def test_a_failing_policy_exits_non_zero_naming_its_configuration(tiny_trace, tmp_path, capsys):
    """A policy that raises at every run: the others are measured, the tables written, the traceback filed under
    OUT/errors, and the command exits 1 naming the failed configuration (it exited 0 beside a NaN row)."""
    policy = tmp_path / "broken.py"
    policy.write_text("from policies.lru import LRU\n\n\nclass Broken(LRU):\n"
                      "    def choose_victim(self, *args, **kwargs):\n        raise RuntimeError('broken on purpose')\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        noise(["--trace", str(tiny_trace), "--max-tokens", "8", "--out", str(out), "--device", "cpu", "--repeats", "1",
               "--configs", f"lru:2,{policy}:Broken:2"])
    message = str(exit_.value.code)
    assert f"policy={policy}:Broken cache_slots=2" in message and "1 of 1 runs failed" in message
    assert "broken on purpose" in message and "lru" not in message.split("\n", 1)[1].replace(str(policy), "")
    floor = pd.read_csv(out / "noise_floor.csv")
    assert floor["n"].tolist() == [1, 0]
    assert len(list((out / "errors").glob("*.txt"))) == 1


def test_a_policy_param_reaches_its_policy_runs_and_names_its_rows(tiny_trace, tmp_path, monkeypatch):
    """--policy-param NAME.KEY=VALUE, as engine_bench takes it: every engine of that policy gets it, the others
    none, and the tables name the policy with it as the sweep's table does."""
    import experiments.noise as command
    given = []
    engine = command.OffloadEngine

    def spy(model, shape, policy_cls, settings, **kwargs):
        given.append((policy_cls.__name__, dict(settings.policy_params)))
        return engine(model, shape, policy_cls, settings, **kwargs)

    monkeypatch.setattr(command, "OffloadEngine", spy)
    out = tmp_path / "out"
    noise(["--trace", str(tiny_trace), "--max-tokens", "4", "--out", str(out), "--configs", "lru:2,oracle:3",
           "--policy-param", "oracle.cross_tokens=false", "--repeats", "2", "--no-warmup"])
    assert sorted(given) == [("LRU", {})] * 2 + [("OraclePrefetch", {"cross_tokens": False})] * 2
    floor = pd.read_csv(out / "noise_floor.csv")
    assert floor["policy"].tolist() == ["lru", "oracle policy.cross_tokens=false"]
    sessions = json.loads((out / "noise_sessions.json").read_text())
    assert sessions["noise"]["settings"]["args"]["policy_param"] == ["oracle.cross_tokens=false"]
