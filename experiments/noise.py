"""The engine's noise floor: identical shape-replay runs, repeated and measured with the discipline of
``real.measurement`` (untimed warm-up until steady, repeats interleaved round-robin with the order
rotated each round, median and spread per configuration, and every run's possible disturbances: host
speed, GPU clocks, garbage collection, steal time, thread placement).

    # the trained model's shape (the trace's own), three policies at three cache sizes, 5 repeats
    python -m experiments.noise --trace traces/moe-lm-h100.npz --policies lru,belady,oracle --slots 2,4,6 --out OUT
    # gpt-oss-20b's shape (38 GB of bf16 experts, pinned), a few tokens per run
    python -m experiments.noise --shape gpt-oss-20b --trace traces/samples/gpt-oss-20b-sample.npz \\
        --slots 4,8,16 --policies lru,oracle --max-tokens 24 --out OUT
    # causes, one at a time: 'before' (no warm-up, fixed order), an A/B of the decode thread on a core
    # of its own (arms interleaved), an A/B of the engine's frozen garbage collector
    python -m experiments.noise ... --session before --no-warmup --no-rotate
    python -m experiments.noise ... --session pin --configs lru:2,oracle:6 --ab decode-core --decode-core 7
    python -m experiments.noise ... --session gc --ab quiet-gc
    # the host's speed alone: the calibration workload every 50 ms, unpinned, then on each core
    python -m experiments.noise --host-probe 20 --out OUT
    # the tables of every session in OUT
    python -m experiments.noise --report OUT

Every session of one OUT shares three files, rewritten atomically after every run (a crash keeps what
was measured; running a session name again replaces its rows): OUT/noise_runs.csv (one row per run),
OUT/noise_floor.csv (one row per configuration: median tokens/s, spread, steadiness, outliers and
their causes) and OUT/noise_sessions.json (settings, machine facts, warm-ups, the host probe); the
host probe adds OUT/host_probe.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from experiments.config import policy_label
import real.engine as engine_module
from policies.registry import resolve_policy
from offload.session import RunSettings
from real.engine import OffloadEngine
from real.measurement import (CALIBRATION_ITERATIONS, ClockSampler, Config, Discipline, Measurement, Report, calibration_ms,
                              place_threads, steal_ms)
from real.bench.args import (check_kernel_switches, DTYPES, PolicyParams, add_device_arg, add_policy_param_arg, check_out, check_policy_params,
                             check_slots, config_list, cpu_threads, device_default, existing_dir, existing_file,
                             host_memory_error, non_negative_int, policy_list, positive_float, positive_int, slot_list)
from real.bench.engine_runs import EngineRuns, error_files, exit_message, run_problems
from real.bench.replay import replay_slices
from real.bench.table import NoiseFiles, update_sessions
from real.shape_model import random_model
from traces import TraceError, load_shape, load_trace
from traces.io import atomic_write

ARMS = ("decode_core", "quiet_gc")      # the configuration columns an A/B varies
REPLAY_TOKENS = 144     # default timed tokens per run: the committed moe-lm trace's replayed slice


def make_engine(model, shape, label: str, slots: int, trace, params: PolicyParams = PolicyParams()) -> OffloadEngine:
    """The one place this command builds an engine: the policy ``label`` names (``PolicyParams.label``: its name,
    with the parameters ``params`` give it) at ``slots`` per layer, ``trace`` as the future the bounds read (as
    experiments.engine_bench replay builds it)."""
    policy = params.policy(label)
    return OffloadEngine(model, shape, resolve_policy(policy),
                         RunSettings(cache_slots=slots, policy_params=params.of(policy)), future=trace,
                         train_trace=trace)


@contextmanager
def engine_quiet_gc(enabled: bool):
    """The engine decodes inside ``quiet_gc`` (the collector frozen around the run). Disabled, the engine's
    module is given a stand-in that freezes nothing, for the A/B of that cause; if the engine no longer
    enters it, this fails rather than report an A/B that is not one."""
    if enabled:
        yield
        return
    entered = []

    @contextmanager
    def unfrozen():
        entered.append(True)
        yield

    original = engine_module.quiet_gc
    engine_module.quiet_gc = unfrozen
    try:
        yield
    finally:
        engine_module.quiet_gc = original
    if not entered:
        raise RuntimeError("--no-quiet-gc: real.engine no longer decodes inside its module's quiet_gc; "
                           "the A/B needs a switch in the engine")


def replay_runs(model, shape, trace, max_tokens: int, warmup_tokens: int,
                params: PolicyParams = PolicyParams()) -> EngineRuns:
    """The run function of a shape-replay session: a fresh engine (``make_engine``, the policies given ``params``)
    replays the first ``max_tokens`` tokens of ``trace`` (a warm-up pass: ``warmup_tokens``), inside
    ``engine_quiet_gc`` as the configuration's ``quiet_gc`` arm says."""
    return EngineRuns(model, shape,
                      engine_for=lambda c: make_engine(model, shape, c.fields["policy"], c.fields["cache_slots"], trace,
                                                       params),
                      decode=lambda engine, warmup: engine.replay(trace, warmup_tokens if warmup else max_tokens),
                      around=lambda c: engine_quiet_gc(c.fields["quiet_gc"]))


