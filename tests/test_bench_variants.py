"""``experiments/bench_variants.py``'s host-path part in its CPU smoke mode: every part of a layer turn's
host time measured, and the parts add up to the layer's wall time."""
from __future__ import annotations

import numpy as np
import pandas as pd

from experiments import bench_variants


def test_smoke_host_path_parts_add_up(tmp_path):
    summary = bench_variants.main(["--out", str(tmp_path), "--smoke"])
    saved = pd.read_csv(tmp_path / "variants.csv")
    assert len(saved) == len(summary) and set(saved["part"]) == {"host"}
    assert set(saved["metric"]) == {"wait_routing_us", "routing_to_launch_us", "launches_us", "rest_us",
                                    "layer_wall_us"}
    assert np.isfinite(saved["median"]).all() and (saved["median"] > 0).all()
    m = saved.set_index("metric")["median"]
    parts = m["wait_routing_us"] + m["routing_to_launch_us"] + m["launches_us"] + m["rest_us"]
    assert abs(parts - m["layer_wall_us"]) < 0.25 * m["layer_wall_us"]     # medians of parts, not of sums
