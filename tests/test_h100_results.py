"""The committed H100 results are consistent with the committed trace, profile and code: the simulator
half of ``policies.csv`` is recomputed here from ``traces/moe-lm-h100.npz`` and
``hardware/profiles/h100-pcie5-measured.yaml``, and the measured half is checked for what it claims."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from policies.registry import resolve_policy
from hardware.profile import load_hardware
from offload.metrics import tpot_summary
from offload.session import RunSettings
from sim.simulator import simulate
from traces import load_trace

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "h100"
PROMPT_LEN = 16     # the run's --prompt-len: the first 16 steps of each request are prompt steps


@pytest.fixture(scope="module")
def committed():
    return (load_trace(ROOT / "traces" / "moe-lm-h100.npz"), load_hardware("h100-pcie5-measured"),
            pd.read_csv(RESULTS / "policies.csv"))


def test_the_recorded_trace_has_what_the_predictors_need(committed):
    trace, _, _ = committed
    assert trace.model.name == "moe-lm" and trace.hidden_states.shape == (16, 16, 1024) and trace.num_tokens == 192
    assert {"pregate", "quasi", "lookahead"} <= set(trace.predictions)
    assert trace.predictions["lookahead"].shape == (192, 16, 3, 8)


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady", "oracle", "mixtral-offloading", "speculating-experts",
                                    "speculating-experts-lossy", "lookahead"])
def test_simulated_column_is_reproduced_from_the_committed_trace_and_profile(committed, policy):
    trace, hardware, table = committed
    mask = np.zeros(trace.num_tokens, dtype=bool)
    for a, b in zip(trace.request_starts[:-1], trace.request_starts[1:]):
        mask[a + PROMPT_LEN:b] = True
    for row in table[table["policy"] == policy].itertuples():
        # the H100 tables were simulated on the ideal link, before the simulator modelled the engine's copy
        # window (RunSettings.copies_in_flight): that model, asked for by name, still reproduces them
        sim = simulate(trace, resolve_policy(policy), hardware,
                       RunSettings(cache_slots=row.cache_slots, prefetch_depth=row.prefetch_depth,
                                   copies_in_flight=None))
        assert sim.metrics["hit_rate"] == pytest.approx(row.sim_hit_rate, abs=1e-12)
        decode = tpot_summary(np.asarray(sim.token_ns)[mask])     # the decode steps, as the engine times them
        assert decode["tokens_per_s"] == pytest.approx(row.sim_tokens_per_s, rel=1e-9)


def test_measured_claims(committed):
    _, _, table = committed
    assert table.loc[~table["lossy"], "identical_tokens"].all()
    on_demand = table[table["policy"].isin(["lru", "belady"])]
    assert (on_demand["hit_rate"] - on_demand["sim_hit_rate"]).abs().max() < 1e-12
    engine = pd.read_csv(RESULTS / "engine.csv")
    live = engine[engine["mode"] == "live"]
    assert live["copy_GBps"].min() >= 0.9 * 55       # demand copies at >= 90 % of the link figure
    correctness = pd.read_csv(RESULTS / "correctness.csv")
    assert correctness.loc[correctness["lossless"], "identical_to_fully_on_gpu"].all()
    assert len(correctness) == 1 + len(table)        # the all-resident engine, then every policy row


def test_the_timed_trace_accounts_for_every_copy_and_stall():
    """The offloaded run's layer timings (LRU, 2 slots): a layer waits only where one of its experts
    was copied, and each copy it waited for ended after it started."""
    t = load_trace(ROOT / "traces" / "moe-lm-h100-lru-2-timed.npz").timings
    copied = t["copy_start_ms"] >= 0
    assert copied.any() and (t["copy_end_ms"][copied] > t["copy_start_ms"][copied]).all()
    assert (t["stall_ms"][~copied.any(-1)] == 0).all() and (t["stall_ms"] >= 0).all()
    assert (t["layer_ms"] > 0).all()
