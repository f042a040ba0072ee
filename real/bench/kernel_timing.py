"""Timing helpers of the engine's kernel benchmarks (``experiments.bench_layer``,
``experiments.bench_variants``): device time per call from CUDA events, a function captured as a CUDA
graph, and the model shapes they measure."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from traces import ModelShape, load_shape, load_trace

TRAINED_TRACE = Path(__file__).resolve().parents[2] / "traces" / "moe-lm-h100.npz"


def bench_shape(name: str, layers: int) -> ModelShape:
    """``moe-lm``: the trained model's shape, from its committed trace; a shape name of traces/shapes
    keeps its first ``layers`` layers (the rest would only repeat them)."""
    if name == "moe-lm":
        return load_trace(TRAINED_TRACE).model
    return dataclasses.replace(load_shape(name), num_layers=layers)


class Clock:
    """Device time per call of ``fn`` (CUDA events around ``n`` back-to-back calls) or, on the CPU,
    host time."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def us(self, fn, n: int) -> float:
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - start) / n * 1e6
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n * 1e3


def graphed(fn, cuda: bool):
    """``fn`` as a replayable CUDA graph (warmed up first), or ``fn`` itself on the CPU."""
    if not cuda:
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
