"""The routing comparison reads both sides through the same statistics function."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from experiments import routing_compare
from experiments.routing_compare import main
from conftest import refused


def test_comparison_table(tmp_path):
    rng = np.random.default_rng(0)
    T = 300
    experts = np.stack([np.stack([rng.choice(32, 4, replace=False) for _ in range(3)]) for _ in range(T)])
    np.savez(tmp_path / "g.npz", experts=experts.astype(np.uint8), gen_start=np.array([0, 100, 300]),
             gen_category=np.array(["math", "law"]))
    report = {"routing_summary": {"load_max_min_ratio_max": 3.0, "load_entropy_normalized_mean": 0.9,
                                  "reuse_mean": 0.5, "domain_jsd_bits_mean": 0.1, "domain_max_lift_mean": 1.5},
              "model_shape": {"top_k": 2, "experts": 8}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    main(["--model-stats", str(tmp_path / "r.json"), "--gpt-oss", str(tmp_path / "g.npz"),
          "--out", str(tmp_path / "c.csv")])
    table = pd.read_csv(tmp_path / "c.csv").set_index("statistic")
    ours, theirs = table.columns[1], table.columns[2]
    assert table.loc["random_reuse", ours] == 0.25 and table.loc["random_reuse", theirs] == 0.125
    # random routing: reuse near K/E, almost no domain information
    assert abs(table.loc["reuse_mean", theirs] - 0.125) < 0.03
    assert table.loc["domain_jsd_bits_mean", theirs] < 0.1
    assert ours == f"{tmp_path.name} (?L, top-2 of 8)"          # the model's own shape, not a fixed label
    report["model_shape"] = {"name": "tiny", "num_layers": 2, "top_k": 2, "num_experts": 4}
    (tmp_path / "r.json").write_text(json.dumps(report))
    table = main(["--model-stats", str(tmp_path / "r.json"), "--gpt-oss", str(tmp_path / "g.npz"),
                  "--out", str(tmp_path / "c.csv")])
    assert table.columns[2] == "tiny (2L, top-2 of 4)"
    assert table.set_index("statistic").loc["random_reuse", "tiny (2L, top-2 of 4)"] == 0.5


def _refused(capsys, argv, *words):
    refused(capsys, lambda: main(argv), *words)


def test_inputs_are_checked_with_one_line(tmp_path, capsys, monkeypatch):
    stats = tmp_path / "routing_stats.json"
    stats.write_text(json.dumps({"summary": {k: 1.0 for k in routing_compare.SUMMARY_KEYS}, "random_reuse": 0.5}))
    np.savez(tmp_path / "g.npz", experts=np.zeros((4, 3, 4), np.uint8), gen_start=np.array([0, 4]),
             gen_category=np.array(["math"]))
    out = ["--out", str(tmp_path / "c.csv")]
    gpt = ["--gpt-oss", str(tmp_path / "g.npz")]
    # the default --gpt-oss absent (the shared data lies elsewhere)
    monkeypatch.setattr(routing_compare, "DEFAULT_GPT_OSS", tmp_path / "shared" / "gpt-oss-20b-dev.npz")
    _refused(capsys, ["--model-stats", str(stats), *out], "--gpt-oss", "no such file", "pass --gpt-oss PATH")
    _refused(capsys, ["--model-stats", str(stats), "--gpt-oss", str(stats), *out], "not an .npz")
    np.savez(tmp_path / "other.npz", experts=np.zeros(3))
    _refused(capsys, ["--model-stats", str(stats), "--gpt-oss", str(tmp_path / "other.npz"), *out],
             "lacks the array(s) gen_start, gen_category")
    _refused(capsys, ["--model-stats", str(tmp_path / "none.json"), *gpt, *out], "--model-stats", "no such file")
    config = tmp_path / "config.json"                   # the model's config, not its statistics
    config.write_text(json.dumps({"model_type": "mixtral"}))
    _refused(capsys, ["--model-stats", str(config), *gpt, *out], "--model-stats", "neither a routing_stats.json",
             "pass MODEL_DIR/routing_stats.json")
    config.write_text("{not json")
    _refused(capsys, ["--model-stats", str(config), *gpt, *out], "not readable as JSON")
    _refused(capsys, ["--model-stats", str(stats), *gpt, "--out", str(tmp_path)], "--out", "is a folder")
    assert not (tmp_path / "c.csv").exists()
    main(["--model-stats", str(stats), *gpt, *out])
    assert (tmp_path / "c.csv").is_file()
