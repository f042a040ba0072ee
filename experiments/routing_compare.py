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
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from traces.io import atomic_write, output_problem
from traces.stats import routing_stats

DEFAULT_GPT_OSS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "routing" / "gpt-oss-20b-dev.npz"
ROWS = [("load_max_min_ratio_max", "expert load: largest max/min share ratio of a layer"),
        ("load_entropy_normalized_mean", "expert load: entropy / log E, mean over layers (1 = uniform)"),
        ("reuse_mean", "consecutive-token reuse |S_t & S_t-1| / K, mean over layers"),
        ("random_reuse", "the same for random routing (K / E)"),
        ("domain_jsd_bits_mean", "domain specialisation: MI(domain; expert) in bits, mean over layers"),
        ("domain_max_lift_mean", "domain specialisation: largest share lift of an expert, mean over domains")]


GPT_OSS_ARRAYS = ("experts", "gen_start", "gen_category")
SUMMARY_KEYS = [key for key, _ in ROWS if key != "random_reuse"]


def gpt_oss_stats(path: Path) -> dict:
    data = np.load(path, allow_pickle=False)
    starts = data["gen_start"]
    labels = np.empty(int(starts[-1]), dtype=object)
    for g, category in enumerate(data["gen_category"]):
        labels[starts[g]:starts[g + 1]] = category
    return routing_stats(data["experts"][:starts[-1]], 32, domains=labels, request_starts=starts)


def _read_json(p: argparse.ArgumentParser, option: str, path: Path) -> dict:
    if not path.is_file():
        p.error(f"{option} {path}: no such file (the routing_stats.json or train_report.json in an "
                f"experiments.train_lm output folder)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        p.error(f"{option} {path}: not readable as JSON ({e}); pass the routing_stats.json or train_report.json "
                f"of experiments.train_lm")
    if not isinstance(data, dict):
        p.error(f"{option} {path}: not a routing_stats.json or train_report.json (a JSON object)")
    return data


def _model_stats(p: argparse.ArgumentParser, path: Path) -> tuple[dict, str]:
    """The trained model's statistics ({"summary", "random_reuse"}) and its column label."""
    ours = _read_json(p, "--model-stats", path)
    summary = ours.get("routing_summary", ours.get("summary"))
    if not isinstance(summary, dict):
        p.error(f"--model-stats {path}: neither a routing_stats.json ('summary') nor a train_report.json "
                f"('routing_summary') of experiments.train_lm; pass MODEL_DIR/routing_stats.json")
    if missing := [k for k in SUMMARY_KEYS if k not in summary]:
        p.error(f"--model-stats {path}: its summary lacks {', '.join(missing)}; recompute it with the current "
                f"experiments.train_lm")
    # the model's shape, from its train_report.json (the file given, or the one beside routing_stats.json)
    beside = path.parent / "train_report.json"
    report = ours if "routing_summary" in ours else _read_json(p, "--model-stats", beside) if beside.is_file() else None
    label = path.parent.name or "model"
    if report is not None:
        shape = report.get("model_shape")
        experts = shape.get("num_experts", shape.get("experts")) if isinstance(shape, dict) else None
        if not isinstance(experts, int) or not isinstance(shape.get("top_k"), int):
            p.error(f"--model-stats {path}: {'its' if report is ours else 'the train_report.json beside it:'} "
                    f"model_shape lacks top_k or num_experts; pass the train_report.json of experiments.train_lm")
        # ModelShape's field names; the H100 report (history) spelled the experts' count "experts"
        layers = shape["num_layers"] if "num_layers" in shape else shape.get("layers", "?")
        label = f"{shape.get('name', label)} ({layers}L, top-{shape['top_k']} of {experts})"
        if "routing_summary" in ours:    # a train_report.json: its summary, random reuse K / E
            ours = {"summary": summary, "random_reuse": shape["top_k"] / experts}
    if "random_reuse" not in ours:
        p.error(f"--model-stats {path}: no random_reuse in it and no train_report.json beside it; pass the "
                f"routing_stats.json of experiments.train_lm")
    return ours, label


def _check_gpt_oss(p: argparse.ArgumentParser, path: Path) -> None:
    fix = "pass --gpt-oss PATH to gpt-oss-20b-dev.npz (the shared routing data, ../shared/data/routing)"
    if not path.is_file():
        p.error(f"--gpt-oss {path}: no such file; {fix}")
    if not zipfile.is_zipfile(path):
        p.error(f"--gpt-oss {path}: not an .npz (zip) archive; {fix}")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in GPT_OSS_ARRAYS if k not in data.files]
    if missing:
        p.error(f"--gpt-oss {path}: lacks the array(s) {', '.join(missing)}; {fix}")


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-stats", required=True, type=Path,
                   help="routing_stats.json or train_report.json of experiments.train_lm")
    p.add_argument("--gpt-oss", type=Path, default=DEFAULT_GPT_OSS)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    ours, label = _model_stats(p, args.model_stats)
    _check_gpt_oss(p, args.gpt_oss)
    if (problem := output_problem(args.out, "file")) is not None:
        p.error(f"--out {args.out}: {problem}")
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
