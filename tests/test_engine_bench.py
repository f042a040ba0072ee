"""The GPU measurement command's whole ``live`` flow, on the CPU with a tiny trained model."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from real.corpus import DEFAULT_CORPUS_DIR

pytestmark = pytest.mark.skipif(not DEFAULT_CORPUS_DIR.is_dir(), reason="needs ../shared/data/corpus")


def test_live_flow_on_cpu(tmp_path):
    from experiments.engine_bench import main as bench
    from real.train_lm import main as train
    model = tmp_path / "tiny-lm"
    train(["--size", "tiny", "--device", "cpu", "--max-steps", "6", "--out", str(model)])
    out = tmp_path / "bench"
    bench(["live", "--model", str(model), "--out", str(out), "--device", "cpu", "--dtype", "float32",
           "--prompts", "2", "--prompt-len", "6", "--new-tokens", "6", "--slots", "2,3",
           "--policies", "lru,belady,oracle", "--hidden-steps", "4"])
    rows = pd.read_csv(out / "engine.csv")
    assert {"model", "mode", "policy", "cache_slots", "tokens_per_s", "tpot_ms", "hit_rate", "bytes_moved",
            "copy_GBps", "gpu_mem_GB"} <= set(rows.columns)
    assert len(rows[rows["mode"] == "live"]) == 6
    assert (rows.loc[rows["mode"] == "live", "tokens_per_s"] > 0).all()
    correctness = pd.read_csv(out / "correctness.csv")
    assert correctness["identical_to_fully_on_gpu"].all() and len(correctness) == 7
    parity = json.loads((out / "hf_parity.json").read_text())
    assert parity["relative"] < 1e-4 and parity["argmax_agreement"] == 1.0
    from traces import load_trace
    trace = load_trace(out / "tiny-lm-trace.npz")
    assert trace.hidden_states.shape[0] == 4
