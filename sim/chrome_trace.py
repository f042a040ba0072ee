"""A simulated timeline in the Chrome Trace Event format, which Perfetto (ui.perfetto.dev) and
chrome://tracing open: one process "GPU", one thread for the compute stream and one per copy engine.

Events are "X" (complete) events with ``ts`` and ``dur`` in microseconds; the simulator's integer
nanoseconds become floats, so nothing is rounded away.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from sim.simulator import Timeline
from traces.io import atomic_write

PID = 0
TOKENS_TID = 0
COMPUTE_TID = 1


def copy_tid(engine: int) -> int:
    return 2 + engine


def _meta(name: str, tid: int, value: str) -> dict:
    return {"name": name, "ph": "M", "pid": PID, "tid": tid, "args": {"name": value}}


def to_chrome_trace(timeline: Timeline, key_names: Callable[[int], str] | None = None,
                    num_experts: int | None = None) -> dict:
    """``key_names(key)`` names an expert (default ``expert <key>``); with ``num_experts`` each
    event's args split the key into layer and expert."""
    def name(key: int) -> str:
        return key_names(key) if key_names is not None else f"expert {key}"

    def where(key: int) -> dict:
        if num_experts is None:
            return {"key": key}
        return {"layer": key // num_experts, "expert": key % num_experts}

    engines = sorted({c.engine for c in timeline.copies})
    events = [_meta("process_name", TOKENS_TID, "GPU"),
              _meta("thread_name", TOKENS_TID, "tokens"),
              _meta("thread_name", COMPUTE_TID, "compute stream")]
    events += [_meta("thread_name", copy_tid(e), f"copy engine {e}") for e in engines]
    events += [{"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}}
               for tid in (TOKENS_TID, COMPUTE_TID, *map(copy_tid, engines))]
    token_start_ns = 0
    for token, end_ns in enumerate(timeline.token_end_ns):
        events.append({"name": f"token {token}", "cat": "token", "ph": "X", "pid": PID, "tid": TOKENS_TID,
                       "ts": token_start_ns / 1000.0, "dur": (end_ns - token_start_ns) / 1000.0,
                       "args": {"token": token}})
        token_start_ns = end_ns
    for e in timeline.compute:
        events.append({
            "name": name(e.key), "cat": "compute", "ph": "X", "pid": PID, "tid": COMPUTE_TID,
            "ts": e.start_ns / 1000.0, "dur": (e.end_ns - e.start_ns) / 1000.0,
            "args": {"token": e.token, "layer": e.layer, **where(e.key), "slot": e.slot},
        })
    for c in timeline.copies:
        events.append({
            "name": name(c.key), "cat": "demand copy" if c.demand else "prefetch copy", "ph": "X",
            "pid": PID, "tid": copy_tid(c.engine),
            "ts": c.start_ns / 1000.0, "dur": (c.end_ns - c.start_ns) / 1000.0,
            "args": {**where(c.key), "slot": c.slot, "demand": c.demand,
                     "queued_us": c.queued_ns / 1000.0, "start_order": c.start_order},
        })
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"source": "moe-offload-lab simulator", "time_unit": "us"}}


def write_chrome_trace(timeline: Timeline, path: str | Path, key_names: Callable[[int], str] | None = None,
                       num_experts: int | None = None) -> None:
    """Write atomically: a temp file beside ``path``, fsync, rename."""
    data = json.dumps(to_chrome_trace(timeline, key_names, num_experts))
    atomic_write(path, lambda f: f.write(data))
