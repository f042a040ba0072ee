"""Turn what the engine saw into a trace in the project's format (``traces/``)."""
from __future__ import annotations

import numpy as np

from real.engine import EngineResult
from traces import SCHEMA_VERSION, ModelShape, Trace, TraceMeta


def routing_trace(result: EngineResult, shape: ModelShape, source: str, recorded_on: str,
                  description: str, licence: str = "Apache-2.0", extra: dict | None = None) -> Trace:
    """A trace of every step the engine ran (prompt steps included: they route experts too), with
    measured per-step wall time, for the first steps the hidden state entering each MoE layer, and, when
    the engine recorded them, per-layer timings (``layer_start_ms``, ``layer_ms``, ``stall_ms`` [T, L]) and
    the start and end of the copy that brought each chosen expert (``copy_start_ms``, ``copy_end_ms``
    [T, L, K]); points in time are ms from the engine's creation, -1 where the expert was resident
    (the format allows no NaN)."""
    r = result.routing
    experts = np.asarray(r.experts, dtype=np.uint8 if shape.num_experts <= 256 else np.uint16)
    weights = np.asarray(r.weights, dtype=np.float32)
    hidden = hidden_index = None
    if r.hidden:
        hidden = np.stack(r.hidden).astype(np.float16)
        hidden_index = np.arange(len(r.hidden), dtype=np.int64)
    timings = {"step_ms": np.asarray(r.step_ms, dtype=np.float32)}
    # engines built with record_layer_timings: per layer GPU time, stall, and each copy's start/end
    timings.update({name: np.stack(values) for name, values in r.layer_timings.items() if values})
    meta = TraceMeta(SCHEMA_VERSION, shape, source, licence, recorded_on, description, dict(extra or {}))
    return Trace(meta, experts, weights, np.asarray(r.request_starts, dtype=np.int64),
                 hidden_states=hidden, hidden_token_index=hidden_index, timings=timings)
