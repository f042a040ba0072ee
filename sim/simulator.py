"""The timed model of an offloaded MoE decode: a compute stream, copy engines, and the shared
controller between them.

Decode walks requests and tokens; each layer is one ``offload.layer_turn``, the per-layer protocol
the engine walks too: attention and router, then the chosen experts in the order the controller
gives (resident ones first), each waiting for its copy. Copy engines drain the controller's queue,
demand fetches first. Simulated time is integer nanoseconds.

Two clocks keep the time. The ideal link (``copies_in_flight=None``), whose engines take the next job
the moment they free, acts on its own: it runs on SimPy (``_LinkClock``). The engine's copy window
(the default) is driven by the host alone, which commits every copy at a time when its end is already
fixed: there a copy is an integer-ns entry on a heap, completed in the order SimPy would process its
event, and the walk runs without an event loop (``_WindowClock``). Both give what the SimPy model of
the window gave (``tests/test_reference_recorded.py``).

The host's costs around a copy (``hardware.profile.MeasuredCompute``): a layer's demand copies start
``miss_latency`` after the host reaches its copy start (the host busy meanwhile, the compute stream not:
the layer's hits run), and an expert that waited for its copy starts ``copy_wait`` after the copy ends.
A prefetch a layer decides starts no earlier than ``prefetch_latency`` plus the policy's decision time after
the layer's routing (``decided_ns``): the engine's host launches the layer's experts and the next layer's
attention before it decides. That host time overlaps the GPU, so it delays the prefetch, not the layer.

Speed: compute that cannot interact with a copy does not advance the clock step by step. While no
copy is queued or in flight, nothing else can happen, so the decode accumulates compute time in
``pending`` and advances once (on SimPy, one timeout) when it must meet the copy side (a copy queued,
a copy to wait for). The order of decisions, and so every result, is unchanged.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from heapq import heappop, heappush

import simpy

from hardware import HardwareProfile
from offload.controller import OffloadStats
from offload.copy_queue import DONE, QUEUED
from offload.layer_turn import drive, layer_turn
from offload.metrics import run_metrics
from offload.policy import Policy
from offload.predictors import predictor_for
from offload.session import RunSettings, open_session
from traces import Trace


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
    # (token, layer, the host's time as the layer's turn begins), in decode order
    layer_start_ns: list[tuple[int, int, int]] = field(default_factory=list)
    # (token, layer, [(started_ns, finished_ns) of each copy its experts waited for, in the order they ran])
    layer_waits: list[tuple[int, int, list[tuple[int, int]]]] = field(default_factory=list)


@dataclass
class SimResult:
    metrics: dict[str, float | int]   # deterministic: the same inputs give the same values
    stats: OffloadStats
    token_ns: list[int]
    wall_s: float                     # the simulator's own speed, kept out of ``metrics``
    layer_steps: int
    timeline: Timeline | None = None
    path: str = "reference"           # which model ran: "reference" (the clocks here) or "fast" (sim.fast_path)

    @property
    def layer_steps_per_wall_s(self) -> float:
        return self.layer_steps / self.wall_s if self.wall_s > 0 else float("inf")


_AFTER_ALL = float("inf")     # a commit number after every copy's


class _Clock:
    """What both timed clocks share: the session, the costs, the named points that do not wait, and the
    decode walk. Subclasses keep time: ``_LinkClock`` (SimPy) for the ideal link, ``_WindowClock`` for the
    engine's copy window."""

    def __init__(self, trace: Trace, policy_cls: type[Policy], hardware: HardwareProfile,
                 settings: RunSettings, train_trace: Trace | None, record: bool):
        shape = trace.model
        self.trace = trace
        self.settings = settings
        expert_bytes = shape.expert_bytes(settings.precision)
        self.cost = hardware.compute_cost(shape, settings.precision)
        self.copy_ns = hardware.copy.copy_ns(expert_bytes)   # every expert has the same size
        predictor = predictor_for(policy_cls, settings.policy_params, settings.prefetch_depth, trace=trace)
        self.session = open_session(shape, policy_cls, settings, expert_bytes=expert_bytes, trace=trace,
                                    train_trace=train_trace, predictor=predictor, hardware=hardware)
        self.ctrl = self.session.ctrl
        self.cache = self.session.cache
        self.copy_engines = hardware.copy_engines
        # The host's extra work per layer for this policy (its prefetch decision): it overlaps the layer's
        # experts, delays the prefetch copies it decides, and the next layer when longer than the experts.
        self.decision_ns = self.cost.decision_ns(policy_cls)
        self._host_ready = 0          # when the host has taken the current layer's decision
        self.copy_wait_ns = self.cost.copy_wait_ns   # a copy's end to the compute that waited on it
        # The host's time from reaching a layer's copy start to a demand copy's start (the miss's bookkeeping,
        # the pump, the copy's issue: ``real.engine`` measures it as the routing read-back to the first demand
        # copy's issue); the host is busy meanwhile, the compute stream is not (each clock's ``start_copies``).
        self.miss_latency_ns = self.cost.miss_latency_ns
        self._demand_turn = False     # between a layer's routing and its decision: start_copies is the demand one
        # The host's time from a layer's routing to its prefetch decision's start, on a layer without a miss
        # (``real.engine``: the launches of the layer's experts and of the next layer's attention come first)
        self.prefetch_latency_ns = self.cost.prefetch_latency_ns
        self._routed_at = 0           # the host's time at the current layer's routing read-back (kept when it counts)
        self.layer_extra_ns = self.cost.layer_extra_ns(policy_cls)   # the policy's own work before routing
        self.timeline = Timeline() if record else None
        if record:
            self.timeline.preloaded = {slot: key for key, slot in self.cache.key_slot.items()}
        self._gpu_free = 0                     # when the compute stream may start the layer's experts
        self._queued = self.ctrl.queue.queued  # the copies queued, not started (the queue's own dict)
        self.stall_ns = 0
        self.token_ns: list[int] = []
        # Compute time not yet turned into a step of the clock: while no copy is queued or in flight
        # nothing else can happen, so compute accumulates here and the clock advances once, when it must
        # meet the copy side (a copy queued, a copy to wait for). Results are unchanged by it.
        self.pending = 0
        self._layer_ns = 0            # attention + router + overhead of the current token's layers
        self._routes: list[list[int]] = []
        self._weights: list[list[float]] = []

    @property
    def copy_busy_ns(self) -> int:
        """The copy engines' busy time: every completed copy took ``copy_ns``."""
        return self.ctrl.stats.copies * self.copy_ns

    def _record_copy(self, engine: int, job) -> None:
        self.timeline.copies.append(CopyEvent(
            engine, job.key, job.slot, job.demand, job.queued_ns, job.demand_since_ns,
            job.started_ns, job.finished_ns, job.demand_order, job.start_order))

    def chosen(self, token: int, layer: int):
        return self._routes[layer], self._weights[layer], None

    def reweigh(self, layer: int, run: list[int], weights):
        return weights          # the recorded (lossless) routing's weights: time does not depend on them

    def decide(self, token, layer):
        self._demand_turn = False
        self._host_ready = self.now_ns() + self.decision_ns
        return ()

    def decided_ns(self) -> int:
        # the host's decision time, or later by prefetch_latency after the routing read-back; with none, the
        # two agree (the host's time at decide is at least the read-back's)
        if not self.prefetch_latency_ns:
            return self._host_ready
        decided = self._routed_at + self.prefetch_latency_ns + self.decision_ns
        return decided if decided > self._host_ready else self._host_ready

    def _miss_head(self) -> bool:
        """At a layer's demand ``start_copies``: whether a demand copy is queued (the queue's head is one: demand
        sorts first). Every demand job queued then is this layer's (``begin_layer`` queued it, or turned a queued
        prefetch into it: the earlier layers' demand copies are all committed by their ``launch_experts``), and
        the engine issues each one at its pump after ``begin_layer``, so ``miss_latency`` applies to a late
        prefetch still queued as much as to a new miss. A prefetch already on the copy stream is not issued
        again: a layer whose only misses are such copies pays no latency."""
        head = self.ctrl.queue.peek()
        return head is not None and head.demand

    def _experts_end(self, token: int, layer: int, needs) -> int:
        """When the compute stream, free from ``_gpu_free``, ends the layer's experts, each after its copy (all
        landed by now); an expert starts ``copy_wait`` after a copy it had to wait for."""
        gpu, expert_ns, copy_wait_ns, timeline = self._gpu_free, self.cost.expert_ns, self.copy_wait_ns, self.timeline
        for key, job in needs:
            if job is not None and job.finished_ns > gpu:
                self.stall_ns += job.finished_ns - gpu + copy_wait_ns
                gpu = job.finished_ns + copy_wait_ns
            if timeline is not None:
                timeline.compute.append(ComputeEvent(token, layer, key, self.cache.key_slot[key], gpu, gpu + expert_ns))
            gpu += expert_ns
        if timeline is not None:
            timeline.layer_waits.append((token, layer, [(job.started_ns, job.finished_ns) for _, job in needs
                                                        if job is not None]))
        return gpu

    def _mark_layer(self, token: int, layer: int) -> None:
        """With a timeline: the host's time as the layer's turn begins (each clock's ``route``, first)."""
        self.timeline.layer_start_ns.append((token, layer, self.now_ns()))

    def decode(self):
        cost, trace, ctrl = self.cost, self.trace, self.ctrl
        L = trace.num_layers
        before_experts_ns = cost.layer_overhead_ns + cost.router_ns + self.layer_extra_ns
        starts = trace.request_starts.tolist()
        prompt = self.settings.prompt_tokens
        max_len = max(b - a for a, b in zip(starts[:-1], starts[1:]))
        attention = [cost.attention_ns(prompt + i) + before_experts_ns for i in range(max_len)]
        for r in range(len(starts) - 1):
            first = starts[r]
            for t in range(first, starts[r + 1]):
                token_start = self.now_ns()
                self.pending += cost.token_overhead_ns
                self._layer_ns = attention[t - first]
                self._routes = trace.experts[t].tolist()
                self._weights = trace.weights[t].tolist()
                for layer in range(L):
                    yield from layer_turn(ctrl, self, t, layer)
                end = self.now_ns()
                self.token_ns.append(end - token_start)
                if self.timeline is not None:
                    self.timeline.token_end_ns.append(end)
        yield from self._flush()


