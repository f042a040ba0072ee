"""The engine's copy side: feeds the controller's queue to a dedicated CUDA copy stream.

CUDA streams run their work in order, so if every queued copy were handed to the stream at once a
demand fetch would wait behind earlier prefetches. The queue therefore stays in the controller and
at most ``max_in_flight`` copies are on the stream; a demand fetch is issued as soon as a place
frees up. Completion is observed by querying per-copy events (never a device-wide synchronise).

Two hazards are handled on the GPU, not the host:
- compute may read a slot only after its copy: the compute stream waits on the copy's end event;
- a copy may overwrite a slot only after the compute that last read it: the copy stream waits on
  the event recorded after that layer's experts (``release_slots``).

On a CPU there are no streams: a copy happens when it is issued and completes at once, through the
same controller calls, so CI exercises the same bookkeeping.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from offload.controller import OffloadController
from offload.copy_queue import QUEUED, RUNNING, CopyJob


@dataclass(frozen=True)
class CopyRecord:
    key: int
    slot: int
    demand: bool
    duration_ms: float     # from CUDA events on the copy stream; 0 on CPU


class CopyFeeder:
    def __init__(self, ctrl: OffloadController, arena: torch.Tensor, slots: torch.Tensor,
                 max_in_flight: int = 2, record_timings: bool = True):
        self.ctrl = ctrl
        self.arena = arena            # [layers * experts, blob]: pinned host memory on CUDA
        self.slots = slots            # [num_slots, blob] on the compute device
        self.cuda = slots.is_cuda
        self.max_in_flight = max_in_flight
        self.record_timings = record_timings and self.cuda
        self.stream = torch.cuda.Stream(slots.device) if self.cuda else None
        self._in_flight: deque[tuple[CopyJob, object, object]] = deque()
        self._slot_free: list[object] = [None] * slots.shape[0]
        self.records: list[CopyRecord] = []
        self._pending_timings: list[tuple[CopyJob, object, object]] = []
        # id(job) -> (job, start mark, end mark) of every copy issued, for the engine's layer timings
        self.job_marks: dict[int, tuple[CopyJob, object, object]] | None = None
        # host clock (perf_counter_ns) when the first demand copy since the engine reset it to 0 began to be
        # issued: the engine resets it at each routing read-back (``OffloadEngine.miss_issue_ns``)
        self.first_demand_ns = 0
        self.stamp_demands = False      # the engine's record_host_stamps

    @staticmethod
    def now_ns() -> int:
        return time.perf_counter_ns()

    # -- feeding -------------------------------------------------------------------------------
    def pump(self) -> None:
        """Retire finished copies, then issue queued ones while there is room on the stream."""
        self._retire()
        while len(self._in_flight) < self.max_in_flight:
            job = self.ctrl.next_copy(self.now_ns())
            if job is None:
                return
            self._issue(job)

    def _issue(self, job: CopyJob) -> None:
        if self.stamp_demands and job.demand and not self.first_demand_ns:
            self.first_demand_ns = time.perf_counter_ns()
        src, dst = self.arena[job.key], self.slots[job.slot]
        if not self.cuda:
            start = time.perf_counter()
            dst.copy_(src)
            if self.job_marks is not None:
                self.job_marks[id(job)] = (job, start, time.perf_counter())
            self.ctrl.copy_done(job, self.now_ns())
            self.records.append(CopyRecord(job.key, job.slot, job.demand, 0.0))
            return
        with torch.cuda.stream(self.stream):
            free = self._slot_free[job.slot]
            if free is not None:
                self.stream.wait_event(free)
            timed = self.record_timings or self.job_marks is not None
            start = torch.cuda.Event(enable_timing=timed)
            end = torch.cuda.Event(enable_timing=timed)
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        job.waiter = end
        self._in_flight.append((job, start, end))
        if self.job_marks is not None:
            self.job_marks[id(job)] = (job, start, end)

    def _retire(self) -> None:
        while self._in_flight and self._in_flight[0][2].query():
            self._complete(self._in_flight.popleft())

    def _complete(self, entry) -> None:
        job, start, end = entry
        self.ctrl.copy_done(job, self.now_ns())
        if self.record_timings:
            self._pending_timings.append(entry)
        else:
            self.records.append(CopyRecord(job.key, job.slot, job.demand, 0.0))

    # -- the compute side's requests -------------------------------------------------------------
    def make_ready(self, job: CopyJob) -> None:
        """Make the compute stream wait for ``job``'s copy, issuing it first if still queued."""
        while job.state == QUEUED:
            if len(self._in_flight) >= self.max_in_flight:
                self._in_flight[0][2].synchronize()     # wait for one copy, not the device
            self.pump()
            if job.state == QUEUED and not self._in_flight:
                raise RuntimeError(f"copy of expert key {job.key} cannot start: no slot can be freed "
                                   f"(cache too small for the experts in use)")
        if job.state == RUNNING and self.cuda:
            torch.cuda.current_stream(self.slots.device).wait_event(job.waiter)

    def release_slots(self, slots: list[int]) -> None:
        """The compute stream has been given every read of ``slots`` for this layer."""
        if not self.cuda or not slots:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.slots.device))
        for slot in slots:
            self._slot_free[slot] = event

    def drain(self) -> None:
        """Finish every issued copy (end of a run) and resolve their timings."""
        while self._in_flight:
            self._in_flight[0][2].synchronize()
            self._complete(self._in_flight.popleft())
        for job, start, end in self._pending_timings:
            self.records.append(CopyRecord(job.key, job.slot, job.demand, start.elapsed_time(end)))
        self._pending_timings.clear()
