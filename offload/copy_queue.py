"""The host-to-device copy queue that both clocks drain.

CUDA streams are FIFO, so "a demand fetch goes ahead of every queued prefetch" only holds if the
queue lives on the host and the copy engine is fed one job at a time. This is that queue: a heap
ordered by (demand first, when the expert is needed, arrival), with O(1) lazy cancellation — a
cancelled or re-prioritised job leaves a stale heap entry that is skipped when it surfaces, instead
of an O(n) removal from a list.
"""
from __future__ import annotations

import itertools
from heapq import heappop, heappush

QUEUED, RUNNING, DONE, CANCELLED, DROPPED = "queued", "running", "done", "cancelled", "dropped"

# Heap classes: a demand job always sorts ahead of every prefetch job.
DEMAND, PREFETCH = 0, 1


class CopyJob:
    """One expert copy, from request to completion. ``waiter`` belongs to the clock (a SimPy event,
    a CUDA event); the bookkeeping never looks inside it."""

    __slots__ = ("key", "demand", "need_step", "seq", "slot", "state", "queued_ns", "started_ns",
                 "finished_ns", "demand_since_ns", "waiter", "used", "demand_order",
                 "start_order", "entry")

    def __init__(self, key: int, demand: bool, need_step: int, seq: int, now_ns: int):
        self.key = key
        self.demand = demand
        self.need_step = need_step      # decode step (token * layers + layer) that needs it
        self.seq = seq
        self.slot = -1
        self.state = QUEUED
        self.queued_ns = now_ns
        self.demand_since_ns = now_ns if demand else -1
        self.started_ns = -1
        self.finished_ns = -1
        self.waiter = None
        self.used = demand              # a prefetch becomes "used" when a layer asks for it
        # Positions in the controller's sequence of decisions, so that checks can order events
        # that share a timestamp: when this job became a demand fetch, and when it started.
        self.demand_order = -1
        self.start_order = -1
        self.entry: tuple | None = None   # its live heap entry while queued; older entries of this job are stale

    def sort_key(self) -> tuple[int, int, int]:
        return (DEMAND if self.demand else PREFETCH, self.need_step, self.seq)

    def __repr__(self) -> str:
        kind = "demand" if self.demand else "prefetch"
        return f"CopyJob(key={self.key}, {kind}, step={self.need_step}, {self.state})"


class CopyQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, CopyJob]] = []
        self._seq = itertools.count()
        self.queued: dict[int, CopyJob] = {}   # key -> its QUEUED job

    def __len__(self) -> int:
        return len(self.queued)

    def push(self, key: int, demand: bool, need_step: int, now_ns: int) -> CopyJob:
        seq = next(self._seq)
        job = CopyJob(key, demand, need_step, seq, now_ns)
        self.queued[key] = job
        job.entry = entry = (DEMAND if demand else PREFETCH, need_step, seq, job)   # job.sort_key(), job
        heappush(self._heap, entry)
        return job

    def reprioritise(self, job: CopyJob, demand: bool, need_step: int, now_ns: int) -> None:
        """Move a queued job (to demand, or to a new need step); its old heap entry goes stale."""
        entry = job.entry                 # (class, need step, seq, job): job.sort_key() before the move
        if demand and not job.demand:
            job.demand = True
            job.demand_since_ns = now_ns
            job.used = True
        job.need_step = need_step
        cls = DEMAND if job.demand else PREFETCH
        if cls != entry[0] or need_step != entry[1]:
            job.entry = entry = (cls, need_step, entry[2], job)     # job.sort_key(), job
            heappush(self._heap, entry)

    def cancel(self, job: CopyJob, state: str = CANCELLED) -> None:
        job.state = state
        job.entry = None            # its heap entry goes stale (and the job, no longer in a cycle with it, is
        del self.queued[job.key]    # freed once unused instead of waiting for the garbage collector)

    def peek(self) -> CopyJob | None:
        """The job that should start next, or None. Stale entries are discarded on the way."""
        heap = self._heap
        if not self.queued:      # every entry left is stale
            heap.clear()
            return None
        while heap:
            entry = heap[0]
            job = entry[3]
            if job.entry is entry and job.state == QUEUED:
                return job
            heappop(heap)
        return None

    def pop(self, job: CopyJob) -> None:
        """Remove ``job`` (the one ``peek`` returned) to start it."""
        heappop(self._heap)
        job.entry = None
        del self.queued[job.key]

    def queued_prefetches(self) -> list[CopyJob]:
        return [j for j in self.queued.values() if not j.demand]