class _LinkClock(_Clock):
    """The ideal link on SimPy's clock (``copies_in_flight=None``): each copy engine takes the controller's
    next job the moment it frees, so the copy side acts on its own, in virtual time (integer ns)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.env = simpy.Environment()
        self._free_engines = list(range(self.copy_engines - 1, -1, -1))
        self._miss_start = 0      # the current layer's demand copies start no earlier (``miss_latency``)

    # Copy engines are callbacks on their copies' timeouts rather than SimPy processes: a copy is one
    # event, and the decode process waits on that same event (its callback runs after ours, so the
    # controller already knows the copy is done when decode resumes).
    def _issue_copies(self) -> None:
        env, ctrl, free = self.env, self.ctrl, self._free_engines
        while free:
            job = ctrl.next_copy(env.now)
            if job is None:
                return
            # a copy the host decided after ``now`` (its prefetch decision takes time) starts then; a demand
            # copy, once the host has issued it (``miss_latency`` after its copy start: ``_miss_start``)
            delay = job.queued_ns - env.now if job.queued_ns > env.now else 0
            if job.demand and self._miss_start > env.now + delay:
                delay = self._miss_start - env.now
            job.started_ns += delay
            done = env.timeout(delay + self.copy_ns)
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
        self._free_engines.append(engine)
        if self.timeline is not None:
            self._record_copy(engine, job)
        self._issue_copies()

    def _copy_side_active(self) -> bool:
        return len(self._free_engines) < self.copy_engines or bool(self._queued)

    def _flush(self):
        """Turn the pending compute into one timeout (a generator: ``yield from`` it)."""
        if self.pending:
            yield self.env.timeout(self.pending)
            self.pending = 0

    # -- the named points of the layer turn ------------------------------------------------------
    def now_ns(self) -> int:
        # the host's time: the compute stream's, or later while the host still takes its decision
        now = self.env.now + self.pending
        return now if now >= self._host_ready else self._host_ready

    def route(self, token: int, layer: int):
        if self.timeline is not None:
            self._mark_layer(token, layer)
        self.pending += self._layer_ns
        if self.prefetch_latency_ns:          # the host reads the routing back once it and the router are done
            self._routed_at = self.now_ns()
        self._demand_turn = True
        if self._copy_side_active():           # meet the copy side at the router's time
            yield from self._flush()

    def start_copies(self):
        if self._queued:
            yield from self._flush()           # copies start at the compute stream's time
            if self._demand_turn and self.miss_latency_ns and self._miss_head():
                # the host issues the layer's demand copies miss_latency after its time here, and is busy
                # until then (its decision comes after); the compute stream is not held
                self._host_ready = self._miss_start = self.now_ns() + self.miss_latency_ns
            self._issue_copies()

    def launch_experts(self, token, layer, run, needs):
        self._gpu_free = self.env.now + self.pending
        return ()

    def finish_experts(self, token: int, layer: int, needs):
        """The compute stream runs the experts from ``_gpu_free``, each after its copy has landed (and
        ``copy_wait`` more when it had to wait for it); the layer ends when they and the host's decision
        are done. The process waits for a copy still in flight (nothing else can happen before the next
        layer's routing, which follows these experts)."""
        env = self.env
        for key, job in needs:
            if job is not None and job.state != DONE:
                yield from self._flush()
                if job.state != DONE:
                    if job.waiter is None:
                        job.waiter = env.event()
                    yield job.waiter
        end = max(self._experts_end(token, layer, needs), self._host_ready, env.now + self.pending)
        # the layer ends when its experts and the host's decision do
        self.pending = end - env.now
        if self._copy_side_active():     # the layer's experts stay protected until their compute ends
            yield from self._flush()

    def run(self) -> None:
        decode = self.env.process(self.decode())
        self.env.run(until=decode)


class _WindowClock(_Clock):
    """The engine's copy stream (``real.copies.CopyFeeder``, ``copies_in_flight`` = its window): at most
    ``window`` copies committed and not yet retired; the host commits queued copies only at its pump points
    (``start_copies``, and ``launch_experts``, where it blocks until a place frees), and a committed copy can
    be neither cancelled nor overtaken by a later demand.

    Here the host is the only actor: every copy is committed by it, and a committed copy's end is fixed then
    (its lane frees at a known time). So the copy side needs no clock of its own: a committed copy is an
    integer-ns entry on a heap, completed (``copy_done``) when the host's time passes it, in the order SimPy
    processed the copy events this clock replaces — by end time, then commit order — and at the same points:
    when the host advances over pending compute or to its decision (a timeout's worth: every copy ending by
    then), or waits for one copy (the copies ordered before it, itself included). The decode walk never
    yields; results equal the SimPy model's event for event (``tests/test_reference_recorded.py``)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.window = self.settings.copies_in_flight
        self.now = 0                       # the time the host has reached (copies ending by then are done)
        self._lane_free = [0] * self.copy_engines
        self._in_flight: deque = deque()   # committed jobs, in commit order (retired from the front)
        self._ends: list = []              # heap of (end_ns, commit number, job, lane): copies not yet done
        self._commits = 0
        self._gpu_at = -1                  # the compute stream's time when the host ran ahead by miss_latency

    # -- the copy side ---------------------------------------------------------------------------
    def _complete_until(self, bound: tuple) -> None:
        """The host's time moves on to ``bound``'s: every copy ordered up to ``bound`` completes. A copy
        waited for is its own bound (it and the copies ordered before it); an advance over time ``t`` is
        bounded by ``(t, inf)`` (every copy ending by then, as a SimPy timeout to ``t`` processed them)."""
        self.now = bound[0]
        ends, copy_done, timeline = self._ends, self.ctrl.copy_done, self.timeline
        while ends and ends[0] <= bound:
            end, _, job, lane = heappop(ends)
            job.waiter = None        # done: nothing waits on it, and job and entry no longer form a cycle
            copy_done(job, end)
            if timeline is not None:
                self._record_copy(lane, job)

    def _advance(self, t: int) -> None:
        ends = self._ends
        if ends and ends[0][0] <= t:
            self._complete_until((t, _AFTER_ALL))
        else:
            self.now = t

    def _flush(self):
        if self.pending:
            t = self.now + self.pending           # self._advance(t), inlined: a few times per layer
            ends = self._ends
            if ends and ends[0][0] <= t:
                self._complete_until((t, _AFTER_ALL))
            else:
                self.now = t
            self.pending = 0
        return ()

    def _pump(self) -> None:
        """What real.copies.CopyFeeder.pump does, at the host's time ``now``."""
        ctrl, q, lanes, now, copy_ns = self.ctrl, self._in_flight, self._lane_free, self.now, self.copy_ns
        queued, window = self._queued, self.window
        while q and q[0].state == DONE:          # retire from the front, as the feeder does
            q.popleft()
        one_lane = len(lanes) == 1
        while queued and len(q) < window:         # (an empty queue: next_copy would return None)
            job = ctrl.next_copy(now)
            if job is None:
                return
            lane = 0 if one_lane else lanes.index(min(lanes))
            start = lanes[lane] if lanes[lane] > now else now
            if job.queued_ns > start:            # a prefetch decided ahead of the host's time (decided_ns)
                start = job.queued_ns
            lanes[lane] = end = start + copy_ns
            job.started_ns = start
            job.waiter = entry = (end, self._commits, job, lane)
            self._commits += 1
            heappush(self._ends, entry)
            q.append(job)

    # -- the named points of the layer turn ------------------------------------------------------
    def now_ns(self) -> int:
        # the host's time: the compute stream's, or later while the host still takes its decision
        now = self.now + self.pending
        return now if now >= self._host_ready else self._host_ready

    def route(self, token: int, layer: int):
        if self.timeline is not None:
            self._mark_layer(token, layer)
        self.pending += self._layer_ns
        if self.prefetch_latency_ns:          # the host reads the routing back once it and the router are done
            self._routed_at = self.now_ns()
        self._demand_turn = True
        if self._in_flight or self._queued:    # meet the copy side at the router's time
            self._flush()
        return ()

    def start_copies(self):
        if self._queued:
            self._flush()                          # copies start at the compute stream's time
            if self._host_ready > self.now:        # the host pumps once its decision is taken
                self._advance(self._host_ready)
            if self._demand_turn and self.miss_latency_ns and self._miss_head():
                # The host pumps miss_latency later (the miss's bookkeeping, then the feeder retires what has
                # ended and issues): copies ending by then are retired first, and a full window stays full
                # until launch_experts blocks on it, as in the engine. The compute stream is not held: the
                # layer's experts may start from the time before (``launch_experts``).
                self._gpu_at = self.now
                self._advance(self.now + self.miss_latency_ns)
            self._pump()
        return ()

    def launch_experts(self, token, layer, run, needs):
        """The compute stream may start the experts now; the host first commits every copy they wait for,
        blocking while the window is full (the feeder's make_ready)."""
        if self._gpu_at < 0:
            self._gpu_free = self.now + self.pending
        else:                                     # the host ran ahead by miss_latency (start_copies)
            self._gpu_free, self._gpu_at = self._gpu_at, -1
        q = self._in_flight
        for key, job in needs:
            while job is not None and job.state == QUEUED:
                if self.pending:
                    self._flush()
                while q and q[0].state == DONE:
                    q.popleft()
                if len(q) < self.window:
                    self._pump()
                    if job.state != QUEUED:
                        break
                if not q:
                    raise RuntimeError(f"copy of expert key {job.key} cannot start: no slot can be freed "
                                       f"(cache too small for the experts in use)")
                # the window is full, or the copy needs the slot of one in flight
                self._complete_until(q[0].waiter)
        return ()

    def finish_experts(self, token: int, layer: int, needs):
        """As ``_LinkClock.finish_experts``; every copy waited for is committed by now (launch_experts)."""
        for key, job in needs:
            if job is not None and job.state != DONE:
                if self.pending:
                    self._flush()
                if job.state != DONE:
                    self._complete_until(job.waiter)
        end = max(self._experts_end(token, layer, needs), self._host_ready, self.now + self.pending)
        self.pending = end - self.now
        if self._in_flight or self._queued:   # the layer's experts stay protected until their compute ends
            self._flush()
        return ()

    def run(self) -> None:
        drive(self.decode())
        # SimPy's run ended with the decode process's last event: copies ending by then had completed
        self._advance(self.now)


SIM_PATHS = ("auto", "reference", "fast")


# Both clocks count integer nanoseconds, and the fast path's kernels and the results keep them as int64: a run
# past 2**62 ns (146 years) would wrap around into negative or nonsense figures.
CLOCK_LIMIT_NS = 2**62


def simulate(trace: Trace, policy_cls: type[Policy], hardware: HardwareProfile, settings: RunSettings,
             train_trace: Trace | None = None, record_timeline: bool = False,
             path: str = "auto") -> SimResult:
    """Replay ``trace`` under ``policy_cls`` on ``hardware``; returns metrics (``offload.metrics``)
    and, on request, the event timeline.

    ``path``: ``auto`` takes the exact fast path (``sim.fast_path``: compiled hit/miss kernel and
    closed-form timing) where one exists for the policy and no timeline is asked for, else the
    reference (the event model here: on SimPy for the ideal link, the window clock for the engine's copy
    window); ``reference`` forces it; ``fast`` demands the fast path (ValueError where there is
    none). Both give identical results (``tests/test_fast_path.py``); ``SimResult.path`` says which ran.
    """
    if path not in SIM_PATHS:
        raise ValueError(f"sim_path={path!r}; use one of {list(SIM_PATHS)}")
    wall_start = time.perf_counter()
    if path != "reference" and not record_timeline:
        from sim.fast_path import fast_simulate    # numba's import is paid only by runs that use it
        fast = fast_simulate(trace, policy_cls, hardware, settings, train_trace)
        if fast is not None:
            return SimResult(fast.metrics, fast.stats, fast.token_ns, time.perf_counter() - wall_start,
                             fast.layer_steps, None, "fast")
    if path == "fast":
        raise ValueError(f"policy {policy_cls.__name__} has no fast path{' with a timeline' if record_timeline else ''} "
                         f"(kernels exist for the built-in lru, lfu, fifo, static and belady without "
                         f"parameters); use sim_path=auto or reference")
    clock_cls = _LinkClock if settings.copies_in_flight is None else _WindowClock
    clock = clock_cls(trace, policy_cls, hardware, settings, train_trace, record_timeline)
    clock.run()
    if sum(clock.token_ns) >= CLOCK_LIMIT_NS:     # Python's ints do not wrap, but every result keeps int64
        raise ValueError(f"the simulated decode took {sum(clock.token_ns) / 1e9:.3g} s, past the {CLOCK_LIMIT_NS / 1e9:.3g} s "
                         f"the results' 64-bit nanosecond counts hold: the link is far too slow for this trace; use "
                         f"a faster link (pcie_GBps) or fewer tokens (max_tokens)")
    wall_s = time.perf_counter() - wall_start
    metrics = run_metrics(clock.token_ns, clock.ctrl.stats, link_busy_ns=clock.copy_busy_ns,
                          copy_engines=clock.copy_engines, stall_ns=clock.stall_ns)
    return SimResult(metrics, clock.ctrl.stats, clock.token_ns, wall_s,
                     trace.num_tokens * trace.num_layers, clock.timeline, "reference")
