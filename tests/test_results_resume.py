"""Rows are deterministic and written atomically; a killed sweep resumes and loses nothing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dataclasses import replace

import pandas as pd
import pytest
import yaml

from experiments.config import RunConfig
import experiments.results as results
from experiments.results import MODEL_PACKAGES, ROW_MODULES, ResultStore, config_hash, row_inputs
from experiments.runner import ROW_COLUMNS, run_config
from experiments.sweep import main as sweep_main
from hardware.profile import PROFILES_DIR
from traces import save_trace, synthetic_trace

REPO = Path(__file__).resolve().parents[1]
HARDWARE_PROFILE = PROFILES_DIR / "h100-pcie5.yaml"
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
    assert set(perf) == {"config_hash", "sim_path_ran", "wall_s", "layer_steps", "sim_layer_steps_per_wall_s"}
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


# -- what a row depends on ---------------------------------------------------------------------

def test_config_hash_follows_the_hardware_profile_and_policy_source(trace_path, tmp_path):
    profile = tmp_path / "hw.yaml"
    profile.write_text(HARDWARE_PROFILE.read_text())
    policy = tmp_path / "mine.py"
    policy.write_text("from policies.lru import LRU\n\n\nclass Mine(LRU):\n    pass\n")
    cfg = RunConfig(trace=str(trace_path), hardware=str(profile), policy=f"{policy}:Mine")
    before = row_inputs(cfg)
    assert config_hash(cfg) == config_hash(cfg, before)

    profile.write_text(profile.read_text().replace("copy_latency_us: 9.5", "copy_latency_us: 5"))
    after = row_inputs(cfg)
    assert after["hardware_sha256"] != before["hardware_sha256"]
    assert {k for k in before if before[k] != after[k]} == {"hardware_sha256"}
    # An override changes the profile the run sees, as an edit of the file does.
    assert row_inputs(replace(cfg, copy_latency_us=5.0))["hardware_sha256"] != after["hardware_sha256"]

    policy.write_text(policy.read_text() + "\n# a comment is an edit too\n")
    assert row_inputs(cfg)["policy_sha256"] != after["policy_sha256"]
    assert config_hash(cfg) != config_hash(cfg, after)


def test_code_digest_covers_every_package_a_row_is_computed_by(trace_path):
    """Every project module that running a configuration imports lives in a digested package, or is one of
    the sweep's own modules that compute a row (``ROW_MODULES``)."""
    code = subprocess.run(
        [sys.executable, "-c",
         "import sys; from experiments.config import RunConfig; from experiments.runner import run_config; "
         f"run_config(RunConfig(trace={str(trace_path)!r}, policy='oracle', cache_slots=3, max_tokens=100)); "
         "print('\\n'.join(sorted({mod.__file__ for mod in list(sys.modules.values()) "
         f"if (getattr(mod, '__file__', None) or '').startswith({str(REPO)!r})}})))"],
        cwd=REPO, env=sweep_env(), capture_output=True, text=True, timeout=120)
    assert code.returncode == 0, code.stderr
    files = {Path(f).relative_to(REPO).as_posix() for f in code.stdout.split()}
    used = {f.split("/")[0] for f in files} - {"experiments"}
    assert used and used <= set(MODEL_PACKAGES), used - set(MODEL_PACKAGES)
    commands = {f for f in files if f.startswith("experiments/")} - {"experiments/__init__.py"}
    assert commands and commands <= set(ROW_MODULES), commands - set(ROW_MODULES)


def test_editing_the_sweeps_row_code_changes_the_code_digest_and_its_command_line_does_not(tmp_path, monkeypatch):
    """A change of the sweep's own computation (runner.py's Belady fraction, say) recomputes the rows;
    a change of the command line's printing (sweep.py) keeps them."""
    for name in ("config.py", "results.py", "runner.py", "sweep.py"):
        (tmp_path / "experiments").mkdir(exist_ok=True)
        (tmp_path / "experiments" / name).write_bytes((REPO / "experiments" / name).read_bytes())
    monkeypatch.setattr(results, "ROOT", tmp_path)
    before = results.model_code_sha256()
    sweep = tmp_path / "experiments" / "sweep.py"
    sweep.write_text(sweep.read_text().replace("resumed: ", "resumed now: "))
    assert results.model_code_sha256() == before
    runner = tmp_path / "experiments" / "runner.py"
    formula = 'result.metrics["hits"] / bound'
    assert formula in runner.read_text()
    runner.write_text(runner.read_text().replace(formula, f"2 * {formula}"))
    assert results.model_code_sha256() != before