def configurations(pairs: list[tuple[str, int]], decode_core: int | None, quiet_gc: bool, ab: str | None,
                   params: PolicyParams = PolicyParams()) -> list[Config]:
    """Each (policy, slots) pair, in both arms of ``ab`` (adjacent, so every round interleaves them); the
    policy column is its label (``PolicyParams.label``: with the parameters ``params`` give it)."""
    arms = [(decode_core, quiet_gc)]
    if ab == "decode-core":
        arms = [(None, quiet_gc), (decode_core, quiet_gc)]
    elif ab == "quiet-gc":
        arms = [(decode_core, True), (decode_core, False)]
    return [Config({"policy": params.label(p), "cache_slots": s, "quiet_gc": gc_on}, core)
            for p, s in pairs for core, gc_on in arms]


def host_probe(seconds: float, per_core_s: float, out: Path, period_s: float = 0.05) -> dict:
    """The host's speed beside nothing: the calibration workload (one sample) every ``period_s``, for
    ``seconds`` with the thread free to move, then ``per_core_s`` pinned to each allowed core in turn;
    the GPU's clocks sampled meanwhile. Writes OUT/host_probe.csv and the summary into
    noise_sessions.json ('host-probe'); returns the summary."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    phases = [(None, seconds)] + ([(c, per_core_s) for c in sorted(allowed)] if len(allowed) > 1 else [])
    rows = []
    steal0 = steal_ms()
    with tempfile.TemporaryDirectory(prefix="clocks-") as tmp, ClockSampler(Path(tmp) / "clocks.txt") as clocks:
        others = [clocks.pid] if clocks.pid else []
        for core, duration in phases:
            if allowed:
                place_threads(core, allowed, others)
            due = time.monotonic()
            end = due + duration
            while time.monotonic() < end:
                t_ns = time.monotonic_ns()
                rows.append({"core": "any" if core is None else core, "t_ns": t_ns, "cal_ms": calibration_ms(1)})
                due += period_s
                time.sleep(max(0.0, due - time.monotonic()))
        if allowed:
            place_threads(None, allowed, others)
        t, sm, mem, _ = clocks.samples()
        info = clocks.info
    steal1 = steal_ms()
    frame = pd.DataFrame(rows)
    frame["t_s"] = (frame["t_ns"] - frame["t_ns"].iloc[0]) / 1e9
    frame["sm_mhz"] = frame["mem_mhz"] = np.nan
    if len(t):      # each sample's clocks: the latest clock reading at or before it, if under 1 s old
        probe_ns = frame["t_ns"].to_numpy()
        at = (np.searchsorted(t, probe_ns, side="right") - 1).clip(0)
        fresh = (t[at] <= probe_ns) & (probe_ns - t[at] < 1e9)
        frame["sm_mhz"] = np.where(fresh, sm[at], np.nan)
        frame["mem_mhz"] = np.where(fresh, mem[at], np.nan)
    frame = frame.drop(columns="t_ns")
    atomic_write(out / "host_probe.csv", lambda f: frame.to_csv(f, index=False))
    free = frame.loc[frame["core"] == "any", "cal_ms"].to_numpy()
    per_core = {int(c): float(g["cal_ms"].median()) for c, g in frame[frame["core"] != "any"].groupby("core")}
    p10 = float(np.percentile(free, 10))
    summary = {
        "samples": len(free), "period_s": period_s, "cal_ms_median": float(np.median(free)), "cal_ms_p10": p10,
        "cal_ms_p90": float(np.percentile(free, 90)), "cal_ms_max": float(free.max()),
        "slow_share": float(np.mean(free > 1.5 * p10)),     # the host: ~15 ms or ~30 ms, two modes
        "per_core_cal_ms_median": per_core,
        "fastest_core": min(per_core, key=per_core.get) if per_core else None,
        "steal_ms": None if steal0 is None else steal1 - steal0,
        "sm_mhz": [float(np.nanmin(frame["sm_mhz"])), float(np.nanmedian(frame["sm_mhz"])),
                   float(np.nanmax(frame["sm_mhz"]))] if frame["sm_mhz"].notna().any() else None,
        "clocks": info, "calibration_iterations": CALIBRATION_ITERATIONS,
    }
    update_sessions(out, "host-probe", summary)
    return summary


def _probe_line(p: dict) -> str:
    cores = p["per_core_cal_ms_median"]
    line = (f"host probe: calibration {p['cal_ms_median']:.2f} ms median (p10 {p['cal_ms_p10']:.2f}, p90 "
            f"{p['cal_ms_p90']:.2f}, max {p['cal_ms_max']:.2f}), {100 * p['slow_share']:.0f} % of {p['samples']} "
            f"samples > 1.5x p10")
    if cores:
        line += (f"; per core {min(cores.values()):.2f}..{max(cores.values()):.2f} ms (fastest: core "
                 f"{p['fastest_core']})")
    line += f"; steal {p['steal_ms']} ms; SM MHz {p['sm_mhz'] or 'not read: ' + p['clocks'].get('reason', '')}"
    return line


def _report_problem(out: Path) -> str | None:
    """Why ``out`` holds no report ``print_report`` can print (no session measured, a damaged table or sessions
    file), or None. An empty folder, or another command's, printed "no sessions measured" and exited 0."""
    floor, sessions = out / "noise_floor.csv", out / "noise_sessions.json"
    recorded = {}
    if sessions.exists():
        try:
            recorded = json.loads(sessions.read_text())
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as err:
            return f"{sessions} is damaged ({' '.join(str(err).split())}); delete it and measure again"
    if not floor.is_file():
        if "host-probe" in recorded:        # a host probe alone: its line is the report
            return None
        return (f"holds no noise session (no {floor.name}): measure one with python -m experiments.noise --trace "
                f"TRACE --out {out}")
    try:
        pd.read_csv(floor)
    except (ValueError, OSError) as err:        # pandas' ParserError and EmptyDataError are ValueErrors
        return f"{floor} is damaged ({' '.join(str(err).split())}); delete it and measure again"
    return None


