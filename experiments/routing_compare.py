"""Routing statistics of the project's trained MoE next to gpt-oss-20b's real routing.

    python -m experiments.routing_compare --model-stats MODEL_DIR/train_report.json \
        [--gpt-oss ../shared/data/routing/gpt-oss-20b-dev.npz] --out experiments/results/h100/routing_comparison.csv

Both sides use ``traces.stats.routing_stats``: expert load skew (max/min share ratio, normalised load
entropy), consecutive-token reuse against the random-routing baseline K/E, and domain specialisation
(mutual information between a token's domain and its experts, largest lift). The trained model's
domains are the corpus domains of its held-out text; gpt-oss-20b's are the prompts' subjects
(MMLU/GPQA categories), its requests the generations.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from traces.io import atomic_write
from traces.stats import routing_stats

DEFAULT_GPT_OSS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "routing" / "gpt-oss-20b-dev.npz"
ROWS = [("load_max_min_ratio_max", "expert load: largest max/min share ratio of a layer"),
        ("load_entropy_normalized_mean", "expert load: entropy / log E, mean over layers (1 = uniform)"),
        ("reuse_mean", "consecutive-token reuse |S_t & S_t-1| / K, mean over layers"),
        ("random_reuse", "the same for random routing (K / E)"),
        ("domain_jsd_bits_mean", "domain specialisation: MI(domain; expert) in bits, mean over layers"),
        ("domain_max_lift_mean", "domain specialisation: largest share lift of an expert, mean over domains")]


def gpt_oss_stats(path: Path) -> dict:
    data = np.load(path, allow_pickle=False)
    starts = data["gen_start"]
    labels = np.empty(int(starts[-1]), dtype=object)
    for g, category in enumerate(data["gen_category"]):
        labels[starts[g]:starts[g + 1]] = category
    return routing_stats(data["experts"][:starts[-1]], 32, domains=labels, request_starts=starts)


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-stats", required=True, type=Path,
                   help="routing_stats.json or train_report.json of experiments.train_lm")
    p.add_argument("--gpt-oss", type=Path, default=DEFAULT_GPT_OSS)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    ours = json.loads(args.model_stats.read_text())
    # the model's shape, from its train_report.json (the file given, or the one beside routing_stats.json)
    beside = args.model_stats.parent / "train_report.json"
    report = ours if "routing_summary" in ours else json.loads(beside.read_text()) if beside.is_file() else None
    label = args.model_stats.parent.name or "model"
    if report is not None:
        shape = report["model_shape"]
        # ModelShape's field names; the H100 report (history) spelled the experts' count "experts"
        experts = shape["num_experts"] if "num_experts" in shape else shape["experts"]
        layers = shape["num_layers"] if "num_layers" in shape else shape.get("layers", "?")
        label = f"{shape.get('name', label)} ({layers}L, top-{shape['top_k']} of {experts})"
        if "routing_summary" in ours:    # a train_report.json: its summary, random reuse K / E
            ours = {"summary": ours["routing_summary"], "random_reuse": shape["top_k"] / experts}
    theirs = gpt_oss_stats(args.gpt_oss)
    rows = []
    for key, meaning in ROWS:
        pick = (lambda s: s[key]) if key == "random_reuse" else (lambda s: s["summary"][key])
        rows.append({"statistic": key, "meaning": meaning, label: pick(ours),
                     "gpt-oss-20b (24L, top-4 of 32)": pick(theirs)})
    table = pd.DataFrame(rows)
    atomic_write(args.out, lambda f: table.to_csv(f, index=False, float_format="%.4g"))
    print(table.drop(columns="meaning").to_string(index=False))
    return table


if __name__ == "__main__":
    main()
