"""``experiments/bench_variants.py`` in its CPU smoke mode: every part of a layer turn's host time measured,
the parts adding up to the layer's wall time; and the device-side dispatch variants computing the same
experts as one expert at a time."""
from __future__ import annotations

import numpy as np
import pandas as pd

from experiments import bench_variants


def test_smoke_host_path_parts_add_up(tmp_path):
    summary = bench_variants.main(["--out", str(tmp_path), "--smoke"])
    saved = pd.read_csv(tmp_path / "variants.csv")
    assert len(saved) == len(summary) and set(saved["part"]) == {"host", "dispatch"}
    host = saved[saved["part"] == "host"]
    assert set(host["metric"]) == {"wait_routing_us", "routing_to_launch_us", "launches_us", "rest_us",
                                   "layer_wall_us"}
    assert np.isfinite(host["median"]).all() and (host["median"] > 0).all()
    m = host.set_index("metric")["median"]
    parts = m["wait_routing_us"] + m["routing_to_launch_us"] + m["launches_us"] + m["rest_us"]
    assert abs(parts - m["layer_wall_us"]) < 0.25 * m["layer_wall_us"]     # medians of parts, not of sums


def test_smoke_dispatch_variants_compute_the_same_experts(tmp_path):
    bench_variants.main(["--out", str(tmp_path), "--smoke"])
    saved = pd.read_csv(tmp_path / "variants.csv")
    dispatch = saved[saved["part"] == "dispatch"].set_index(["variant", "metric"])["median"]
    assert set(dispatch.index.get_level_values("variant")) == {"k-graphs", "grouped", "gathered"}
    for variant in ("k-graphs", "grouped", "gathered"):
        assert dispatch[(variant, "rel_err")] < 1e-2 and dispatch[(variant, "us")] > 0
