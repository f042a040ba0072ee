"""python -m experiments.validate --timelines: both clocks' per-layer timelines from a stored validation result
(``validation.timelines``). A small CPU grid is measured once (a replay slice with an all-hit cache size and a
live slice, whose prompt steps are not timed); the comparison must account for every timed layer in both
clocks, split each step exactly into hit layers, miss layers and per-token work, agree with the engine on which
layers miss for an on-demand policy, reproduce the stored prediction, and charge an all-hit layer exactly the
simulator's constant sum."""
from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from experiments.validate import calibrated_profile, main, slice_inputs
from policies.registry import resolve_policy
from validation import timelines as tl
from validation.scenario import load_scenario
from validation.store import Store

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SCENARIO = {
    "repeats": 1,
    "hardware": "h100-pcie5",
    "slices": {
        "tiny-replay": {"mode": "replay", "shape": str(DATA / "tiny-moe.yaml"), "trace": str(DATA / "tiny-moe-trace.npz"),
                        "max_tokens": 8, "warmup_tokens": 2, "policies": ["lru", "static", "oracle"], "cache_slots": [2, 6]},
        "tiny-live": {"mode": "live", "model": "random", "shape": str(DATA / "tiny-moe-4l.yaml"), "prompts": 2,
                      "prompt_len": 3, "new_tokens": 4, "train_prompts": 2, "policies": ["lru"], "cache_slots": [2]},
    },
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A measured and predicted CPU grid (what OUT holds after python -m experiments.validate)."""
    folder = tmp_path_factory.mktemp("timelines")
    scenario = folder / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO))
    out = folder / "out"
    assert main(["--scenario", str(scenario), "--out", str(out)]) == 0
    return scenario, out


@pytest.fixture(scope="module")
def compared(stored):
    """{slice: (inputs, profile, [Config], extra)} as --timelines computes them."""
    scenario_path, out = stored
    scenario, store = load_scenario(scenario_path), Store(out)
    profile, _ = calibrated_profile(store, scenario, "cpu", write=False)
    found = {}
    for sl in scenario.slices:
        inputs = slice_inputs(sl, store)
        configs, notes = tl.compare_slice(sl, inputs, profile, store)
        assert notes == []
        calibration, extra = tl.calibration_configs(sl, store, profile)
        found[sl.name] = (sl, inputs, profile, configs, calibration, extra)
    return found


def test_the_engine_marks_become_layer_times_as_documented():
    # two layers, top-2: layer 0 all resident; layer 1 waited for one copy (k = 0)
    ms = {"layer_start_ms": [[10.0, 11.0]], "layer_ms": [[0.9, 0.5]], "stall_ms": [[0.0, 0.1]],
          "copy_start_ms": [[[-1, -1], [11.2, -1]]], "copy_end_ms": [[[-1, -1], [11.4, -1]]], "step_ms": [2.0]}
    layers = tl.engine_layers(SimpleNamespace(timings={k: np.asarray(v) for k, v in ms.items()}))
    np.testing.assert_allclose(layers.time, [[1000.0, 500.0]])      # start to start; the last layer: its layer_ms
    assert layers.missing.tolist() == [[0, 1]]
    np.testing.assert_allclose([layers.to_copy[0, 1], layers.span[0, 1], layers.after[0, 1]], [200, 200, 100])
    assert np.isnan(layers.to_copy[0, 0]) and np.isnan(layers.after[0, 0])
    np.testing.assert_allclose(layers.work, [500.0])                # the step (2 ms) less its layers (1.5 ms)
    assert tl.per_token_parts(layers) == pytest.approx({"hit": 1000.0, "miss": 500.0, "work": 500.0})


def test_the_command_writes_a_long_csv_and_a_table(stored, capsys):
    scenario, out = stored
    fitted = {p: p.stat().st_mtime_ns for p in (out / "cpu-measured.yaml", out / "profile_fit_notes.json")}
    capsys.readouterr()
    assert main(["--scenario", str(scenario), "--out", str(out), "--timelines", "tiny-replay,tiny-live"]) == 0
    text = capsys.readouterr().out
    assert "lru@6" in text and "calibration:hits@2" in text and "sim - engine per step" in text
    table = pd.read_csv(out / "timelines_tiny-replay.csv")
    assert list(table.columns) == ["slice", "config", "policy", "cache_slots", "clock", "missing", "quantity", "value"]
    assert set(table["config"]) == {f"tiny-replay:{p}:{s}" for p in ("lru", "static", "oracle") for s in (2, 6)} | {
        "tiny-replay:calibration:hits:2", "tiny-replay:calibration:misses:2", "tiny-replay:calibration:alternate:2"}
    assert set(table["clock"]) == {"engine", "sim", "sim-engine"}
    shares = table[(table["quantity"] == "share_pct") & (table["config"] == "tiny-replay:lru:2")]
    assert shares["value"].sum() == pytest.approx(100.0)
    assert (out / "timelines_tiny-live.csv").is_file()
    # the profile is fitted as the comparison fits it, but not written again
    assert {p: p.stat().st_mtime_ns for p in fitted} == fitted


def test_every_timed_layer_is_counted_in_both_clocks(compared):
    for (sl, inputs, _, configs, _, _) in compared.values():
        steps, L = int(inputs.mask.sum()), inputs.shape.num_layers
        assert len(configs) == len(sl.policies) * len(sl.cache_slots)
        for c in configs:
            for layers in (c.engine, c.sim):
                assert len(layers.token) == steps          # a live slice's prompt steps are left out
                assert sum(int(sel.sum()) for sel in tl._classes(layers.missing).values()) == steps * L
                assert (layers.time > 0).all()
            rows = pd.DataFrame(tl.clock_rows(c.sim), columns=["missing", "quantity", "value"])
            counts = rows[(rows["quantity"] == "layers") & rows["missing"].isin(tl.CLASSES)]["value"]
            assert counts.sum() == steps * L
            after = rows[(rows["quantity"] == "layers") & rows["missing"].str.startswith("0 after")]["value"]
            assert after.sum() == int((c.sim.missing[:, 1:] == 0).sum())


def test_parts_add_up_to_the_step_in_both_clocks(compared):
    for (sl, inputs, profile, configs, calibration, _) in compared.values():
        token_us = profile.compute_cost(inputs.shape, sl.precision).token_overhead_ns / 1e3
        for c in configs + calibration:
            for layers in (c.engine, c.sim):
                assert sum(tl.per_token_parts(layers).values()) == pytest.approx(layers.token.mean())
                miss = layers.missing > 0
                np.testing.assert_allclose((layers.to_copy + layers.span + layers.after)[miss], layers.time[miss],
                                           atol=1e-6)
                assert np.isnan(layers.to_copy[~miss]).all()
            np.testing.assert_allclose(c.sim.work, token_us)     # the simulator's per-token work is token_overhead


def test_on_demand_policies_miss_at_the_same_layers_and_the_replay_is_the_prediction(compared):
    for (_, _, _, configs, _, _) in compared.values():
        for c in configs:
            assert c.note == ""                   # the replay reproduces the stored prediction step for step
            assert c.routing_differs == 0
            if c.policy == "lru":
                assert c.miss_layers_differ == 0
                assert (c.engine.missing == c.sim.missing).all()


def _hit_layer_ns(sl, inputs, profile, config) -> np.ndarray:
    """[T, L]: what the simulator's model charges a layer with no copy: attention at the step's context, router,
    layer overhead, the policy's per-layer extra and top-k experts (its host decision, when no longer than
    the experts, hides behind them)."""
    cost = profile.compute_cost(inputs.shape, sl.precision)
    policy = resolve_policy(config.policy)
    assert cost.decision_ns(policy) <= inputs.shape.top_k * cost.expert_ns
    settings = sl.settings(config.cache_slots)
    starts = inputs.timed.request_starts
    positions = np.concatenate([np.arange(b - a) for a, b in itertools.pairwise(starts)])[:len(config.sim.token)]
    per_step = np.array([cost.attention_ns(settings.prompt_tokens + int(p)) for p in positions]) + \
        cost.layer_overhead_ns + cost.router_ns + cost.layer_extra_ns(policy) + inputs.shape.top_k * cost.expert_ns
    return np.broadcast_to(per_step[:, None], config.sim.time.shape)


def test_an_all_hit_layer_costs_the_simulators_constant_sum(compared):
    sl, inputs, profile, configs, _, _ = compared["tiny-replay"]
    # static at as many slots as experts pins every expert before decoding: no copy at all, in either clock
    c = next(c for c in configs if c.policy == "static" and c.cache_slots == inputs.shape.num_experts)
    assert (c.engine.missing == 0).all() and (c.sim.missing == 0).all()
    np.testing.assert_allclose(c.sim.time, _hit_layer_ns(sl, inputs, profile, c) / 1e3, rtol=0, atol=1e-9)
    rows = pd.DataFrame(tl.clock_rows(c.sim), columns=["missing", "quantity", "value"]).set_index(["missing", "quantity"])
    assert rows.loc[("0", "layers"), "value"] == c.sim.time.size and np.isnan(rows.loc[("1", "layer_median_us"), "value"])
    # LRU's hit layers, after a hit or after a miss, cost the same in the simulator
    for c in (c for c in configs if c.policy == "lru"):
        hit = c.sim.missing == 0
        np.testing.assert_allclose(c.sim.time[hit], (_hit_layer_ns(sl, inputs, profile, c) / 1e3)[hit], rtol=0,
                                   atol=1e-9)


def test_the_calibration_patterns_are_compared_too(compared):
    _sl, inputs, _, _, calibration, extra = compared["tiny-replay"]
    hits = next(c for c in calibration if c.policy == "calibration:hits")
    # after the first step (left out, as the fit leaves it) the hits pattern copies nothing in either clock
    assert (hits.engine.missing == 0).all() and (hits.sim.missing == 0).all()
    misses = next(c for c in calibration if c.policy == "calibration:misses")
    assert (misses.sim.missing == inputs.shape.top_k).all() and misses.miss_layers_differ == 0
    assert extra["resident_lru_us_per_layer"] > 0


def test_an_unknown_slice_exits_2(stored, capsys):
    scenario, out = stored
    assert main(["--scenario", str(scenario), "--out", str(out), "--timelines", "nope"]) == 2
    assert "no slice" in capsys.readouterr().err