def _sweep_once(*args):
    r = subprocess.run(sweep_cmd(*args, "--no-plots", "--workers", "1"), cwd=REPO, env=sweep_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_edited_user_policy_is_recomputed_and_says_why(trace_path, tmp_path):
    policy = tmp_path / "mine.py"
    policy.write_text("from policies.lru import LRU\n\n\nclass Mine(LRU):\n    pass\n")
    args = [f"trace={trace_path}", f"policy={policy}:Mine", "cache_slots=3", "max_tokens=400", "--out", tmp_path / "o"]
    first = _sweep_once(*args)
    assert "resumed" not in first and "stale" not in first
    lru_hits = pd.read_csv(tmp_path / "o" / "results.csv")["hits"][0]
    # Evict the evictable expert with the highest key instead: another hit count.
    policy.write_text("from policies.lru import LRU\n\n\nclass Mine(LRU):\n"
                      "    def choose_victim(self, scope, cache, job):\n"
                      "        return max(cache.evictable(scope), default=None)\n")
    second = _sweep_once(*args)
    assert "resumed" not in second
    assert ("stale: 1 of 1 configurations have rows computed from other inputs; recomputing them "
            "(policy source changed: 1)") in second
    df = pd.read_csv(tmp_path / "o" / "results.csv")
    assert len(df) == 1 and df["hits"][0] != lru_hits
    assert "resumed: 1 of 1 already done" in _sweep_once(*args)


def test_edited_hardware_profile_is_recomputed_and_recorded(trace_path, tmp_path):
    profile = tmp_path / "hw.yaml"
    profile.write_text(HARDWARE_PROFILE.read_text())
    args = [f"trace={trace_path}", f"hardware={profile}", "policy=lru", "cache_slots=3", "max_tokens=400"]
    _sweep_once(*args, "--out", tmp_path / "o")
    fast = pd.read_csv(tmp_path / "o" / "results.csv")["tokens_per_s"][0]
    # Half the link bandwidth at every copy size.
    table = "h2d_GBps_by_MiB: {0.25: 19.8, 1: 43.8, 4: 52.3, 16: 54.5, 64: 55.0}"
    profile.write_text(profile.read_text().replace(table, "h2d_GBps_by_MiB: {0.25: 9.9, 1: 21.9, 4: 26.15, 16: 27.25, 64: 27.5}"))
    again = _sweep_once(*args, "--out", tmp_path / "o")
    assert "(hardware profile changed: 1)" in again and "resumed" not in again
    slow = pd.read_csv(tmp_path / "o" / "results.csv")
    assert len(slow) == 1 and slow["tokens_per_s"][0] < fast
    resolved = yaml.safe_load((tmp_path / "o" / "resolved_config.yaml").read_text())
    assert [p["h2d_GBps_by_MiB"][64] for p in resolved["hardware"].values()] == [27.5]
    fresh, _ = run_config(RunConfig(trace=str(trace_path), hardware=str(profile), cache_slots=3, max_tokens=400))
    assert (fresh["tokens_per_s"], fresh["config_hash"]) == (slow["tokens_per_s"][0], slow["config_hash"][0])


def test_result_files_are_readable_like_any_written_file(trace_path, tmp_path):
    store = ResultStore(tmp_path)
    cfg = RunConfig(trace=str(trace_path), policy="fifo", cache_slots=2, max_tokens=100)
    store.write(*run_config(cfg))
    store.collect([config_hash(cfg)], ROW_COLUMNS, {"spec": {}})
    umask = os.umask(0o022)
    os.umask(umask)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 6      # row, perf, results.csv/.parquet, perf.csv, resolved_config.yaml
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}