def print_report(out: Path, only: str | None = None) -> None:
    """The floor table of every session in OUT (or of session ``only``), the spread over its
    configurations, and each A/B's differences read against the floor."""
    sessions = json.loads((out / "noise_sessions.json").read_text()) if (out / "noise_sessions.json").exists() else {}
    if only is None and "host-probe" in sessions:
        print(_probe_line(sessions["host-probe"]))
    path = out / "noise_floor.csv"
    if not path.exists():
        print(f"no sessions measured in {out}")
        return
    floor = pd.read_csv(path)
    floor["decode_core"] = floor["decode_core"].map(lambda v: "-" if pd.isna(v) else str(int(v)))
    floor["outlier_causes"] = floor["outlier_causes"].astype(object).fillna("")   # all empty: read as float
    floor["warmup_steady"] = floor["warmup_steady"].map(lambda v: "-" if pd.isna(v) else "yes" if v else "no")
    for session, table in floor.groupby("session", sort=False):
        if only is not None and session != only:
            continue
        stopped = sessions.get(session, {}).get("stopped")
        print(f"\nsession {session}: {len(table)} configurations; spread over runs: median "
              f"{table['spread_pct'].median():.1f} %, max {table['spread_pct'].max():.1f} % "
              f"(runs without outside perturbation: median {table['spread_clean_pct'].median():.1f} %)"
              + (f"; stopped {stopped}" if stopped else ""))
        # the mode says what ran (live, shape-replay, the all-resident engine, the fully-resident model), where the
        # session has one: the all-resident engine runs as policy static at every slot
        modes = ["mode"] if "mode" in table.columns and table["mode"].notna().any() else []
        cols = [*modes, "policy", "cache_slots", *ARMS, "n", "median_tokens_per_s", "spread_pct", "spread_clean_pct",
                "warmup_steady", "long_enough", "outliers", "outlier_causes"]
        print(table[cols].rename(columns={"median_tokens_per_s": "tok/s", "spread_pct": "spread%",
                                          "spread_clean_pct": "clean%", "warmup_steady": "warm",
                                          "cache_slots": "slots"}).to_string(index=False, float_format="%.2f"))
        _print_ab(table)


