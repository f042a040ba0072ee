"""Points in time for the engine's recordings: CUDA events on a stream (resolved after the run, so
recording never synchronises), or the host clock on a CPU, where copies and compute are synchronous."""
from __future__ import annotations

import time

import torch


class Marks:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self, stream: "torch.cuda.Stream | None" = None):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def ms(self, start, end) -> float:
        """Milliseconds from ``start`` to ``end`` (both from ``mark``; CUDA events must have completed)."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3
