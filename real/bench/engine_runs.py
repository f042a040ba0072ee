"""The run function every disciplined engine measurement uses (``real.measurement.Measurement``): a run is
a fresh engine (its step index, cache and policy state are per engine, as in every engine figure) that
decodes once, timed step by step."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, ContextManager

import numpy as np

from real.engine import EngineResult, OffloadEngine
from real.measurement import Config, RunOutput


class EngineRuns:
    """``engine_for(config)`` builds the run's engine; ``decode(engine, warmup)`` runs it (a shape replay of a
    trace, or a live generation; a warm-up pass may decode less) and returns its ``EngineResult``;
    ``around(config)``: a context both run inside (default: none); ``timed(result)``: the step times (ms)
    the run's figures come from (default: every step; a live run times its generated tokens only).

    Besides the engine's counts (hit rate, misses, bytes moved, the copies' bandwidth), a run reports how
    long the host waited in each layer's routing read-back (the one synchronisation per layer; timed by
    wrapping the model's ``read_routing``, two clock reads per layer) and the rest of the step's wall time
    per layer: the host's own work plus the waits the read-back does not see (a copy slot's wait in
    make_ready, the final logits' read)."""

    def __init__(self, model, shape, engine_for: Callable[[Config], OffloadEngine],
                 decode: Callable[[OffloadEngine, bool], EngineResult],
                 around: Callable[[Config], ContextManager] | None = None,
                 timed: Callable[[EngineResult], list[float]] | None = None):
        self.model, self.shape = model, shape
        self.engine_for, self.decode = engine_for, decode
        self.around = around or (lambda config: nullcontext())
        self.timed = timed or (lambda result: result.routing.step_ms)

    def __call__(self, config: Config, warmup: bool) -> RunOutput:
        waits: list[float] = []
        first_ns: list[int] = []        # when the first step reads its first layer's routing
        read = self.model.read_routing

        def timed_read(*args):
            if not waits:
                first_ns.append(time.monotonic_ns())
            start = time.perf_counter()
            try:
                return read(*args)
            finally:
                waits.append(time.perf_counter() - start)

        self.model.read_routing = timed_read        # this instance only; deleted below
        try:
            with self.around(config):
                engine = self.engine_for(config)
                waits.clear()
                first_ns.clear()
                result = self.decode(engine, warmup)
        finally:
            del self.model.read_routing
        step_ms = np.asarray(result.routing.step_ms, dtype=np.float64)
        timed_ms = np.asarray(self.timed(result), dtype=np.float64)
        L = self.shape.num_layers
        columns = {k: result.metrics[k] for k in ("hit_rate", "misses", "bytes_moved", "copy_GBps")}
        nan = float("nan")
        columns.update(routing_wait_ms_per_layer=nan, host_ms_per_layer=nan, host_ms_per_layer_p90=nan)
        if len(waits) == len(step_ms) * L and len(step_ms):    # else the engine no longer reads routing per layer
            wait_ms = 1e3 * np.asarray(waits).reshape(-1, L).sum(axis=1)
            host = (step_ms - wait_ms) / L
            columns.update(routing_wait_ms_per_layer=float(np.median(wait_ms)) / L,
                           host_ms_per_layer=float(np.median(host)),
                           host_ms_per_layer_p90=float(np.percentile(host, 90)))
        return RunOutput(timed_ms.tolist(), columns, first_ns[0] if first_ns else None)
