"""Traces shared by a sweep's workers: written once, uncompressed, and memory-mapped by every process
(``traces.io.write_mapped`` / ``load_mapped``, ``experiments.runner.share_traces``), with the results of a
trace loaded the usual way."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from experiments import runner
from traces import load_trace, save_trace, synthetic_trace
from traces.io import load_mapped, write_mapped

from conftest import sweep_cli


@pytest.fixture
def trace_path(tmp_path):
    trace = synthetic_trace(num_tokens=400, num_layers=3, num_experts=6, top_k=2, num_requests=4, seed=3)
    trace = dataclasses.replace(trace, text_bytes=np.zeros(0, dtype=np.uint8),
                                text_offsets=np.zeros(trace.num_tokens + 1, dtype=np.int64))
    path = tmp_path / "t.npz"
    save_trace(trace, path)
    return path


def _arrays(trace):
    fields = {f.name: getattr(trace, f.name) for f in dataclasses.fields(trace) if f.name != "meta"}
    return {k: v for k, v in fields.items() if isinstance(v, np.ndarray)}


def test_a_mapped_trace_is_the_loaded_trace_read_only_and_file_backed(trace_path, tmp_path):
    loaded = load_trace(trace_path)
    write_mapped(loaded, tmp_path / "shared" / "x")
    write_mapped(loaded, tmp_path / "shared" / "x")          # a second writer leaves the folder as it is
    mapped = load_mapped(tmp_path / "shared" / "x")
    assert mapped.meta == loaded.meta
    want, got = _arrays(loaded), _arrays(mapped)
    assert want.keys() == got.keys()
    for name, values in want.items():
        assert got[name].dtype == values.dtype and np.array_equal(got[name], values), name
        assert not got[name].flags.writeable, name
    assert isinstance(got["experts"].base, np.memmap)
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["x"]     # no temporary folder left


def test_share_traces_maps_the_trace_in_this_process_and_in_workers(trace_path, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_traces", {})
    monkeypatch.setattr(runner, "_slices", {})
    monkeypatch.setattr(runner, "_shared_dir", None)
    loaded = runner.cached_trace(str(trace_path))
    runner.share_traces([str(trace_path)], tmp_path / "shared")
    mapped = runner.cached_trace(str(trace_path))
    assert mapped is not loaded and isinstance(mapped.experts.base, np.memmap)
    runner._traces.clear()                                     # a worker that was not forked
    runner.use_shared_traces(tmp_path / "shared")
    assert isinstance(runner.cached_trace(str(trace_path)).experts.base, np.memmap)
    runner.use_shared_traces(None)
    runner._traces.clear()
    assert not isinstance(runner.cached_trace(str(trace_path)).experts.base, np.memmap)


def test_a_sweep_with_workers_gives_the_rows_of_one_process(trace_path, tmp_path):
    args = [f"trace={trace_path}", "policy=lru,belady,oracle", "cache_slots=2..4", "--no-plots"]
    tables = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        r = sweep_cli(*args, "--workers", workers, "--out", out)
        assert r.returncode == 0, r.stderr
        tables.append(pd.read_csv(out / "results.csv").sort_values("config_hash").reset_index(drop=True))
    pd.testing.assert_frame_equal(*tables)
    assert not (tmp_path / "w2" / ".traces").exists()         # the workers' shared copies are removed
