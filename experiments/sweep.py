"""Sweep a grid of configurations through the simulator.

    python -m experiments.sweep [key=value ...] [--config FILE.yaml] [--out DIR] [--workers N]
                                [--no-plots] [--timeline]

With no ``--config`` the scenario is ``experiments/configs/default.yaml`` (every baseline policy,
cache_slots 4..8, the committed gpt-oss-20b sample trace on h100-pcie5). ``key=value`` tokens replace
the scenario's keys: ``cache_slots=4..8``, ``policy=lru,belady``, ``cache_slots=range(4,12,2)``,
``pcie_GBps=25``, ``policy.NAME=value`` for a policy parameter.

Each finished configuration is written at once as ``OUT/rows/<config_hash>.json``; running the same
command again skips the configurations already done, so a killed sweep resumes where it stopped.
The default OUT is ``runs/sweep-<hash of the spec>/``. Bad input exits with code 2 and one line on
stderr; a configuration that fails at run time is reported by name, the others are still written,
and the exit code is 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from experiments.config import RunConfig, SweepSpec, valid_keys_text
from experiments.overrides import build_spec
from experiments.results import ResultStore, config_hash
from experiments.runner import (ROW_COLUMNS, cached_trace, hardware_for, record_timeline, run_config,
                                trace_slices, validate_grid)
from hardware.profile import hardware_to_dict

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
TIMELINE_TOKENS = 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"keys: {valid_keys_text()}\nvalues: a..b (inclusive), a,b,c, "
                                       "range(a,b[,step]) (stop exclusive), null, or a scalar; "
                                       "see experiments/configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. cache_slots=4..8 policy=lru,belady")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="scenario YAML (default: %(default)s)")
    p.add_argument("--out", type=Path, help="output dir (default: runs/sweep-<hash of the spec>)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: the CPU count; 1 runs in this process)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--timeline", action="store_true",
                   help=f"also write the first configuration's first ~{TIMELINE_TOKENS} tokens as "
                        "timeline.json (Chrome trace, opens in ui.perfetto.dev) and timeline.png")
    return p


def describe(cfg: RunConfig, keys: list[str]) -> str:
    shown = dict.fromkeys(["policy", "cache_slots", *keys])
    values = cfg.to_dict()
    parts = [f"{k}={values[k]}" for k in shown if k in values]
    parts += [f"policy.{k}={v}" for k, v in cfg.policy_params if f"policy.{k}" in keys]
    return " ".join(parts)


def _run_all(pending: list[tuple[RunConfig, str]], store: ResultStore, workers: int,
             varying: list[str]) -> list[str]:
    """Run ``pending``, writing each row as it arrives; the failures, as one line each."""
    failures = []
    bar = tqdm(total=len(pending), desc="sweep", unit="config", file=sys.stderr, disable=None)

    def failed(cfg: RunConfig, h: str, err: BaseException) -> None:
        line = f"config {h} ({describe(cfg, varying)}) failed: {type(err).__name__}: {err}"
        failures.append(line)
        tqdm.write(f"error: {line}", file=sys.stderr)

    if workers <= 1 or len(pending) <= 1:
        for cfg, h in pending:
            try:
                store.write(*run_config(cfg))
            except Exception as err:  # noqa: BLE001  (reported by name; the other configs go on)
                failed(cfg, h, err)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(pending))) as pool:
            futures = {pool.submit(run_config, cfg): (cfg, h) for cfg, h in pending}
            try:
                for future in as_completed(futures):
                    cfg, h = futures[future]
                    err = future.exception()
                    if err is None:
                        store.write(*future.result())
                    else:
                        failed(cfg, h, err)
                    bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    bar.close()
    return failures


def _resolved(spec: SweepSpec, grid: list[RunConfig], done: int) -> dict:
    """What resolved_config.yaml records: the spec, the grid, each hardware profile and trace in full."""
    hardware, traces = {}, {}
    for cfg in grid:
        overrides = cfg.hardware_overrides()
        label = cfg.hardware + "".join(f" {k}={v}" for k, v in overrides.items())
        if label not in hardware:
            hardware[label] = hardware_to_dict(hardware_for(cfg))
        if cfg.trace not in traces:
            trace = cached_trace(cfg.trace)
            meta = trace.meta
            traces[cfg.trace] = {
                "source": meta.source, "licence": meta.licence, "recorded_on": meta.recorded_on,
                "description": meta.description, "tokens": trace.num_tokens, "requests": trace.num_requests,
                "model": meta.model.to_dict(),
            }
        slices = traces[cfg.trace].setdefault("slices", {})
        train, run = trace_slices(cfg)
        slices[f"train_fraction={cfg.train_fraction} max_tokens={cfg.max_tokens}"] = {
            "train_tokens": train.num_tokens if train is not None else 0, "eval_tokens": run.num_tokens}
    return {"spec": spec.to_dict(), "grid_size": len(grid), "rows_done": done,
            "hardware": hardware, "traces": traces}


def format_table(df, varying: list[str]) -> str:
    """Rows: policy (and any other varying key); columns: cache_slots; cells: tok/s | hit rate | % of Belady."""
    # policy.NAME keys live in the one policy_params column.
    others = [k if k in df.columns else "policy_params" for k in varying if k not in ("policy", "cache_slots")]
    row_keys = list(dict.fromkeys(["policy", *others]))
    slots = sorted(df["cache_slots"].unique())
    labels, cells = [], []
    for values, group in df.groupby(row_keys, sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        labels.append(" ".join([str(values[0]), *(f"{k}={v}" for k, v in zip(row_keys[1:], values[1:]))]))
        by_slots = group.set_index("cache_slots")
        row = []
        for s in slots:
            if s not in by_slots.index:
                row.append("-")
                continue
            r = by_slots.loc[s]
            frac = r["belady_hit_fraction"]
            pct = "n/a" if frac is None or frac != frac else f"{100 * frac:.0f}%"
            row.append(f"{r['tokens_per_s']:.1f} | {r['hit_rate']:.3f} | {pct:>4}")
        cells.append(row)
    label_w = max(len("policy"), *map(len, labels))
    cell_w = max(len("tok/s | hit | %Belady"), *(len(c) for row in cells for c in row))
    header = f"{'policy':<{label_w}}  " + "  ".join(f"{f'slots={s}':>{cell_w}}" for s in slots)
    legend = f"{'':<{label_w}}  " + "  ".join(f"{'tok/s | hit | %Belady':>{cell_w}}" for _ in slots)
    lines = [header, legend, "-" * len(header)]
    lines += [f"{label:<{label_w}}  " + "  ".join(f"{c:>{cell_w}}" for c in row) for label, row in zip(labels, cells)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        spec = build_spec(args.overrides, args.config)
        grid = spec.grid()
        validate_grid(grid)
        hashes = [config_hash(cfg) for cfg in grid]
    except ValueError as err:   # ConfigError, TraceError and the registry's / profiles' errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else Path("runs") / f"sweep-{spec.short_hash()}"
    store = ResultStore(out)
    varying = spec.varying()
    pending = [(cfg, h) for cfg, h in zip(grid, hashes) if not store.done(h)]
    unique = len(dict.fromkeys(hashes))
    already = unique - len(dict.fromkeys(h for _, h in pending))
    if already:
        print(f"resumed: {already} of {unique} already done")
    failures = _run_all(pending, store, args.workers, varying)

    done = sum(store.done(h) for h in dict.fromkeys(hashes))
    df = store.collect(hashes, ROW_COLUMNS, _resolved(spec, grid, done))
    written = ["results.csv", "results.parquet", "perf.csv", "resolved_config.yaml"]
    if len(df) and not args.no_plots:
        from plots.figures import plot_hit_rate_vs_belady, plot_tokens_vs_slots
        plot_tokens_vs_slots(df, out / "tokens_vs_slots.png")
        plot_hit_rate_vs_belady(df, out / "hit_rate_vs_belady.png")
        written += ["tokens_vs_slots.png", "hit_rate_vs_belady.png"]
    if args.timeline:
        from plots.figures import plot_timeline
        from sim.chrome_trace import write_chrome_trace
        first = grid[0]
        timeline = record_timeline(first, TIMELINE_TOKENS)
        experts = cached_trace(first.trace).model.num_experts
        write_chrome_trace(timeline, out / "timeline.json", lambda k: f"L{k // experts} E{k % experts}", experts)
        plot_timeline(timeline, out / "timeline.png")
        written += ["timeline.json", "timeline.png"]

    if len(df):
        print(format_table(df, varying))
    print(f"{len(df)} of {unique} configurations in {out}/: {', '.join(written)}")
    perf = store.read_perf(hashes)
    if len(perf):
        speed = statistics.median(perf["sim_layer_steps_per_wall_s"])
        print(f"simulator speed: {speed:,.0f} layer-steps per wall second (median over {len(perf)} configs)")
    if failures:
        print(f"error: {len(failures)} of {unique} configurations failed:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
