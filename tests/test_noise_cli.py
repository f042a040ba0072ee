"""python -m experiments.noise on the CPU: a tiny trace's own shape, two sessions sharing OUT's files,
an interleaved A/B, the host probe and the report."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from experiments.noise import main as noise
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


def test_arguments_are_checked_before_the_model_is_built(tiny_trace, tmp_path):
    out = ["--trace", str(tiny_trace), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="not mixtral-8x7b"):
        noise(out + ["--shape", "mixtral-8x7b"])
    with pytest.raises(SystemExit, match="use 2..4"):
        noise(out + ["--slots", "5"])
    with pytest.raises(SystemExit, match="needs --decode-core"):
        noise(out + ["--ab", "decode-core"])
    with pytest.raises(ValueError, match="unknown policy"):
        noise(out + ["--policies", "lru,no-such-policy", "--slots", "2"])
    assert not (tmp_path / "noise_runs.csv").exists()


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
