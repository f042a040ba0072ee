"""The hardware-profile micro-benchmarks the calibration builds on (``real.calibration``,
``validation.profile_fit``), and the profile's name and file.

- Copies: pinned host-to-device copies one at a time (as the engine issues them), timed with CUDA
  events around each copy, median of many; effective bandwidth = bytes / time, the same quantity
  as the profile's ``h2d_GBps_by_MiB`` table; the latency is a 4-byte copy's time.
- Compute, for one model: attention at several context lengths, the router, one expert, with CUDA
  events, medians (the engine's per-layer host overhead comes from the calibration's patterns).
"""
from __future__ import annotations

import re
import statistics
import time
from contextlib import nullcontext

import torch

COPY_SIZES_MIB = (0.25, 1, 4, 16, 64, 256)


def _median_event_ms(fn, repeats: int, stream=None) -> float:
    """The median time of ``fn`` in ms: CUDA events around it on a GPU (``stream``: where they are
    recorded), the host clock on a CPU, where everything ``fn`` launches runs synchronously."""
    times = []
    if not torch.cuda.is_available():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_copies(device: torch.device, sizes_MiB=COPY_SIZES_MIB, repeats: int = 30):
    """(copy_latency_us, {MiB: effective GBps}) for pinned host-to-device copies (on a CPU device: plain
    host memory copies, as the CPU engine makes them)."""
    largest = int(max(sizes_MiB) * 2**20)
    cuda = device.type == "cuda"
    src = torch.randint(0, 255, (largest,), dtype=torch.uint8)
    src = src.pin_memory() if cuda else src
    dst = torch.empty(largest, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device) if cuda else None
    table = {}
    with torch.cuda.stream(stream) if cuda else nullcontext():
        for mib in sizes_MiB:
            n = int(mib * 2**20)
            _median_event_ms(lambda: dst[:n].copy_(src[:n], non_blocking=True), 3, stream)
            ms = _median_event_ms(lambda: dst[:n].copy_(src[:n], non_blocking=True), repeats, stream)
            table[mib] = round(n / (ms / 1e3) / 1e9, 2)
        latency_ms = _median_event_ms(lambda: dst[:4].copy_(src[:4], non_blocking=True), repeats, stream)
    return consistent_copy_table(latency_ms * 1e3, table)


def consistent_copy_table(latency_us: float, table: dict) -> tuple[float, dict]:
    """(latency, table) the simulator's copy model accepts (``hardware.profile.TabulatedCopyCost``): the
    smallest, latency-dominated points go while the table would make a larger copy faster than a smaller
    one (measured noise at 0.25-1 MiB can), as that model's own error advises; below the smallest point
    left the model is latency + linear. Events around a 4-byte copy carry their own overhead, which can
    exceed the smallest point's whole time; the model needs latency <= every point's time, so the
    smallest point caps it."""
    from hardware.profile import TabulatedCopyCost
    sizes = sorted(table)
    while True:
        smallest = sizes[0]
        capped = round(min(latency_us, smallest * 2**20 / (table[smallest] * 1e9) * 1e6) * 0.999, 2)
        kept = {mib: table[mib] for mib in sizes}
        try:
            TabulatedCopyCost(capped, tuple((int(mib * 2**20), bw) for mib, bw in kept.items()))
            return capped, kept
        except ValueError:
            if len(sizes) == 1:
                raise
            sizes = sizes[1:]


@torch.no_grad()
def measure_compute(model, contexts=(0, 128, 512, 1024), repeats: int = 50, engine=None) -> dict:
    """Per-layer GPU times of ``model`` (a ``real.model.MoEModel`` with its experts on the GPU, or
    ``engine``, an ``OffloadEngine`` over it, whose slots and expert graphs are timed instead). With the
    model's CUDA graphs captured, attention and router are timed together as the graph they are (with
    the previous layer's combine, which that graph runs first).
    Times are from CUDA events around the launching code, so launch-bound kernels count their host
    cost, as they do in decoding. With expert graphs captured, one expert is timed as its graph.
    On a CPU the host clock times the same calls."""
    layer = model.config.num_layers // 2
    h = torch.randn(1, model.config.hidden_size, device=model.device, dtype=model.dtype)
    attention = {}
    contexts = [c for c in contexts if c < model.max_len]
    if model.graphed:    # the previous combine, attention and router are one graph: its time goes to attention
        for ctx in contexts:
            model.set_position(ctx)
            attention[ctx] = round(1e3 * _median_event_ms(lambda: model.front(layer), repeats), 2)
        router_ms = 0.0
    else:
        for ctx in contexts:
            attention[ctx] = round(1e3 * _median_event_ms(lambda: model.attention(layer, h, ctx), repeats), 2)
        router_ms = _median_event_ms(lambda: model.route(layer, h), repeats)
    graphs = model.resident_expert_graphs if engine is None else engine.expert_graphs
    if graphs is not None:      # the expert as the graph the engine launches
        model.set_position(contexts[0])
        model.front(layer)
        index = 0 if engine is not None else layer * model.config.num_experts
        expert_ms = _median_event_ms(lambda: graphs.expert(index, 0), repeats)
    else:
        x, _, _ = model.route(layer, h)
        blob = model.expert_blobs[layer, 0] if engine is None else engine.slots[0]
        expert_ms = _median_event_ms(lambda: model.expert(x, blob), repeats)
    token_ms = _median_event_ms(lambda: model.final(model.embed(1)), repeats)
    return {"attention_us_by_ctx": attention, "router_us": round(router_ms * 1e3, 2),
            "expert_us": round(expert_ms * 1e3, 2), "token_overhead_us": round(token_ms * 1e3, 2)}


def profile_name(device_name: str) -> str:
    """The name of a profile measured on the GPU ``device_name`` (``torch.cuda.get_device_name()``): its
    model, lower case, then ``-measured``: "NVIDIA H200" -> "h200-measured", "NVIDIA H100 80GB HBM3" ->
    "h100-measured", "NVIDIA A100-SXM4-80GB" -> "a100-sxm4-80gb-measured". Raises ValueError for an
    empty name."""
    words = device_name.replace("NVIDIA", " ").split()
    if not words:
        raise ValueError(f"device name {device_name!r} names no GPU model; pass the profile's name yourself")
    model = re.sub(r"[^a-z0-9]+", "-", words[0].lower()).strip("-")
    return f"{model}-measured"


def write_profile(path, profile: dict):
    """Validate ``profile`` (``hardware.profile.hardware_from_dict``: raises ``HardwareProfileError``
    naming the field) and write it to ``path`` as YAML, atomically; returns the ``HardwareProfile``."""
    import yaml
    from hardware.profile import hardware_from_dict
    from traces.io import atomic_write
    hardware = hardware_from_dict(profile, origin=str(path))
    atomic_write(path, lambda f: yaml.safe_dump(profile, f, sort_keys=False))
    return hardware
