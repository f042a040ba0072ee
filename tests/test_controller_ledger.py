"""The controller's books, kept independently: a test clock drives ``offload.layer_turn`` with copies that
land a random number of pump points after they start (so prefetches queue up, get cancelled, promoted to
demand, dropped, evicted unused), watches the cache and the copy queue from outside at every named point,
and rebuilds every counter of ``OffloadStats`` from what it saw: each job ever queued by its fate, each
access by the state of its expert the moment the router chose it, each started prefetch by whether a layer
used it before it lost its slot.

It also checks, at every copy start, the rules the controller's docstrings promise: only demand copies start
between a layer's routing and its prefetch decision; a prefetch never starts while a demand fetch is queued;
the copy started is the most urgent one left (demand first, then need step, then arrival); a victim is never
in use or pinned; the policy's prefetch list replaces the queued prefetches (a key's first request sets its
need step); and a layer's needs come resident first, then copies in flight, then queued ones in queue order.

The simulator's tests read its timeline, where a counter that is never incremented (``cancelled``,
``dropped``, ``prefetch_wasted``...) leaves no trace: this is where those are checked.
"""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from offload.cache import RESIDENT
from offload.copy_queue import CANCELLED, DONE, DROPPED, QUEUED, RUNNING
from offload.layer_turn import drive, layer_turn
from offload.policy import Policy, PrefetchRequest
from offload.session import RunSettings, open_session
from policies.registry import resolve_policy
from traces import synthetic_trace


class RandomPrefetcher(Policy):
    """Legal but erratic: random pins and preload, random prefetch lists (duplicates, far need steps, None to
    keep the queue), random victims, prefetches refused at random."""

    parameters = {"seed": "the seed of its choices"}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.rng = random.Random(ctx.params["seed"])
        self.requests: list | None = None          # the last prefetch answer, for the clock to check

    def preload(self):
        ctx, rng = self.ctx, self.rng
        L, E, K = ctx.num_layers, ctx.num_experts, ctx.top_k
        per_scope = ctx.cache_slots if ctx.cache_mode == "per_layer" else ctx.cache_slots * L
        entries, pins = [], {}
        keys = list(range(L * E))
        rng.shuffle(keys)
        placed: dict[int, int] = {}
        for key in keys[:rng.randint(0, len(keys))]:
            scope = key // E if ctx.cache_mode == "per_layer" else 0
            if placed.get(scope, 0) >= per_scope:
                continue
            pin = rng.random() < 0.3 and pins.get(scope, 0) < per_scope - K
            pins[scope] = pins.get(scope, 0) + pin
            placed[scope] = placed.get(scope, 0) + 1
            entries.append((key, pin))
        return entries

    def choose_victim(self, scope, cache, job):
        candidates = sorted(cache.evictable(scope))
        if not candidates or (not job.demand and self.rng.random() < 0.3):
            return None
        return self.rng.choice(candidates)

    def prefetch(self, access):
        rng, n = self.rng, self.ctx.num_layers * self.ctx.num_experts
        if rng.random() < 0.15:
            self.requests = None
            return None
        self.requests = [PrefetchRequest(rng.randrange(n), access.step + rng.randint(1, 4))
                         for _ in range(rng.randint(0, 5))]
        return self.requests


