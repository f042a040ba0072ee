"""The SimPy model of an offloaded MoE decode: a compute stream, copy engines, and the shared
controller between them.

Decode walks requests, tokens and layers as the engine does: attention and router, then the chosen
experts in the order the controller gives (resident ones first), each waiting for its copy. Copy
engines drain the controller's queue, demand fetches first. Simulated time is integer nanoseconds.

Speed: a SimPy event costs microseconds, so compute that cannot interact with a copy is not turned
into events. While no copy is queued or in flight, nothing else can happen, so the decode process
accumulates compute time in ``pending`` and yields one timeout when it must meet the copy side (a
copy queued, a copy to wait for). The order of decisions, and so every result, is unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import simpy

from offload.policy import Policy, PolicyContext
from offload.cache import CacheMode, ExpertCache
from offload.controller import OffloadController, OffloadStats
from offload.copy_queue import DONE
from offload.predictors import track_predictor
from hardware.profile import HardwareProfile
from traces import Trace


@dataclass(frozen=True)
class SimSettings:
    cache_slots: int
    cache_mode: CacheMode = CacheMode.PER_LAYER
    precision: str = "bf16"
    prefetch_depth: int = 1
    prompt_tokens: int = 0            # context already in the KV cache when a request's decode starts
    policy_params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComputeEvent:
    token: int
    layer: int
    key: int
    slot: int
    start_ns: int
    end_ns: int


@dataclass(frozen=True)
class CopyEvent:
    engine: int
    key: int
    slot: int
    demand: bool
    queued_ns: int
    demand_since_ns: int
    start_ns: int
    end_ns: int
    demand_order: int
    start_order: int


@dataclass
class Timeline:
    compute: list[ComputeEvent] = field(default_factory=list)
    copies: list[CopyEvent] = field(default_factory=list)
    token_end_ns: list[int] = field(default_factory=list)
    preloaded: dict[int, int] = field(default_factory=dict)   # slot -> key placed before decode


@dataclass
class SimResult:
    metrics: dict[str, float | int]   # deterministic: the same inputs give the same values
    stats: OffloadStats
    token_ns: list[int]
    wall_s: float                     # the simulator's own speed, kept out of ``metrics``
    layer_steps: int
    timeline: Timeline | None = None

    @property
    def layer_steps_per_wall_s(self) -> float:
        return self.layer_steps / self.wall_s if self.wall_s > 0 else float("inf")


class _Run:
    def __init__(self, trace: Trace, policy_cls: type[Policy], hardware: HardwareProfile,
                 settings: SimSettings, train_trace: Trace | None, record: bool):
        shape = trace.model
        self.trace = trace
        self.settings = settings
        self.env = simpy.Environment()
        self.cache = ExpertCache(shape.num_layers, shape.num_experts, settings.cache_slots,
                                 settings.cache_mode, shape.top_k)
        expert_bytes = shape.expert_bytes(settings.precision)
        self.cost = cost = hardware.compute_cost(shape, settings.precision)
        self.copy_ns = hardware.copy.copy_ns(expert_bytes)   # every expert has the same size
        params = dict(settings.policy_params)
        estimates = hardware.prefetch_estimates(shape, settings.precision)
        ctx = PolicyContext(
            shape, settings.cache_slots, CacheMode(settings.cache_mode), settings.prefetch_depth, trace,
            train_trace, params,
            predictor=track_predictor(policy_cls, trace, settings.prefetch_depth, params),
            expert_copy_ns=estimates[0], layer_compute_ns=estimates[1])
        self.policy = policy_cls(ctx)
        self.ctrl = OffloadController(self.policy, self.cache, expert_bytes)
        self.copy_engines = hardware.copy_engines
        self.timeline = Timeline() if record else None
        self._free_engines = list(range(hardware.copy_engines - 1, -1, -1))
        self.copy_busy_ns = 0
        self.stall_ns = 0
        self.token_ns: list[int] = []

    # -- copy side -----------------------------------------------------------------------------
    # Copy engines are callbacks on their copies' timeouts rather than SimPy processes: a copy is one
    # event, and the decode process waits on that same event (its callback runs after ours, so the
    # controller already knows the copy is done when decode resumes).
    def _start_copies(self) -> None:
        env, ctrl, free = self.env, self.ctrl, self._free_engines
        while free:
            job = ctrl.next_copy(env.now)
            if job is None:
                return
            done = env.timeout(self.copy_ns)
            done.job, done.engine = job, free.pop()
            done.callbacks.append(self._copy_done)
            if job.waiter is None:
                job.waiter = done
            else:   # decode already waits on a plain event for this (then queued) job
                done.callbacks.append(self._wake_waiter)

    @staticmethod
    def _wake_waiter(done) -> None:
        done.job.waiter.succeed()

    def _copy_done(self, done) -> None:
        job, engine = done.job, done.engine
        self.ctrl.copy_done(job, self.env.now)
        self.copy_busy_ns += self.copy_ns
        self._free_engines.append(engine)
        if self.timeline is not None:
            self.timeline.copies.append(CopyEvent(
                engine, job.key, job.slot, job.demand, job.queued_ns, job.demand_since_ns,
                job.started_ns, job.finished_ns, job.demand_order, job.start_order))
        self._start_copies()

    # -- compute side --------------------------------------------------------------------------
    def _decode(self):
        env, ctrl, cost, cache = self.env, self.ctrl, self.cost, self.cache
        trace, timeline = self.trace, self.timeline
        queue = ctrl.queue
        free_engines, n_engines = self._free_engines, self.copy_engines
        L = trace.num_layers
        expert_ns = cost.expert_ns
        before_experts_ns = cost.layer_overhead_ns + cost.router_ns
        starts = trace.request_starts.tolist()
        prompt = self.settings.prompt_tokens
        max_len = max(b - a for a, b in zip(starts[:-1], starts[1:]))
        attention = [cost.attention_ns(prompt + i) + before_experts_ns for i in range(max_len)]
        pending = 0           # compute time not yet turned into a SimPy timeout
        for r in range(len(starts) - 1):
            first = starts[r]
            for t in range(first, starts[r + 1]):
                token_start = env.now + pending
                pending += cost.token_overhead_ns
                layer_ns = attention[t - first]
                routes = trace.experts[t].tolist()
                weights = trace.weights[t].tolist()
                for layer in range(L):
                    pending += layer_ns
                    if len(free_engines) < n_engines or len(queue):
                        # The copy side is active: meet it at the router's time.
                        yield env.timeout(pending)
                        pending = 0
                    run = ctrl.executed_experts(t, layer, routes[layer], weights[layer])   # lossy policies substitute
                    needs = ctrl.begin_layer(t, layer, run, weights[layer], env.now + pending)
                    if len(queue):
                        if pending:
                            yield env.timeout(pending)
                            pending = 0
                        self._start_copies()           # demand fetches only (controller rule)
                    ctrl.prefetch_layer(env.now + pending)
                    if len(queue):
                        if pending:
                            yield env.timeout(pending)
                            pending = 0
                        self._start_copies()
                    for key, job in needs:
                        if job is not None and job.state != DONE:
                            if pending:
                                yield env.timeout(pending)
                                pending = 0
                            if job.waiter is None:
                                job.waiter = env.event()
                            waited_from = env.now
                            yield job.waiter
                            self.stall_ns += env.now - waited_from
                        if timeline is not None:
                            begin = env.now + pending
                            timeline.compute.append(ComputeEvent(
                                t, layer, key, cache.key_slot[key], begin, begin + expert_ns))
                        pending += expert_ns
                    if pending and (len(free_engines) < n_engines or len(queue)):
                        # The layer's experts stay protected until their compute ends.
                        yield env.timeout(pending)
                        pending = 0
                    ctrl.end_layer(needs)
                end = env.now + pending
                self.token_ns.append(end - token_start)
                if timeline is not None:
                    timeline.token_end_ns.append(end)
        if pending:
            yield env.timeout(pending)

    def run(self) -> None:
        self.ctrl.preload()
        if self.timeline is not None:
            self.timeline.preloaded = {slot: key for key, slot in self.cache.key_slot.items()}
        decode = self.env.process(self._decode())
        self.env.run(until=decode)


def simulate(trace: Trace, policy_cls: type[Policy], hardware: HardwareProfile, settings: SimSettings,
             train_trace: Trace | None = None, record_timeline: bool = False) -> SimResult:
    """Replay ``trace`` under ``policy_cls`` on ``hardware``; returns metrics and, on request, the
    event timeline."""
    wall_start = time.perf_counter()
    run = _Run(trace, policy_cls, hardware, settings, train_trace, record_timeline)
    run.run()
    wall_s = time.perf_counter() - wall_start
    return SimResult(_metrics(run), run.ctrl.stats, run.token_ns, wall_s,
                     trace.num_tokens * trace.num_layers, run.timeline)


def _metrics(run: _Run) -> dict[str, float | int]:
    stats = run.ctrl.stats
    total_ns = int(run.env.now)
    tokens = len(run.token_ns)
    tpot = np.asarray(run.token_ns, dtype=np.float64) / 1e6
    return {
        "tokens": tokens,
        "sim_time_s": total_ns / 1e9,
        "tokens_per_s": tokens * 1e9 / total_ns if total_ns else float("inf"),
        "tpot_ms_mean": float(tpot.mean()),
        "tpot_ms_p50": float(np.percentile(tpot, 50)),
        "tpot_ms_p99": float(np.percentile(tpot, 99)),
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
        # Copies still in flight when decode ends are not counted as busy time.
        "link_utilisation": run.copy_busy_ns / (total_ns * run.copy_engines) if total_ns else 0.0,
        "stall_ms_per_token": run.stall_ns / 1e6 / tokens if tokens else 0.0,
    }