def _print_ab(table: pd.DataFrame) -> None:
    """For each arm column that varies within the session: B against A per (policy, slots), in % of A,
    beside the larger of the two spreads (a difference inside it is not a difference)."""
    for arm in ARMS:
        values = list(dict.fromkeys(table[arm]))
        if len(values) != 2:
            continue
        a, b = values
        print(f"A/B {arm}: {a} -> {b}")
        for (policy, slots), g in table.groupby(["policy", "cache_slots"], sort=False):
            ra, rb = g[g[arm] == a], g[g[arm] == b]
            if len(ra) != 1 or len(rb) != 1:
                continue
            ta, tb = float(ra["median_tokens_per_s"].iloc[0]), float(rb["median_tokens_per_s"].iloc[0])
            diff = 100 * (tb - ta) / ta
            floor = max(float(ra["spread_pct"].iloc[0]), float(rb["spread_pct"].iloc[0]))
            print(f"  {policy} {slots}: {ta:.2f} -> {tb:.2f} tok/s, {diff:+.1f} % against a floor of {floor:.1f} %"
                  f"{'' if abs(diff) > floor else ' (within the noise)'}")


def session_name(text: str) -> str:
    """--session: a session's name in OUT's files; not empty, and not 'host-probe' (the host probe's entry)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give the session a name (e.g. noise, before, pin)")
    if text == "host-probe":
        raise argparse.ArgumentTypeError("host-probe is the host probe's entry in noise_sessions.json; give the "
                                         "session another name")
    return text


def check_replay(p: argparse.ArgumentParser, args) -> None:
    """Every value a replay session reads, before the model is built (``p.error``: one line naming the option and
    the fix): the device, --out, the trace and --shape (the same layers, experts and top-k), the cache sizes, the
    decode core, the policies' parameters and the host memory the shape needs. Sets ``args.shape_obj``,
    ``args.replayed`` (the requests after the trace's training quarter, up to --max-tokens) and ``args.pairs``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu for a small shape)")
    check_out(p, Path(args.out))
    try:
        trace = load_trace(args.trace)
        args.shape_obj = trace.model if args.shape is None else load_shape(args.shape)
        _, args.replayed = replay_slices(trace, args.shape_obj, args.max_tokens, args.trace,
                                      args.warmup_tokens)
        if args.max_tokens is None:
            args.max_tokens = min(REPLAY_TOKENS, args.replayed.num_tokens)
    except (TraceError, ValueError) as e:
        p.error(" ".join(str(e).split()))
    shape = args.shape_obj
    args.pairs = list(args.configs) if args.configs else [(q, s) for q in args.policies for s in args.slots]
    error = check_slots(sorted({s for _, s in args.pairs}), shape.top_k, shape.num_experts, shape.name)
    if error and args.configs:
        bad = [f"{q}:{s}" for q, s in args.pairs if not shape.top_k <= s <= shape.num_experts]
        error = f"--configs {','.join(bad)}: {error.split(': ', 1)[1]}"
    if error:
        p.error(error)
    if args.ab == "decode-core" and args.decode_core is None:
        p.error("--ab decode-core needs --decode-core N (the core the decode thread gets)")
    if args.decode_core is not None:
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        if args.decode_core not in allowed or len(allowed) < 2:
            p.error(f"--decode-core {args.decode_core}: not one of this process's CPUs "
                    f"({', '.join(map(str, sorted(allowed))) or 'unknown'}) with another left for the other threads; "
                    f"give one of them (two or more needed), or drop --decode-core")
    # the runs learn from the replayed slice itself (make_engine), at RunSettings' prefetch depth
    check_policy_params(p, args, dict.fromkeys(q for q, _ in args.pairs), policy_label, shape,
                        min(s for _, s in args.pairs), RunSettings.prefetch_depth, args.replayed, args.replayed)
    error = host_memory_error(shape, getattr(torch, args.dtype).itemsize, args.device)
    if error:
        p.error(error)


def measure(args, started: float) -> Report:
    """The replay session ``args`` describes (checked by ``check_replay``); exits with code 1 naming each failed
    configuration (``real.bench.engine_runs.run_problems``) once the tables are written."""
    out = Path(args.out)
    shape, replayed, pairs = args.shape_obj, args.replayed, args.pairs
    configs = configurations(pairs, args.decode_core, not args.no_quiet_gc, args.ab, args.policy_params)
    max_tokens = args.max_tokens          # checked against the trace (check_replay)
    warmup_tokens = min(args.warmup_tokens or max_tokens, max_tokens)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    longest = int(np.diff(replayed.request_starts).max())
    build = time.monotonic()
    model = random_model(shape, device, dtype, max_len=longest + 1)
    # not arguments: what the checks derived (--policy-param's texts, --configs' pairs are there)
    arguments = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
                 if k not in ("policy_params", "shape_obj", "replayed", "pairs")}
    if args.configs:
        arguments["configs"] = [f"{q}:{s}" for q, s in args.configs]
    settings = {"args": arguments, "shape": shape.name, "trace": str(args.trace), "tokens": max_tokens,
                "warmup_tokens": warmup_tokens, "device": str(device), "dtype": str(dtype),
                "model_build_s": round(time.monotonic() - build, 2),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(f"{shape.name}: model built in {settings['model_build_s']} s; {len(configs)} configurations x "
          f"{args.repeats} repeats of {max_tokens} tokens", flush=True)
    discipline = Discipline(repeats=args.repeats, warmup=not args.no_warmup, rotate=not args.no_rotate)
    outputs = NoiseFiles(out, args.session, settings, floor_columns={}, whole_session=True)
    runs = replay_runs(model, shape, replayed, max_tokens, warmup_tokens, args.policy_params)
    measurement = Measurement(runs, configs, discipline, on_progress=outputs.write, deadline_s=args.deadline_s,
                              started=started, on_error=error_files(out))
    report = measurement.run_all()
    outputs.write(report)
    print_report(out, only=args.session)
    problems = run_problems(report)
    if problems:
        raise SystemExit(exit_message(problems, out))
    return report


def _terminate(signum, frame):
    # `timeout` sends SIGTERM: leave through the finally blocks, which stop the clock sampler
    raise SystemExit(128 + signum)


def main(argv=None):
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=existing_file,
                        help="the routing to replay (its model shape is the default --shape)")
    parser.add_argument("--shape", help="a shape name (traces/shapes) or YAML path; default: the trace's own")
    parser.add_argument("--policies", type=policy_list, default="lru,belady,oracle")
    parser.add_argument("--slots", type=slot_list, default="2,4,6", help="expert slots per layer")
    parser.add_argument("--configs", type=config_list,
                        help="POLICY:SLOTS,... instead of every --policies x --slots pair")
    add_policy_param_arg(parser)
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="measured runs per configuration (the discipline: >= 5)")
    parser.add_argument("--max-tokens", type=positive_int,
                        help=f"replayed tokens per run (default {REPLAY_TOKENS}, or all the trace holds after its "
                             f"training slice when fewer; a value past that is refused)")
    parser.add_argument("--warmup-tokens", type=positive_int, help="tokens per warm-up pass (default: --max-tokens)")
    parser.add_argument("--no-warmup", action="store_true", help="no untimed warm-up (as before issue 11)")
    parser.add_argument("--no-rotate", action="store_true", help="the same order every round (as before issue 11)")
    parser.add_argument("--decode-core", type=non_negative_int, help="the core the decode thread gets to itself")
    parser.add_argument("--no-quiet-gc", action="store_true", help="decode without the engine's frozen collector")
    parser.add_argument("--ab", choices=["decode-core", "quiet-gc"],
                        help="measure every configuration in both arms of this cause, interleaved")
    parser.add_argument("--session", type=session_name, default="noise", help="this session's name in OUT's files")
    parser.add_argument("--deadline-s", type=positive_float,
                        help="start no round that would end later than this many seconds after the command started")
    add_device_arg(parser)
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--host-probe", type=positive_float, metavar="SECONDS",
                        help="instead of replaying: the host probe, SECONDS unpinned, then each core in turn")
    parser.add_argument("--probe-per-core", type=positive_float, default=0.5, help="seconds of the host probe per core")
    parser.add_argument("--report", metavar="OUT", type=existing_dir,
                        help="print the tables of every session in OUT and exit")
    parser.add_argument("--out", help="where the files go")
    args = parser.parse_args(argv)
    if args.report:
        if (problem := _report_problem(Path(args.report))) is not None:
            parser.error(f"--report {args.report}: {problem}")
        print_report(args.report)
        return None
    if not args.out:
        parser.error("--out is needed")
    if args.host_probe is not None:
        check_out(parser, Path(args.out))
        signal.signal(signal.SIGTERM, _terminate)
        summary = host_probe(args.host_probe, args.probe_per_core, Path(args.out))
        print(_probe_line(summary), flush=True)
        return summary
    if not args.trace:
        parser.error("--trace is needed (or --host-probe / --report)")
    device_default(args)
    check_kernel_switches(parser, args)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    cpu_threads(args.device)
    check_replay(parser, args)
    signal.signal(signal.SIGTERM, _terminate)
    return measure(args, started)


if __name__ == "__main__":
    main()
