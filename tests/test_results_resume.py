"""Rows are deterministic and written atomically; a killed sweep resumes and loses nothing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from experiments.config import RunConfig
from experiments.results import ResultStore, config_hash
from experiments.runner import ROW_COLUMNS, run_config
from traces import save_trace, synthetic_trace

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["policy", "cache_slots", "tokens_per_s", "hit_rate", "belady_hit_fraction", "bytes_moved",
            "config_hash", "model", "expert_bytes", "trace_tokens", "belady_hits"]


def sweep_cmd(*args):
    return [sys.executable, "-m", "experiments.sweep", *map(str, args)]


def sweep_env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "resume.npz"
    save_trace(synthetic_trace(num_tokens=1600, num_layers=4, num_experts=8, top_k=2, num_requests=16, seed=7),
               path)
    return path


def test_same_config_gives_a_byte_identical_row(trace_path, tmp_path):
    cfg = RunConfig(trace=str(trace_path), policy="lfu", cache_slots=3, max_tokens=300)
    first, perf = run_config(cfg)
    second, _ = run_config(cfg)
    a, b = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    a.write(first, perf)
    b.write(second, perf)
    h = first["config_hash"]
    assert a.row_path(h).read_bytes() == b.row_path(h).read_bytes()
    assert set(first) == set(ROW_COLUMNS)
    assert set(perf) == {"config_hash", "wall_s", "layer_steps", "sim_layer_steps_per_wall_s"}
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "a").rglob("*"))


def test_row_from_another_process_is_identical(trace_path, tmp_path):
    """A worker process (fresh caches, another hash seed) writes the same bytes as this process."""
    out = tmp_path / "out"
    r = subprocess.run(sweep_cmd(f"trace={trace_path}", "policy=belady", "cache_slots=2", "max_tokens=300",
                                 "--out", out, "--no-plots"),
                       cwd=REPO, env=sweep_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    spec_cfg = RunConfig(trace=str(trace_path), policy="belady", cache_slots=2, max_tokens=300)
    row, perf = run_config(spec_cfg)
    mine = ResultStore(tmp_path / "mine")
    mine.write(row, perf)
    h = row["config_hash"]
    assert (out / "rows" / f"{h}.json").read_bytes() == mine.row_path(h).read_bytes()
    assert row["belady_hit_fraction"] == 1.0


def test_config_hash_follows_the_config_and_the_trace_content(trace_path, tmp_path):
    cfg = RunConfig(trace=str(trace_path), cache_slots=3)
    h = config_hash(cfg)
    assert h == config_hash(RunConfig(trace=str(trace_path), cache_slots=3))
    assert h != config_hash(RunConfig(trace=str(trace_path), cache_slots=4))
    assert h != config_hash(RunConfig(trace=str(trace_path), cache_slots=3, policy_params=(("alpha", 1),)))
    edited = tmp_path / "edited.npz"
    edited.write_bytes(trace_path.read_bytes())
    before = config_hash(RunConfig(trace=str(edited), cache_slots=3))
    save_trace(synthetic_trace(num_tokens=1600, num_layers=4, num_experts=8, top_k=2, num_requests=16, seed=8),
               edited)
    os.utime(edited, ns=(1, 1))    # a different mtime even on a coarse-clock file system
    assert config_hash(RunConfig(trace=str(edited), cache_slots=3)) != before


def _rows(out: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "rows").glob("*.json")}


def test_killed_sweep_resumes_without_losing_or_repeating_rows(trace_path, tmp_path):
    args = [f"trace={trace_path}", "policy=lru,lfu,fifo", "cache_slots=2..8", "--no-plots", "--workers", "2"]
    total = 3 * 7
    killed = tmp_path / "killed"
    proc = subprocess.Popen(sweep_cmd(*args, "--out", killed), cwd=REPO, env=sweep_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list((killed / "rows").glob("*.json"))) < 3 and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the sweep and its workers, as a crash would
        proc.wait()
    before = _rows(killed)
    assert 0 < len(before) < total, f"{len(before)} rows at the kill: make the trace longer"
    for name, (data, _) in before.items():
        row = json.loads(data)                # every row on disk is whole
        assert name == f"{row['config_hash']}.json"

    again = subprocess.run(sweep_cmd(*args, "--out", killed), cwd=REPO, env=sweep_env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"resumed: {len(before)} of {total} already done" in again.stdout
    after = _rows(killed)
    assert len(after) == total
    for name, (data, mtime_ns) in before.items():
        assert after[name] == (data, mtime_ns), f"{name} was rewritten"

    clean = tmp_path / "clean"
    once = subprocess.run(sweep_cmd(*args, "--out", clean), cwd=REPO, env=sweep_env(),
                          capture_output=True, text=True, timeout=120)
    assert once.returncode == 0, once.stderr
    assert "resumed" not in once.stdout
    assert {n: d for n, (d, _) in _rows(clean).items()} == {n: d for n, (d, _) in after.items()}
    assert (clean / "results.csv").read_bytes() == (killed / "results.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(clean / "results.parquet"),
                                  pd.read_parquet(killed / "results.parquet"))

    df = pd.read_csv(killed / "results.csv")
    assert len(df) == total and df["config_hash"].is_unique
    assert sorted(zip(df["policy"], df["cache_slots"])) == sorted(
        (p, s) for p in ("lru", "lfu", "fifo") for s in range(2, 9))
    perf = pd.read_csv(killed / "perf.csv")
    assert sorted(perf["config_hash"]) == sorted(df["config_hash"])


def test_results_tables_have_the_required_columns(trace_path, tmp_path):
    configs = [RunConfig(trace=str(trace_path), policy=p, cache_slots=s, max_tokens=200)
               for p in ("fifo", "belady") for s in (4, 2, 3)]
    store = ResultStore(tmp_path)
    for cfg in configs:
        store.write(*run_config(cfg))
    hashes = [config_hash(c) for c in configs]
    df = store.collect(hashes, ROW_COLUMNS, {"spec": {"cache_slots": [4, 2, 3]}, "grid_size": 6})
    for table in (pd.read_csv(tmp_path / "results.csv"), pd.read_parquet(tmp_path / "results.parquet"), df):
        assert len(table) == len(configs)
        assert set(REQUIRED) <= set(table.columns)
        assert table["config_hash"].is_unique
        # Sorted by policy (in sweep order), then cache_slots.
        assert list(zip(table["policy"], table["cache_slots"])) == [
            ("fifo", 2), ("fifo", 3), ("fifo", 4), ("belady", 2), ("belady", 3), ("belady", 4)]
    assert (df["belady_hit_fraction"] <= 1.0 + 1e-12).all()
    assert (df[df.policy == "belady"]["belady_hit_fraction"] == 1.0).all()
    assert (df["bytes_moved"] == df["copies"] * df["expert_bytes"]).all()
    assert (tmp_path / "resolved_config.yaml").read_text().startswith("spec:")
    assert len(pd.read_csv(tmp_path / "perf.csv")) == len(configs)