def test_stale_rows_are_counted_with_the_input_that_changed(trace_path, tmp_path):
    store = ResultStore(tmp_path)
    cfg = RunConfig(trace=str(trace_path), policy="lru", cache_slots=2, max_tokens=100)
    row, perf = run_config(cfg)
    current = row_inputs(cfg)
    assert store.stale([(cfg, current)]) == (0, {})
    # The same configuration computed by other code, and by a sweep from before inputs were recorded.
    store.write({**row, "code_sha256": "0" * 64, "config_hash": "old-code"}, perf)
    other = replace(cfg, cache_slots=3)
    store.write({k: v for k, v in {**row, "cache_slots": 3, "config_hash": "old-layout"}.items()
                 if k not in ("hardware_sha256", "policy_sha256", "code_sha256")}, perf)
    count, reasons = store.stale([(cfg, current), (other, row_inputs(other))])
    assert count == 2
    assert reasons == {"code of offload/hardware/policies/sim/traces, experiments/config.py, experiments/results.py, "
                       "experiments/runner.py changed": 1,
                       "written by another version of the sweep": 1}


def test_damaged_or_foreign_row_files_are_recomputed_or_ignored_with_one_line_each(trace_path, tmp_path, capsys):
    """A truncated row, a row file holding no whole row, a truncated perf record: their configurations are
    recomputed and the files rewritten; a stray file in rows/ that is no row is ignored and left in place.
    One line each, naming the file and what is wrong; the sweep does not stop."""
    out = tmp_path / "o"
    args = [f"trace={trace_path}", "policy=lru,fifo,lfu,belady", "cache_slots=2", "max_tokens=100", "--out", out,
            "--no-plots", "--workers", "1"]
    assert sweep_main(args) == 0
    capsys.readouterr()
    df = pd.read_csv(out / "results.csv")
    h = dict(zip(df["policy"], df["config_hash"]))
    store = ResultStore(out)
    whole = {p: store.row_path(h[p]).read_bytes() for p in ("lru", "fifo")}
    store.row_path(h["lru"]).write_bytes(whole["lru"][: len(whole["lru"]) // 2])
    store.row_path(h["fifo"]).write_text('{"policy": "lru"}')
    (out / "perf" / f"{h['lfu']}.json").write_text('{"config_hash": ')
    stray = out / "rows" / "notahash.json"
    stray.write_text("not json at all")
    (out / "rows" / "mine.json").write_text('{"policy": "lru"}')

    assert sweep_main(args) == 0
    said = capsys.readouterr().out
    lines = [line for line in said.splitlines() if line.startswith("damaged: ")]
    assert len(lines) == 5, said
    assert f"damaged: {store.row_path(h['lru'])}: not valid JSON (" in said
    assert f"damaged: {store.row_path(h['fifo'])}: not a whole row: it lacks " in said
    assert f"damaged: {out / 'perf' / h['lfu']}.json: not valid JSON (" in said
    assert "recomputing its configuration (policy=lru cache_slots=2), whose run rewrites the file" in said
    assert f"damaged: {stray}: not valid JSON (" in said and "ignored, left in place" in said
    assert "resumed: 1 of 4 already done" in said and "stale" not in said
    assert {p: store.row_path(h[p]).read_bytes() for p in whole} == whole
    assert f"damaged: {out / 'rows' / 'mine.json'}: not a row: it lacks trace, cache_slots, cache_mode and " in said
    assert stray.read_text() == "not json at all" and (out / "rows" / "mine.json").is_file()
    assert len(pd.read_csv(out / "results.csv")) == 4 and len(pd.read_csv(out / "perf.csv")) == 4

    assert sweep_main(args) == 0
    said = capsys.readouterr().out
    assert "resumed: 4 of 4 already done" in said
    assert [line for line in said.splitlines() if line.startswith("damaged: ")][1:] == [
        f"damaged: {stray}: not valid JSON (Expecting value: line 1 column 1 (char 0)); it is no configuration's row: "
        f"ignored, left in place"]
