"""Per-decoder-layer times of the engine's compute path (issue 13), implementations side by side in one run.

For each model shape (random weights, ``real.shape_model.random_model``), each implementation
(``masked_window``: the attention of the graphs before issue 13, every cache position under a mask;
``sdpa``: attention over the context bucket; ``sdpa+compiled``: the same with the layer's elementwise
work as Inductor-compiled kernels, ``real.layer_ops``, the products still cuBLAS's, attention SDPA's,
the top-k ``torch.topk``; ``sdpa+reductions``: compiled, with batch-1 products, top-k and the bucket's
attention as fused reductions, the engine's default since session 9) and each context length, it
measures per decoder layer:

- ``front_us``: the graph the engine replays before a layer's experts (the previous layer's
  combine, then attention and router); ``attention_router_us``: attention + router alone (no
  combine); ``attention_us``, ``out_router_us`` (the half after attention: o_proj and its residual,
  the norm, the router and its top-k, from a fixed attention output) and ``combine_us``: the pieces
  captured alone, as the model runs them (compiled when it compiles); ``expert_us``: one
  expert's graph; ``layer_device_us``: the front graph and top-k experts replayed back to back (device
  time of a whole layer, no host in the way);
- ``engine_layer_us``: the all-resident engine's wall time per layer (``OffloadEngine`` with every
  expert in a slot: routing read-back, policy bookkeeping and launches included; the step's
  embedding, head and argmax read-back, timed alone, taken out), and ``host_us`` = that minus
  ``layer_device_us``: the time the host adds per layer (the printed table shows it as n/a on the CPU,
  where the device times are walls too, and where it comes out negative);
- ``engine_tok_s`` and ``resident_tok_s`` (the fully-on-GPU model, ``MoEModel.decode_step``), beside
  ``bound_tok_s``: the memory-bound limit, active bytes per token (non-expert weights, top-k experts
  per layer, the KV cache read at this context, the head) over the device bandwidth measured in the
  same run by a large device-to-device copy (``bandwidth_GBps``).

Device times come from CUDA events around a batch of back-to-back replays; walls from the host clock
around whole decode steps (each ends in the argmax read-back). Measurement is warmed up, and repeats
are interleaved across implementations and contexts; the table gives medians and the spread
(max - min over repeats, % of the median). ``--smoke`` runs a tiny shape on the CPU in seconds (no
graphs there: the same calls, launched eagerly; not compiled), as the tests do.

    python -m experiments.bench_layer --out runs/bench-layer          # GPU: about 2-3 minutes
    python -m experiments.bench_layer --out /tmp/bench-layer --smoke  # CPU, seconds

On the GPU the SM and memory clocks are sampled through NVML (read only, a process of its own:
``real.measurement.ClockSampler``) and each repeat's row carries the clocks seen while it ran
(``sm_mhz_min``/``median``, ``mem_mhz_min``, ``clock_event_reasons``; NaN on the CPU or without NVML); the
run ends with one line giving their range.

Writes ``layer_times.csv`` (one row per shape, implementation, context, repeat and metric),
``layer_summary.csv`` (medians and spreads) and, on the GPU, ``layer_kernels.csv`` (how many kernels
a front graph launches, and which attention kernels) under ``--out``; prints the summary table
last.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from offload.session import RunSettings
from policies.registry import resolve_policy
from real.bench.kernel_timing import Clock, bench_shape, graphed
from real.engine import OffloadEngine
from real.measurement import ClockSampler
from real.shape_model import random_model
from traces import ModelShape

SMOKE_SHAPE = ModelShape("tiny", 3, 6, 2, 32, 48, 4, 2, 8, 64)
IMPLS = ("masked_window", "sdpa", "sdpa+compiled", "sdpa+reductions")
SMOKE_IMPLS = ("masked_window", "sdpa")          # compiling on a CPU takes half a minute
METRICS = ("front_us", "attention_router_us", "attention_us", "out_router_us", "expert_us", "combine_us", "layer_device_us",
           "engine_layer_us", "host_us", "engine_tok_s", "resident_tok_s", "bound_tok_s")
SHAPE_SECONDS = {"moe-lm": 40, "gpt-oss-20b": 30, "mixtral-8x7b": 30}   # build + measure, on an H100/H200


def bandwidth_GBps(device: torch.device, clock: Clock, MiB: int) -> float:
    """Device memory bandwidth from a device-to-device copy (read + write bytes per second)."""
    src = torch.empty(MiB * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    clock.us(lambda: dst.copy_(src), 2)
    us = statistics.median(clock.us(lambda: dst.copy_(src), 5) for _ in range(5))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def active_bytes(shape: ModelShape, context: int, bytes_per_value: int = 2) -> int:
    """Bytes a decode step must read at ``context``: every non-expert weight, top-k experts per layer,
    the keys and values of ``context`` positions, the head and one embedding row."""
    H, D = shape.hidden_size, shape.head_dim
    attention = H * D * (2 * shape.num_attention_heads + 2 * shape.num_kv_heads) + 2 * H
    per_layer = attention + shape.num_experts * H + shape.top_k * shape.expert_params
    kv = 2 * context * shape.num_kv_heads * D
    return bytes_per_value * (shape.num_layers * (per_layer + kv) + shape.vocab_size * H + 2 * H)


class Bench:
    """One shape and implementation: the fully-resident model (experts on the device, graphs captured)
    and an all-resident engine over a twin with host experts."""

    def __init__(self, shape: ModelShape, impl: str, device: torch.device, dtype: torch.dtype, max_len: int,
                 clock: Clock, steps: int):
        cuda = device.type == "cuda"
        self.shape, self.clock, self.steps, self.cuda = shape, clock, steps, cuda
        attention_impl, compile_kernels, reductions = parse_impl(impl)
        self.resident = random_model(shape, device, dtype, max_len=max_len, attention_impl=attention_impl,
                                     experts_device=device, compile_kernels=compile_kernels, reductions=reductions)
        self.resident.capture_graphs()
        host_model = random_model(shape, device, dtype, max_len=max_len, attention_impl=attention_impl,
                                  compile_kernels=compile_kernels, reductions=reductions)
        self.engine = OffloadEngine(host_model, shape, resolve_policy("lru"), RunSettings(shape.num_experts))
        self._warm_engine()
        m, L, K = self.resident, shape.num_layers, shape.top_k
        self.layer = max(1, L // 2)          # a layer with a combine before it
        self.h = torch.randn((1, shape.hidden_size), generator=torch.Generator().manual_seed(0)).to(device, dtype)
        self._graphs: dict[int, tuple] = {}
        self.x = m.route(self.layer, self.h)[0]
        m.expert_out.copy_(torch.stack([m.expert(self.x, m.expert_blobs[self.layer, e]) for e in range(K)]))
        self.ids = torch.arange(K, dtype=torch.float32, device=device)
        self.weights = torch.full((K,), 1.0 / K, device=device)
        expert_graphs = m.resident_expert_graphs
        first = self.layer * shape.num_experts
        if expert_graphs is not None:
            self.expert = lambda: expert_graphs.expert(first, 0)
        else:       # the CPU: the same arithmetic, launched eagerly
            self.expert = lambda: m.expert(self.x, m.expert_blobs[self.layer, 0], out=m.expert_out[0])
        self.combine = graphed(lambda: m.moe_sum(self.layer - 1, self.h, self.x, self.ids, self.weights,
                                                  m.expert_out), cuda)
        attn = torch.randn((1, shape.num_attention_heads * shape.head_dim),
                           generator=torch.Generator().manual_seed(1)).to(device, dtype)
        self.out_router = graphed(lambda: m.output_route(self.layer, self.h, attn), cuda)
        self.head = lambda: m.final(m.embed(1)).argmax(-1)

    def _warm_engine(self) -> None:
        """Make every expert resident (slots = experts: none is evicted), so that the timed steps copy
        nothing: a few warm-up steps, then the experts random routing never chose are placed as model
        load places a preload (untimed, not counted as copies)."""
        eng = self.engine
        eng.model.reset()
        tok = 1
        for pos in range(min(16, eng.model.max_len)):
            tok, _ = eng._timed_step(tok, pos)
        eng.copies.drain()
        for key in range(self.shape.num_layers * self.shape.num_experts):
            if not eng.cache.holds(key):
                eng.slots[eng.cache.load_resident(key)].copy_(eng.arena[key])

    def _bucket_graphs(self, context: int):
        """The attention graph alone and attention + router (``front_at``, no combine) at ``context``,
        captured per bucket length."""
        m = self.resident
        length = next(b for b in m.context_buckets if b >= context)
        if length not in self._graphs:
            self._graphs[length] = (graphed(lambda: m.attention_at(self.layer, self.h, length), self.cuda),
                                    graphed(lambda: m.front_at(self.layer, self.h, length), self.cuda))
        return self._graphs[length]

    def _front(self, pos: int):
        """What the engine replays before a layer's experts: the previous layer's combine, then attention
        and router (one graph on CUDA; on the CPU the same calls, eagerly)."""
        m = self.resident
        if m.graphed:
            return lambda: m.front(self.layer)
        return lambda: m.attention_route(self.layer, m.moe_sum(self.layer - 1, self.h, self.x, self.ids, self.weights,
                                                               m.expert_out), pos)

    def measure(self, context: int, replays: int) -> dict[str, float]:
        """Every metric at ``context`` positions (the token at ``context - 1``), one repeat."""
        m, clock, shape, K = self.resident, self.clock, self.shape, self.shape.top_k
        pos = context - 1
        m.set_position(pos)
        attention, attention_router = self._bucket_graphs(context)
        front = self._front(pos)

        def layer():
            front()
            for _ in range(K):
                self.expert()

        out = {"front_us": clock.us(front, replays), "attention_router_us": clock.us(attention_router, replays),
               "attention_us": clock.us(attention, replays), "out_router_us": clock.us(self.out_router, replays),
               "expert_us": clock.us(self.expert, replays), "combine_us": clock.us(self.combine, replays),
               "layer_device_us": clock.us(layer, replays)}
        head_us = clock.us(self.head, replays)
        positions = range(max(0, context - self.steps), context)
        copies = self.engine.ctrl.stats.copies
        engine_us = statistics.median(self.engine._timed_step(1, p)[1] / 1e3 for p in positions)
        if self.engine.ctrl.stats.copies != copies:
            raise RuntimeError(f"{shape.name}: the all-resident engine copied experts while timed")
        out["engine_layer_us"] = (engine_us - head_us) / shape.num_layers
        out["host_us"] = out["engine_layer_us"] - out["layer_device_us"]
        out["engine_tok_s"] = 1e6 / engine_us
        out["resident_tok_s"] = 1e6 / statistics.median(self._resident_step_us(p) for p in positions)
        return out

    def kernels(self) -> dict:
        """Device work of one front graph (the previous combine, attention + router) run eagerly at the
        longest bucket: how many kernels (what the graph captures, less the read-back packing), and the
        names of those of the attention itself (which SDPA kernel ran)."""
        m = self.resident
        length = m.context_buckets[-1]
        m.set_position(length - 1)

        def run():
            h = m.moe_sum(self.layer - 1, self.h, self.x, self.ids, self.weights, m.expert_out)
            m.front_at(self.layer, h, length)
        run()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        attention = sorted({n for n in names if any(k in n.lower() for k in ("fmha", "flash", "attention", "softmax"))})
        return {"front_kernels": len(names), "attention_kernels": " | ".join(attention)}

    def _resident_step_us(self, pos: int) -> float:
        start = time.perf_counter()
        int(self.resident.decode_step(1, pos).argmax(-1)[0])
        return (time.perf_counter() - start) * 1e6


def _impls(text: str) -> list[str]:
    """--impls: comma-separated names of IMPLS (argparse type)."""
    impls = [i for i in text.split(",") if i]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        raise argparse.ArgumentTypeError(f"{text!r}: name implementations of {', '.join(IMPLS)}")
    return impls


def _contexts(text: str) -> list[int]:
    """--contexts: comma-separated positions >= 1 (argparse type)."""
    try:
        contexts = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers, e.g. 16,256,2048") from None
    if not contexts or min(contexts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every context must be at least 1 position")
    return contexts


def parse_impl(impl: str) -> tuple[str, bool, bool]:
    """"sdpa+compiled" -> ("sdpa", True, False): the attention implementation, whether the layer
    compiles, and whether its batch-1 products run as reductions ("+reductions", compiled too)."""
    attention_impl, _, suffix = impl.partition("+")
    if suffix not in ("", "compiled", "reductions"):
        raise ValueError(f"implementation {impl!r}: an attention implementation, optionally +compiled or +reductions")
    return attention_impl, suffix != "", suffix == "reductions"


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny shape on the CPU at contexts 4 and 16, 2 repeats, in seconds (its own shape, contexts "
                        "and counts: --shapes, --contexts, --repeats, --replays and --steps are refused with it); "
                        "uncompiled unless --impls names a +compiled or +reductions one, which compile on the CPU")
    p.add_argument("--shapes", help="moe-lm (the trained model) and/or names in traces/shapes "
                                    "(default: moe-lm,gpt-oss-20b,mixtral-8x7b)")
    p.add_argument("--layers", type=int, default=2, help="layers kept of the traces/shapes shapes")
    p.add_argument("--contexts", type=_contexts, help="comma-separated positions (default: 16,256,2048)")
    p.add_argument("--impls", type=_impls, default=None, help=f"comma-separated, of {', '.join(IMPLS)} (default: all; "
                   f"--smoke: {', '.join(SMOKE_IMPLS)})")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    p.add_argument("--replays", type=int, help="back-to-back calls per device timing (default 50)")
    p.add_argument("--steps", type=int, help="decode steps per wall-time sample (default 16)")
    args = p.parse_args(argv)
    if args.smoke:
        given = [f"--{k}" for k in ("shapes", "contexts", "repeats", "replays", "steps") if getattr(args, k) is not None]
        if given:
            p.error(f"{', '.join(given)}: --smoke runs its own tiny shape at contexts 4 and 16 with 2 repeats; drop "
                    f"{'them' if len(given) > 1 else 'it'}, or leave out --smoke")
    else:
        args.shapes = args.shapes or "moe-lm,gpt-oss-20b,mixtral-8x7b"
        args.contexts = args.contexts or [16, 256, 2048]
        args.repeats = 5 if args.repeats is None else args.repeats
        args.replays = 50 if args.replays is None else args.replays
        args.steps = 16 if args.steps is None else args.steps
    started = time.perf_counter()
    if args.smoke:
        torch.set_num_threads(1)        # a tiny shape: intra-op threads only contend for the cores
        device, dtype = torch.device("cpu"), torch.float32
        shapes, contexts = [SMOKE_SHAPE], [4, 16]
        args.repeats, args.replays, args.steps = 2, 2, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device; run with --smoke for the CPU check")
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [bench_shape(name, args.layers) for name in args.shapes.split(",")]
        contexts = args.contexts
        budget = sum(SHAPE_SECONDS.get(s.name, 60) for s in shapes) * args.repeats / 5
        print(f"expected time: about {budget / 60:.1f} min ({len(shapes)} shapes, {args.repeats} repeats)", flush=True)
    impls = args.impls or list(SMOKE_IMPLS if args.smoke else IMPLS)
    clock = Clock(device.type == "cuda")
    bandwidth = bandwidth_GBps(device, clock, 64 if args.smoke else 2048)
    print(f"device-to-device bandwidth: {bandwidth:.0f} GB/s", flush=True)
    with contextlib.ExitStack() as stack:
        clocks = None
        if device.type == "cuda":
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-layer-clocks-"))
            clocks = stack.enter_context(ClockSampler(Path(folder) / "clocks.txt"))
        rows, kernel_rows = _measure_shapes(shapes, impls, contexts, device, dtype, clock, bandwidth, args, started,
                                            clocks)
    times = pd.DataFrame(rows)
    times["bandwidth_GBps"] = bandwidth
    summary = _summary(times)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times.to_csv(out / "layer_times.csv", index=False)
    summary.to_csv(out / "layer_summary.csv", index=False)
    if kernel_rows:
        kernels = pd.DataFrame(kernel_rows)
        kernels.to_csv(out / "layer_kernels.csv", index=False)
        print(kernels[["shape", "impl", "front_kernels", "attention_kernels"]].to_string(index=False))
    print(f"wrote {out / 'layer_times.csv'} and {out / 'layer_summary.csv'} in {time.perf_counter() - started:.0f} s")
    print(_clock_line(times))
    _print_table(summary, device_clock=device.type == "cuda")
    return summary


CLOCK_COLUMNS = ("sm_mhz_min", "sm_mhz_median", "mem_mhz_min", "clock_event_reasons")


def _measure_shapes(shapes, impls, contexts, device, dtype, clock: Clock, bandwidth: float, args, started: float,
                    clocks: ClockSampler | None) -> tuple[list[dict], list[dict]]:
    """Every shape's implementations, warmed up, then ``args.repeats`` interleaved repeats: (long rows of
    layer_times.csv, each with the NVML clocks seen during its repeat, and the kernel rows)."""
    rows, kernel_rows = [], []
    for shape in shapes:
        # the KV window: the longest context (the masked-window baseline attends over all of it)
        max_len = max(contexts + [64])
        benches = {impl: Bench(shape, impl, device, dtype, max_len, clock, args.steps) for impl in impls}
        for bench in benches.values():                                  # warm-up, untimed
            for context in contexts:
                bench.measure(context, args.replays)
        for repeat in range(args.repeats):
            for impl, bench in benches.items():
                for context in contexts:
                    begin = time.monotonic_ns()
                    measured = bench.measure(context, args.replays)
                    seen = clocks.window(begin, time.monotonic_ns()) if clocks is not None else {}
                    seen = {c: seen.get(c, math.nan) for c in CLOCK_COLUMNS}
                    measured["bound_tok_s"] = bandwidth * 1e9 / active_bytes(shape, context)
                    rows += [{"shape": shape.name, "impl": impl, "context": context, "repeat": repeat,
                              "metric": k, "value": v, **seen} for k, v in measured.items()]
        print(f"{shape.name}: measured ({time.perf_counter() - started:.0f} s so far)", flush=True)
        if device.type == "cuda":
            kernel_rows += [{"shape": shape.name, "impl": impl, **bench.kernels()} for impl, bench in benches.items()]
        del benches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, kernel_rows


def _clock_line(times: pd.DataFrame) -> str:
    """One line: the SM clock's range over the timed repeats (NVML, read only), or why there is none."""
    sm = pd.to_numeric(times["sm_mhz_min"], errors="coerce")
    if sm.isna().all():
        return "GPU clocks: not recorded (no NVML here: the CPU, or pynvml missing)"
    medians = pd.to_numeric(times["sm_mhz_median"], errors="coerce")
    reasons = sorted(set(times["clock_event_reasons"].dropna().astype(str)) - {"0x0"})
    return (f"GPU clocks while timed (NVML, read only): SM min {sm.min():.0f} MHz, median {medians.median():.0f} MHz; "
            f"memory min {pd.to_numeric(times['mem_mhz_min'], errors='coerce').min():.0f} MHz; clock-event reasons "
            f"{', '.join(reasons) if reasons else 'none'}")


