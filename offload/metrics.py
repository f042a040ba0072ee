"""One metrics vocabulary for every figure the project reports: the simulator, the untimed replay,
the engine, the validation and the tests name and compute them here, and nowhere else.

Every clock gives the time of each timed token in integer nanoseconds. Decode speed is tokens over
the time they took: ``tokens_per_s = tokens * 1e9 / sum(token_ns) = 1e3 / tpot_ms_mean``. In the
simulator consecutive tokens tile its timeline, so this equals tokens over simulated time; in the
engine each token's time is its wall time from its step's start to its logits on the host.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from offload.controller import OffloadStats

# Column names, in the order tables print them.
TIMING = ("tokens", "decode_s", "tokens_per_s", "tpot_ms_mean", "tpot_ms_p50", "tpot_ms_p99")
COUNTS = ("hit_rate", "hits", "misses", "late_prefetches", "accesses", "copies", "demand_copies",
          "prefetch_copies", "prefetch_useful", "prefetch_wasted", "prefetch_cancelled",
          "prefetch_dropped", "bytes_moved", "replaced")
LINK = ("link_utilisation", "stall_ms_per_token")


def tpot_summary(token_ns: Sequence[int] | np.ndarray) -> dict[str, float | int]:
    """``TIMING`` from the time of each timed token (integer ns). No tokens: zeros."""
    if not len(token_ns):
        return {"tokens": 0, "decode_s": 0.0, "tokens_per_s": 0.0, "tpot_ms_mean": 0.0, "tpot_ms_p50": 0.0,
                "tpot_ms_p99": 0.0}
    total_ns = int(np.sum(np.asarray(token_ns, dtype=np.int64)))
    tpot = np.asarray(token_ns, dtype=np.float64) / 1e6
    return {
        "tokens": len(tpot),
        "decode_s": total_ns / 1e9,
        "tokens_per_s": len(tpot) * 1e9 / total_ns if total_ns > 0 else float("inf"),
        "tpot_ms_mean": float(tpot.mean()),
        "tpot_ms_p50": float(np.percentile(tpot, 50)),
        "tpot_ms_p99": float(np.percentile(tpot, 99)),
    }


def count_metrics(stats: OffloadStats) -> dict[str, float | int]:
    """``COUNTS`` from the controller's counters (the same bookkeeping in every clock)."""
    return {
        "hit_rate": stats.hits / stats.accesses if stats.accesses else 0.0,
        "hits": stats.hits,
        "misses": stats.misses,
        "late_prefetches": stats.late,
        "accesses": stats.accesses,
        "copies": stats.copies,
        "demand_copies": stats.demand_copies,
        "prefetch_copies": stats.prefetch_copies,
        "prefetch_useful": stats.prefetch_useful,
        "prefetch_wasted": stats.prefetch_wasted,
        "prefetch_cancelled": stats.cancelled,
        "prefetch_dropped": stats.dropped,
        "bytes_moved": stats.bytes_moved,
        "replaced": stats.replaced,
    }


def run_metrics(token_ns: Sequence[int] | np.ndarray, stats: OffloadStats, *,
                link_busy_ns: int | None = None, copy_engines: int = 1,
                stall_ns: int | None = None) -> dict[str, float | int]:
    """Every metric of one run: ``TIMING`` over ``token_ns`` (the timed tokens, ns each), ``COUNTS``
    from ``stats``, and ``LINK`` where the clock measured it: the copy engines' busy time
    (``link_busy_ns``; copies still in flight at the end are not counted) over the decode time, and
    the compute stream's time waiting for copies (``stall_ns``) per token."""
    metrics = {**tpot_summary(token_ns), **count_metrics(stats)}
    total_ns = int(np.sum(np.asarray(token_ns, dtype=np.int64)))
    if link_busy_ns is not None:
        metrics["link_utilisation"] = link_busy_ns / (total_ns * copy_engines) if total_ns else 0.0
    if stall_ns is not None:
        metrics["stall_ms_per_token"] = stall_ns / 1e6 / metrics["tokens"] if metrics["tokens"] else 0.0
    return metrics
