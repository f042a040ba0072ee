"""Kernel and host-path choices of the engine's compute, measured side by side (issue 13): the evidence
the defaults in ``real/`` are chosen from.

- ``expert``: one expert at batch 1 (gate|up GEMM, SwiGLU, down GEMM) per implementation: ``eager``
  (cuBLAS GEMMs and PyTorch's activation kernels), ``compiled`` (the activation by Inductor, the GEMMs
  cuBLAS: what ``MoEModel.expert`` runs on CUDA), ``autotuned`` (the whole expert by Inductor's
  ``max-autotune-no-cudagraphs``, which benchmarks Triton GEMM templates against cuBLAS), with the
  weight bytes it streams per microsecond beside it;
- ``attention``: SDPA of one query over a context bucket under the additive position mask, per SDPA
  backend (cuDNN, memory-efficient, math; flash takes no mask), at bucket lengths 64 / 256 / 2048;
- ``timeline``: the all-resident engine's GPU timeline per layer (torch.profiler): busy, idle after a
  routing read-back until the next kernel (the host's turnaround), other idle;
- ``dispatch``: a layer's top-k experts over an engine-like slot tensor [slots, blob], the host out of
  the loop or not: ``k-graphs`` (one graph per expert, replayed one after another: the engine's way, the
  host picking each slot after the routing read-back), ``grouped`` (one graph that reads the slots from a
  device index tensor and runs ``torch.nn.functional.grouped_mm`` over strided views of the slot tensor:
  what a device-side dispatch of the hits would run, no host between routing and experts; a capture that
  fails is recorded, and the variant timed eagerly), ``gathered`` (the weights gathered with
  ``index_select``, then batched matmuls: the copy a naive device-side dispatch pays);
- ``host``: where the all-resident engine's host time per layer goes, from host clock stamps around
  the calls of one layer turn: waiting for the routing (the read-back's copy and synchronisation),
  the host's work from the routing to the first expert launch (the controller's ``begin_layer`` and
  the engine's bookkeeping), the launches themselves (expert graphs, the next front graph), and the
  rest (the policy's prefetch decision, ``end_layer``) before the next read-back.

Device times are CUDA events around back-to-back graph replays (``experiments.bench_layer.Clock``),
median of ``--repeats`` interleaved repeats with the spread; GPU only (``--smoke`` runs the host part
and the dispatch part on the CPU for the tests).

    python -m experiments.bench_variants --out runs/variants        # GPU: about 2 minutes

Writes ``variants.csv`` (part, shape, variant, metric, median, low, high, spread_pct) under ``--out``
and prints it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from offload.session import RunSettings
from policies.registry import resolve_policy
from real.bench.kernel_timing import Clock, bench_shape, graphed
from real.engine import OffloadEngine
from real.layer_ops import swiglu
from real.shape_model import random_model
from traces import ModelShape

SMOKE_SHAPE = ModelShape("tiny", 3, 6, 2, 32, 48, 4, 2, 8, 64)
BUCKETS = (64, 256, 2048)


def _expert_fn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return torch.mm(swiglu(F.linear(x, gate_up)), down.t())


def expert_variants(shape: ModelShape, clock: Clock, replays: int, repeats: int) -> list[dict]:
    """One expert of ``shape`` per implementation: device us and GB/s of its weights."""
    H, I = shape.hidden_size, shape.expert_intermediate_size
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((1, H), device="cuda", generator=g).bfloat16()
    blob = (torch.randn(3 * I * H, device="cuda", generator=g) * 0.02).bfloat16()
    gate_up, down = blob[:2 * I * H].view(2 * I, H), blob[2 * I * H:].view(H, I)
    compiled_act = torch.compile(swiglu, dynamic=False)
    variants = {
        "eager": lambda: _expert_fn(x, gate_up, down),
        "compiled": lambda: torch.mm(compiled_act(F.linear(x, gate_up)), down.t()),
        "autotuned": (lambda f: lambda: f(x, gate_up, down))(
            torch.compile(_expert_fn, dynamic=False, mode="max-autotune-no-cudagraphs")),
    }
    want = variants["eager"]().float()
    graphs = {}
    for name, fn in variants.items():
        err = float((fn().float() - want).abs().max() / want.abs().max())
        graphs[name] = (graphed(fn, True), err)
    rows = []
    for _ in range(repeats):
        for name, (graph, err) in graphs.items():
            us = clock.us(graph, replays)
            rows += [{"part": "expert", "shape": shape.name, "variant": name, "metric": "us", "value": us},
                     {"part": "expert", "shape": shape.name, "variant": name, "metric": "GBps",
                      "value": blob.numel() * 2 / (us * 1e-6) / 1e9},
                     {"part": "expert", "shape": shape.name, "variant": name, "metric": "rel_err", "value": err}]
    return rows


def dispatch_variants(shape: ModelShape, clock: Clock, replays: int, repeats: int, device: torch.device,
                      slots: int = 16) -> list[dict]:
    """A layer's top-k experts of ``shape`` over a slot tensor [slots, blob] (bf16) at batch 1, per dispatch
    (module docstring): device us (host us on a CPU) and the relative error against ``k-graphs``."""
    H, I, K = shape.hidden_size, shape.expert_intermediate_size, shape.top_k
    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    blobs = (torch.randn((slots, 3 * I * H), device=device, generator=g) * 0.02).bfloat16()
    gate_up = blobs[:, :2 * I * H].view(slots, 2 * I, H)       # strided views: no weight is copied
    down = blobs[:, 2 * I * H:].view(slots, H, I)
    x = torch.randn((1, H), device=device, generator=g).bfloat16()
    chosen = [(3 * k + 1) % slots for k in range(K)]            # the routed experts' slots, top-k order
    selected = torch.tensor(chosen, device=device)              # on the device, as a router would leave them
    out = torch.empty((K, H), dtype=torch.bfloat16, device=device)
    ones = torch.ones(K, dtype=torch.int32, device=device)

    def k_graphs():
        for i, slot in enumerate(chosen):
            torch.mm(swiglu(F.linear(x, gate_up[slot])), down[slot].t(), out=out[i:i + 1])

    def grouped():
        counts = torch.zeros(slots, dtype=torch.int32, device=device).index_add_(0, selected, ones)
        offs = counts.cumsum(0, dtype=torch.int32)
        order = torch.argsort(selected)
        rows = x.expand(K, H).contiguous()
        hidden = swiglu(F.grouped_mm(rows, gate_up.transpose(1, 2), offs=offs)).contiguous()
        out.index_copy_(0, order, F.grouped_mm(hidden, down.transpose(1, 2), offs=offs))

    def gathered():
        w1 = gate_up.index_select(0, selected)                  # [K, 2I, H]: a copy of K experts' weights
        w2 = down.index_select(0, selected)
        hidden = swiglu(torch.bmm(w1, x.expand(K, H).unsqueeze(-1)).squeeze(-1))
        out.copy_(torch.bmm(w2, hidden.unsqueeze(-1)).squeeze(-1))

    variants = {"k-graphs": k_graphs, "grouped": grouped, "gathered": gathered}
    k_graphs()
    want = out.float().clone()
    runs, rows = {}, []
    for name, fn in variants.items():
        try:
            fn()
            err = float((out.float() - want).abs().max() / want.abs().max())
        except (RuntimeError, NotImplementedError) as e:       # a kernel this build lacks
            rows.append({"part": "dispatch", "shape": shape.name, "variant": name, "metric": "unsupported",
                         "value": 1.0})
            print(f"dispatch {name}: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
            continue
        try:
            runs[name] = (graphed(fn, cuda), err)
        except RuntimeError as e:                                # not capturable: timed as launched
            torch.cuda.synchronize()
            rows.append({"part": "dispatch", "shape": shape.name, "variant": name, "metric": "capture_failed",
                         "value": 1.0})
            print(f"dispatch {name}: capture failed ({str(e).splitlines()[0]}); timed eagerly", flush=True)
            runs[name] = (fn, err)
    for _ in range(repeats):
        for name, (run, err) in runs.items():
            rows += [{"part": "dispatch", "shape": shape.name, "variant": name, "metric": "us",
                      "value": clock.us(run, replays)},
                     {"part": "dispatch", "shape": shape.name, "variant": name, "metric": "rel_err", "value": err}]
    return rows


def attention_variants(shape: ModelShape, clock: Clock, replays: int, repeats: int) -> list[dict]:
    """SDPA of one token's queries over each bucket under an additive mask, per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    KV, G, D = shape.num_kv_heads, shape.num_attention_heads // shape.num_kv_heads, shape.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    graphs = {}
    for length in BUCKETS:
        q = torch.randn((1, KV, G, D), device="cuda", generator=g).bfloat16()
        k, v = (torch.randn((1, KV, length, D), device="cuda", generator=g).bfloat16() for _ in range(2))
        mask = torch.zeros(length, device="cuda", dtype=torch.bfloat16)
        mask[length // 2:] = float("-inf")
        for name, backend in backends.items():
            def fn(q=q, k=k, v=v, mask=mask, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(1, 1, 1, -1))
            try:
                graphs[(length, name)] = graphed(fn, True)
            except RuntimeError as err:            # a backend that refuses these inputs
                print(f"attention {shape.name} {length} {name}: {str(err).splitlines()[0]}", flush=True)
    rows = []
    for _ in range(repeats):
        for (length, name), graph in graphs.items():
            rows.append({"part": "attention", "shape": shape.name, "variant": f"{name}@{length}", "metric": "us",
                         "value": clock.us(graph, replays)})
    return rows


def host_path(shape: ModelShape, device: torch.device, dtype: torch.dtype, steps: int, repeats: int) -> list[dict]:
    """Host clock stamps around one layer turn of the all-resident engine (every expert in a slot, LRU),
    median per layer over ``steps`` decode steps, per repeat."""
    model = random_model(shape, device, dtype, max_len=256)
    engine = OffloadEngine(model, shape, resolve_policy("lru"), RunSettings(shape.num_experts))
    stamps: list[tuple[str, int]] = []
    now = time.perf_counter_ns

    def wrap(obj, name: str, before: str, after: str):
        inner = getattr(obj, name)

        def timed(*args):
            stamps.append((before, now()))
            try:
                return inner(*args)
            finally:
                stamps.append((after, now()))
        setattr(obj, name, timed)

    wrap(model, "read_routing", "read", "routed")
    wrap(model, "front", "front", "front_launched")
    wrap(model, "back", "back", "back_launched")
    expert_launch = "run_expert"
    if engine.expert_graphs is not None:
        wrap(engine.expert_graphs, "expert", "expert", "expert_launched")
        expert_launch = "expert"
    else:
        wrap(model, "run_expert", "expert", "expert_launched")
    rows = []
    for repeat in range(repeats + 1):               # the first is warm-up
        model.reset()
        stamps.clear()
        tok = 1
        for pos in range(steps):
            tok, _ = engine._timed_step(tok, pos)
        if repeat == 0:
            continue
        parts: dict[str, list[float]] = {"wait_routing_us": [], "routing_to_launch_us": [], "launches_us": [],
                                         "rest_us": [], "layer_wall_us": []}
        reads = [i for i, (k, _) in enumerate(stamps) if k == "read"]
        for a, b in zip(reads, reads[1:]):
            turn = stamps[a:b + 1]
            t = dict()
            for k, ts in turn:
                t.setdefault(k, ts)
            if "expert" not in t or "front_launched" not in t or "back" in t:
                continue               # a step's last layer: its turn runs the head and the next step's start
            launched = sum(ts2 - ts1 for (k1, ts1), (k2, ts2) in zip(turn, turn[1:])
                           if (k1, k2) in (("expert", "expert_launched"), ("front", "front_launched")))
            parts["wait_routing_us"].append((t["routed"] - t["read"]) / 1e3)
            parts["routing_to_launch_us"].append((t["expert"] - t["routed"]) / 1e3)
            parts["launches_us"].append(launched / 1e3)
            parts["layer_wall_us"].append((turn[-1][1] - t["read"]) / 1e3)
            parts["rest_us"].append(parts["layer_wall_us"][-1] - parts["wait_routing_us"][-1]
                                    - parts["routing_to_launch_us"][-1] - parts["launches_us"][-1])
        rows += [{"part": "host", "shape": shape.name, "variant": f"lru-all-resident/{expert_launch}", "metric": k,
                  "value": statistics.median(v)} for k, v in parts.items() if v]
    return rows


def gpu_timeline(shape: ModelShape, steps: int, repeats: int) -> list[dict]:
    """The all-resident engine's GPU timeline (torch.profiler, kernels and copies), per layer: time the
    GPU computes, time it idles after a routing read-back until its next kernel (the host's turnaround:
    waking from the synchronisation, its work up to the first expert launch, the launch's latency),
    and every other idle time (the GPU waiting for a launch the host has not made yet)."""
    from torch.profiler import ProfilerActivity, profile
    model = random_model(shape, "cuda", torch.bfloat16, max_len=256)
    engine = OffloadEngine(model, shape, resolve_policy("lru"), RunSettings(shape.num_experts))
    rows = []
    for repeat in range(repeats + 1):               # the first is warm-up
        model.reset()
        tok = 1
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for pos in range(steps):
                tok, _ = engine._timed_step(tok, pos)
            torch.cuda.synchronize()
        if repeat == 0:
            continue
        spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        busy = turnaround = other = 0.0
        end = spans[0][1]
        after_readback = "DtoH" in spans[0][2] or "Device -> Pinned" in spans[0][2]
        busy += spans[0][1] - spans[0][0]
        for start, stop, name in spans[1:]:
            gap = start - end
            if gap > 0:
                if after_readback:
                    turnaround += gap
                else:
                    other += gap
            busy += max(0.0, stop - max(start, end))
            if stop > end:
                end = stop
                after_readback = "DtoH" in name or "Device -> Pinned" in name
        layers = steps * shape.num_layers
        wall = spans[-1][1] - spans[0][0]
        rows += [{"part": "timeline", "shape": shape.name, "variant": "lru-all-resident", "metric": k,
                  "value": v / layers} for k, v in (("gpu_busy_us", busy), ("turnaround_idle_us", turnaround),
                                                    ("other_idle_us", other), ("wall_us", wall))]
        rows.append({"part": "timeline", "shape": shape.name, "variant": "lru-all-resident",
                     "metric": "kernels_per_layer", "value": len(spans) / layers})
    return rows


def summarise(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["part", "shape", "variant", "metric"], sort=False)["value"]
    summary = grouped.agg(median="median", low="min", high="max").reset_index()
    summary["spread_pct"] = 100 * (summary["high"] - summary["low"]) / summary["median"].abs()
    return summary


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="moe-lm,gpt-oss-20b,mixtral-8x7b")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--steps", type=int, default=64, help="decode steps per host-path repeat")
    p.add_argument("--smoke", action="store_true", help="the host and dispatch parts, a tiny shape on the CPU")
    p.add_argument("--parts", default="expert,attention,dispatch,host,timeline",
                   help="which parts to measure (GPU)")
    args = p.parse_args(argv)
    rows: list[dict] = []
    if args.smoke:
        torch.set_num_threads(1)        # a tiny shape: intra-op threads only contend for the cores
        rows = host_path(SMOKE_SHAPE, torch.device("cpu"), torch.float32, 4, 2)
        rows += dispatch_variants(SMOKE_SHAPE, Clock(False), 2, 2, torch.device("cpu"))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device; run with --smoke for the CPU check")
        clock, parts = Clock(True), set(args.parts.split(","))
        for name in args.shapes.split(","):
            shape = bench_shape(name, 2)
            if "expert" in parts:
                rows += expert_variants(shape, clock, args.replays, args.repeats)
            if "attention" in parts:
                rows += attention_variants(shape, clock, args.replays, args.repeats)
            if "dispatch" in parts:
                rows += dispatch_variants(shape, clock, args.replays, args.repeats, torch.device("cuda"))
            print(f"{name}: kernels measured", flush=True)
        if "host" in parts:
            rows += host_path(bench_shape("moe-lm", 2), torch.device("cuda"), torch.bfloat16, args.steps, args.repeats)
        if "timeline" in parts:
            rows += gpu_timeline(bench_shape("moe-lm", 2), min(args.steps, 32), args.repeats)
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "variants.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return summary


if __name__ == "__main__":
    main()