class LaggedClock:
    """No time, only order: a copy lands at a random later pump point (or when a layer waits for it). Checks
    the controller's rules as it goes and keeps its own books."""

    def __init__(self, trace, ctrl, engines: int, rng: random.Random, land: float):
        self.land = land                            # the chance that a copy in flight lands at a pump point
        self.trace, self.ctrl, self.cache, self.queue = trace, ctrl, ctrl.cache, ctrl.queue
        self.engines, self.rng = engines, rng
        self.in_flight: list = []
        self.jobs: dict[int, tuple] = {}            # id -> (job, queued as a demand fetch?)
        self.hits = self.misses = self.late = 0
        self.useful = self.wasted = 0
        self.unused: set[int] = set()               # keys whose prefetch copy started and no layer used yet
        self.t = 0
        self._demand_turn = False
        self.evictions = 0
        self.preloaded = len(self.cache.key_slot)

    def now_ns(self):
        return self.t

    # -- what the clock sees ----------------------------------------------------------------------
    def _see_queue(self):
        for job in self.queue.queued.values():
            self.jobs.setdefault(id(job), (job, job.demand))

    def _land(self, job):
        self.in_flight.remove(job)
        self.t += 1
        self.ctrl.copy_done(job, self.t)
        assert job.state == DONE and self.cache.is_resident(job.key)

    def _start(self):
        ctrl, cache, queue = self.ctrl, self.cache, self.queue
        while len(self.in_flight) < self.engines:
            self._see_queue()
            before = dict(cache.key_slot)
            in_use, pinned = dict(cache.in_use), set(cache.pinned)
            demand_queued = any(j.demand for j in queue.queued.values())
            waiting = list(queue.queued.values())
            job = ctrl.next_copy(self.t)
            # jobs the call dropped: prefetches only, each refused a slot (its scope was full)
            for j in waiting:
                if j.state == DROPPED:
                    assert not j.demand
            if job is None:
                break
            assert job.state == RUNNING and job.key in cache.key_slot and not cache.is_resident(job.key)
            if not job.demand:
                assert not demand_queued, "a prefetch started while a demand fetch was queued"
                assert not self._demand_turn, "a prefetch started before the layer's prefetch decision"
            left = [j for j in waiting if j.state == QUEUED]
            assert all(job.sort_key() <= j.sort_key() for j in left), "the copy started is not the most urgent"
            # the victim, if any: the one key that lost its slot
            lost = set(before) - set(cache.key_slot)
            assert len(lost) <= 1
            for victim in lost:
                self.evictions += 1
                assert victim not in in_use and victim not in pinned, f"evicted {victim}, in use or pinned"
                assert cache.scope(victim) == cache.scope(job.key)
                if victim in self.unused:
                    self.unused.discard(victim)
                    self.wasted += 1
            if not lost:
                assert job.slot not in before.values()
            if not job.demand:
                self.unused.add(job.key)
            self.in_flight.append(job)

    # -- the named points of the layer turn -------------------------------------------------------
    def route(self, token, layer):
        self._demand_turn = True
        return ()

    def chosen(self, token, layer):
        experts = self.trace.experts[token, layer].tolist()
        cache, queued = self.cache, self.queue.queued
        for e in experts:
            key = layer * self.trace.num_experts + e
            if cache.is_resident(key):
                self.hits += 1
            elif cache.holds(key) or key in queued:     # its copy in flight, or queued as a prefetch
                assert cache.holds(key) or not queued[key].demand
                self.late += 1
            else:
                self.misses += 1
            if key in self.unused:
                self.unused.discard(key)
                self.useful += 1
        return experts, None, None

    def reweigh(self, layer, run, weights):
        return weights

    def start_copies(self):
        self._see_queue()
        policy = self.ctrl.policy
        if not self._demand_turn and isinstance(policy, RandomPrefetcher) and policy.requests is not None:
            # the prefetch list replaced the queued prefetches; a key's first request sets its need step
            first: dict[int, int] = {}
            for key, step in policy.requests:
                first.setdefault(key, step)
            for job in self.queue.queued.values():
                if not job.demand:
                    assert job.key in first, f"queued prefetch {job.key} was not cancelled"
                    assert job.need_step == first[job.key], (job, first[job.key])
            for key in first:
                assert self.cache.holds(key) or key in self.queue.queued, f"requested {key} not queued"
        for job in list(self.in_flight):
            if self.rng.random() < self.land:
                self._land(job)
        self._start()
        return ()

    def launch_experts(self, token, layer, run, needs):
        # resident first, then copies in flight, then queued ones in queue order
        kinds = [0 if job is None else 1 if job.state in (RUNNING, DONE) else 2 for _, job in needs]
        assert kinds == sorted(kinds), kinds
        queued = [job for _, job in needs if job is not None and job.state == QUEUED]
        assert queued == sorted(queued, key=lambda j: j.sort_key())
        assert all(job is None or job.demand or job.state != QUEUED for _, job in needs)
        return ()

    def decide(self, token, layer):
        self._demand_turn = False
        return ()

    def decided_ns(self):
        return self.t

    def finish_experts(self, token, layer, needs):
        for key, job in needs:
            while job is not None and job.state != DONE:
                if job.state == RUNNING:             # land it alone: what is queued stays queued
                    self._land(job)
                    continue
                if self.in_flight:
                    self._land(self.in_flight[0])
                self._start()
                assert job.state in (QUEUED, RUNNING, DONE)
            assert self.cache.is_resident(key) and key in self.cache.in_use
        return ()

    def run(self):
        for t in range(self.trace.num_tokens):
            for layer in range(self.trace.num_layers):
                drive(layer_turn(self.ctrl, self, t, layer))
                assert not self.cache.in_use
        while self.in_flight:
            self._land(self.in_flight[0])
        self._see_queue()