def _summary(times: pd.DataFrame) -> pd.DataFrame:
    """Median and spread (max - min, % of the median) over repeats."""
    grouped = times.groupby(["shape", "impl", "context", "metric"], sort=False)["value"]
    summary = grouped.agg(median="median", low="min", high="max").reset_index()
    summary["spread_pct"] = 100 * (summary["high"] - summary["low"]) / summary["median"].abs()
    return summary


def _print_table(summary: pd.DataFrame, device_clock: bool = True) -> None:
    """The medians, one row per shape, context and implementation. ``host`` is ``n/a`` where it measures
    nothing: without a device clock (the CPU smoke run, whose "device" times are walls too) and where the
    engine's wall per layer came out below the device time (a negative difference); layer_times.csv and
    layer_summary.csv keep the difference as computed."""
    wide = summary.pivot_table(index=["shape", "context", "impl"], columns="metric", values="median", sort=False)
    spread = summary.pivot_table(index=["shape", "context", "impl"], columns="metric", values="spread_pct",
                                 sort=False)
    short = {"front_us": "front", "attention_router_us": "attn+rt", "attention_us": "attn", "router_us": "router",
             "out_router_us": "o_proj+rt",
             "expert_us": "expert", "combine_us": "combine", "layer_device_us": "layer_dev",
             "engine_layer_us": "eng_layer", "host_us": "host", "engine_tok_s": "eng_tok/s",
             "resident_tok_s": "res_tok/s", "bound_tok_s": "bound_tok/s"}
    shapes = list(dict.fromkeys(summary["shape"]))
    impls = list(dict.fromkeys(summary["impl"]))
    wide = wide.reindex(sorted(wide.index, key=lambda k: (shapes.index(k[0]), k[1], impls.index(k[2]))))
    no_host = ~wide["host_us"].ge(0) if device_clock else pd.Series(True, index=wide.index)
    if not device_clock:
        print("host: n/a without a device clock (on the CPU the device times are walls too, so engine wall - "
              "device time is no host cost)")
    elif no_host.any():
        print(f"host: n/a in {int(no_host.sum())} row(s) where the engine's wall per layer was below the device time")
    print("per decoder layer, us (median of repeats; worst spread over the row in the last column)")
    # runs before session 9 timed the router alone (``router_us``) where ``out_router_us`` now stands
    metrics = [("router_us" if m == "out_router_us" and m not in wide.columns else m) for m in METRICS]
    header = f"{'shape':<14}{'ctx':>6} {'impl':<14}" + "".join(f"{short[m]:>12}" for m in metrics) + f"{'spread%':>9}"
    print(header)
    for key, row in wide.iterrows():
        shape, context, impl = key
        worst = spread.loc[key].max()
        cells = "".join(f"{'n/a':>12}" if m == "host_us" and no_host[key] else f"{row[m]:>12.1f}" for m in metrics)
        print(f"{shape:<14}{context:>6} {impl:<14}" + cells + f"{worst:>9.0f}")


if __name__ == "__main__":
    main()