@st.composite
def runs(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 7))
    top_k = draw(st.integers(1, min(3, experts)))
    tokens = draw(st.integers(2, 20))
    trace = synthetic_trace(num_tokens=tokens, num_layers=layers, num_experts=experts, top_k=top_k,
                            num_requests=draw(st.integers(1, 2)),
                            temporal_locality=draw(st.sampled_from([0.0, 0.5])), seed=draw(st.integers(0, 999)))
    mode = draw(st.sampled_from(["per_layer", "global"]))
    least = top_k if mode == "per_layer" else -(-top_k // layers)
    slots = draw(st.integers(least, experts))
    policy = draw(st.sampled_from(["random"] * 4 + ["oracle", "affinity", "lru", "belady", "static"]))
    return trace, policy, slots, mode, draw(st.integers(1, 2)), draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(runs())
def test_every_counter_is_what_an_outside_observer_counts(case):
    trace, policy, slots, mode, engines, seed = case
    if policy == "random":
        cls, params = RandomPrefetcher, {"seed": seed}
    else:
        cls, params = resolve_policy(policy), {}
    settings_ = RunSettings(cache_slots=slots, cache_mode=mode, prefetch_depth=1 + seed % 3, policy_params=params)
    ctrl = open_session(trace.model, cls, settings_, expert_bytes=7, trace=trace, train_trace=trace).ctrl
    clock = LaggedClock(trace, ctrl, engines, random.Random(seed), (seed % 5 + 1) / 10)
    clock.run()
    s = ctrl.stats
    jobs = [j for j, _ in clock.jobs.values()]
    origin = {id(j): d for j, d in clock.jobs.values()}
    assert s.accesses == trace.experts.size == s.hits + s.misses + s.late
    assert (s.hits, s.misses, s.late) == (clock.hits, clock.misses, clock.late)
    assert s.misses == sum(origin[id(j)] for j in jobs)
    assert s.prefetches == sum(not origin[id(j)] for j in jobs)
    assert s.cancelled == sum(j.state == CANCELLED for j in jobs)
    assert s.dropped == sum(j.state == DROPPED for j in jobs)
    assert all(origin[id(j)] is False for j in jobs if j.state in (CANCELLED, DROPPED))
    done = [j for j in jobs if j.state == DONE]
    assert s.copies == len(done) and s.bytes_moved == 7 * len(done)
    assert s.demand_copies == sum(j.demand for j in done)
    assert s.prefetch_copies == sum(not j.demand for j in done)
    # a prefetch promoted while queued became a demand copy; every demand copy was a miss or such a promotion
    promoted = sum(1 for j in done if j.demand and not origin[id(j)])
    assert s.demand_copies == s.misses + promoted
    left = sum(j.state == QUEUED for j in jobs)
    assert s.prefetches == s.prefetch_copies + promoted + s.cancelled + s.dropped + left
    assert (s.prefetch_useful, s.prefetch_wasted) == (clock.useful, clock.wasted)
    assert s.prefetch_useful + s.prefetch_wasted + len(clock.unused) == s.prefetch_copies
    # evictions: every copy took a free slot or a victim's, so the slots held at the end tell how many
    cache = ctrl.cache
    assert s.evictions == clock.evictions
    assert len(cache.key_slot) == clock.preloaded + s.copies - s.evictions
    assert all(cache.slot_state[slot] == RESIDENT for slot in cache.key_slot.values())
    assert s.replaced == 0
