"""The offload controller: the one piece of bookkeeping both clocks drive.

A clock (the SimPy model in ``sim/``, the CUDA engine in ``real/``) tells the controller *when*
things happen — a layer's router has chosen, a copy engine is free, a copy finished, a layer is done —
and the controller decides *what* happens, by consulting the policy and updating the cache and the
copy queue. Counting (hits, misses, bytes) happens here too, so both clocks count the same way.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import asdict, dataclass

from offload.access import LayerAccess, PrefetchRequest
from offload.policy import Policy
from offload.cache import RESIDENT, ExpertCache
from offload.copy_queue import DONE, DROPPED, RUNNING, CopyJob, CopyQueue


@dataclass
class OffloadStats:
    accesses: int = 0          # (token, layer, chosen expert) triples
    hits: int = 0              # resident when the router chose it
    misses: int = 0            # absent and not queued: a new demand fetch
    late: int = 0              # absent but already queued or in flight as a prefetch
    prefetches: int = 0        # prefetch jobs queued
    prefetch_useful: int = 0   # prefetched copies later used
    prefetch_wasted: int = 0   # prefetched copies evicted unused
    cancelled: int = 0         # queued prefetches dropped by a newer prediction
    dropped: int = 0           # prefetches refused a slot by the policy
    copies: int = 0            # completed copies
    demand_copies: int = 0
    prefetch_copies: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    replaced: int = 0          # lossy execution: routed experts not run, a speculated one ran instead

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


Need = tuple[int, "CopyJob | None"]   # (key, the copy it waits for, or None if resident)


class PolicyError(ValueError):
    """A policy answered a hook with something the cache cannot do (a key out of range or not an
    integer, a victim of another scope or one in use, no victim for a demand fetch while one is
    evictable, a preload larger than the cache or pins that leave a layer no slot, an ``execute`` that
    is not top-k distinct expert ids). The message names the policy class, the hook, the value (a long one
    by its length and first entries; ``value`` keeps it whole) and the rule it broke. ``site``:
    ``file:line in hook`` where the policy's class defines the hook (the value left the policy there; no
    frame of the policy is on the stack any more), or None."""

    def __init__(self, policy: Policy, hook: str, value, rule: str):
        super().__init__(f"policy {type(policy).__name__}.{hook} returned {_shown(value)}: {rule}")
        self.policy, self.hook, self.value = type(policy).__name__, hook, value
        code = getattr(getattr(type(policy), hook, None), "__code__", None)
        self.site = None if code is None else f"{code.co_filename}:{code.co_firstlineno} in {hook}"


_SHOWN = 120     # characters of a returned value that a PolicyError's message shows (``value`` keeps it whole)


def _shown(value) -> str:
    """``value``'s repr, or, when long (a preload of every key), its length and first entries: the rule after
    it must stay in sight."""
    text = repr(value)
    if len(text) <= _SHOWN:
        return text
    if isinstance(value, (list, tuple)):
        text = f"{len(value)} entries [{', '.join(map(repr, value[:4]))}, ...]"
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


class OffloadController:
    def __init__(self, policy: Policy, cache: ExpertCache, expert_bytes: int):
        self.policy = policy
        self.cache = cache
        policy.cache = cache.view()          # what every hook may read; only the controller writes
        self.queue = CopyQueue()
        self.expert_bytes = expert_bytes
        self.num_layers = cache.num_layers
        self.num_experts = cache.num_experts
        self.running: dict[int, CopyJob] = {}
        self.stats = OffloadStats()
        self.blocked = False                 # a demand job waits for a slot to be released
        self._unused_prefetch: set[int] = set()
        self._order = 0                      # counts demand promotions and copy starts
        # Set by begin_layer until prefetch_layer: the layer whose prefetch is still to be asked for.
        # In between only demand fetches may start (see next_copy).
        self._prefetch_access: LayerAccess | None = None

    # -- before decoding -----------------------------------------------------------------------
    def preload(self) -> None:
        """Place the policy's preload, all checked before any of it is placed."""
        entries = self.policy.preload()
        try:
            entries = list(entries)
        except TypeError:
            raise PolicyError(self.policy, "preload", entries, "expected a list of (key, pinned) pairs") from None
        placed: dict[int, bool] = {}                 # a key given twice keeps its first entry
        for entry in entries:
            try:
                key, pinned = entry
            except (TypeError, ValueError):
                raise PolicyError(self.policy, "preload", entry, "expected (key, pinned) pairs") from None
            placed.setdefault(self._checked_key(key, "preload"), bool(pinned))
        cache = self.cache
        per_scope = Counter(cache.scope(key) for key in placed)
        slots = cache.num_slots // cache.num_scopes
        for scope, n in per_scope.items():
            if n > slots:
                raise PolicyError(self.policy, "preload", entries, f"{n} experts of scope {scope} for its {slots} "
                                  f"slots: no free slot left; preload at most the cache's slots")
        for key, pinned in placed.items():
            cache.load_resident(key)
            if pinned:
                cache.pin(key)
            self.policy.on_insert(key)

    # -- the compute side ----------------------------------------------------------------------
    def executed_experts(self, token: int, layer: int, experts: list[int],
                         weights: list[float] | None = None) -> list[int]:
        """The experts the clock must run at ``layer``: the routed ones, unless a lossy policy
        substitutes its speculation (``Policy.execute``). Both clocks ask this before ``begin_layer``."""
        if self.policy.lossless:
            return experts
        step = token * self.num_layers + layer
        returned = self.policy.execute(LayerAccess(token, layer, step, experts, weights))
        if returned is None:
            return experts
        try:
            chosen = [_as_int(e) for e in returned]
        except TypeError:
            chosen = None
        if chosen is None or len(chosen) != len(experts) or len(set(chosen)) != len(chosen) or not all(
                0 <= e < self.num_experts for e in chosen):
            raise PolicyError(self.policy, "execute", returned, f"expected {len(experts)} distinct integer expert "
                              f"ids in [0, {self.num_experts}) at layer {layer}, or None to run the routed ones")
        self.stats.replaced += len(set(experts) - set(chosen))
        return chosen

    def begin_layer(self, token: int, layer: int, experts: list[int], weights: list[float] | None,
                    now_ns: int, hidden=None) -> list[Need]:
        """The router of ``layer`` chose ``experts`` for ``token``. Protects them from eviction,
        queues demand fetches for the absent ones, and returns what the compute stream must wait for:
        resident experts first, then the rest in copy order. The clock then starts the demand copies
        and calls ``prefetch_layer``: the engine does so after launching the layer's experts, so the
        policy's prediction and scheduling run while the GPU computes instead of before."""
        if self._prefetch_access is not None:
            raise RuntimeError(f"begin_layer({token}, {layer}): prefetch_layer was not called after the "
                               f"previous begin_layer; every clock calls the two in turn")
        queue, stats = self.queue, self.stats
        cache = self.cache
        key_slot, slot_state, in_use, running = cache.key_slot, cache.slot_state, cache.in_use, self.running
        step = token * self.num_layers + layer
        access = LayerAccess(token, layer, step, experts, weights, hidden)
        base = layer * self.num_experts
        unused_prefetch = self._unused_prefetch
        on_access, queued = self.policy.on_access, queue.queued
        order = self._order
        ready: list[Need] = []
        waiting: list[tuple[int, CopyJob]] = []
        pushed = 0          # how many of ``waiting`` are new demand fetches (pushed in copy order)
        late = useful = 0
        for i, e in enumerate(experts):
            key = base + e
            in_use[key] = in_use.get(key, 0) + 1      # protect it from eviction until end_layer
            slot = key_slot.get(key)
            if slot is None:
                job = queued.get(key)
                if job is None:
                    job = queue.push(key, True, step, now_ns)
                    pushed += 1
                else:                                    # a queued prefetch becomes a demand fetch
                    late += 1
                    queue.reprioritise(job, True, step, now_ns)
                job.demand_order = order
                order += 1
                waiting.append((key, job))
                hit = False
            elif slot_state[slot] == RESIDENT:
                ready.append((key, None))
                hit = True
            else:                                        # its copy is in flight
                late += 1
                waiting.append((key, running[key]))
                hit = False
            if unused_prefetch and key in unused_prefetch:
                unused_prefetch.discard(key)
                useful += 1
            on_access(access, i, key, hit)
        self._order = order
        stats.accesses += len(experts)
        stats.hits += len(ready)
        stats.misses += pushed
        stats.late += late
        stats.prefetch_useful += useful
        self._prefetch_access = access
        # In-flight copies finish first, then queued ones in queue order.
        if waiting:
            if pushed < len(waiting) > 1:       # new demand fetches alone are in copy order already
                waiting.sort(key=_copy_order)
            ready += waiting
        return ready

    def prefetch_layer(self, now_ns: int) -> None:
        """The policy's prefetches for the layer ``begin_layer`` last saw: queues them in need order
        and cancels queued prefetches that the new prediction dropped. Until this is called, only
        demand fetches start, so a stale prefetch never takes the link from this layer's demand."""
        access, self._prefetch_access = self._prefetch_access, None
        if access is None:
            raise RuntimeError("prefetch_layer: no begin_layer to prefetch for")
        requests = self.policy.prefetch(access)
        if requests is not None:
            self._apply_prefetch(requests, now_ns, access.step)

    def end_layer(self, needs: list[Need]) -> None:
        in_use = self.cache.in_use                    # cache.release, inlined: once per routed expert
        for key, _ in needs:
            n = in_use[key] - 1
            if n:
                in_use[key] = n
            else:
                del in_use[key]

    # -- the copy side -------------------------------------------------------------------------
    def next_copy(self, now_ns: int) -> CopyJob | None:
        """Start the most urgent queued copy that can get a slot; None if there is none (or the
        head is a demand fetch waiting for a slot: ``blocked``; or it is a prefetch and the current
        layer's ``prefetch_layer`` is still to come)."""
        self.blocked = False
        cache, queue, policy = self.cache, self.queue, self.policy
        experts = self.num_experts if cache.per_layer else 0
        free, resident, in_use = cache.free, cache.resident, cache.in_use
        while True:
            job = queue.peek()
            if job is None or (not job.demand and self._prefetch_access is not None):
                return None
            key = job.key
            scope = key // experts if experts else 0
            victim = None
            if not free[scope]:
                victim = policy.choose_victim(scope, policy.cache, job)
                # cache.is_evictable_in(victim, scope), inlined: resident in the scope, not in use, not pinned
                if victim is not None and not (type(victim) is int and victim in resident[scope]
                                               and victim not in in_use and victim not in cache.pinned):
                    victim = self._checked_victim(victim, scope)
                if victim is None:
                    if job.demand:
                        self._check_demand_can_wait(job, scope)
                        self.blocked = True
                        return None
                    queue.pop(job)
                    job.state = DROPPED
                    self.stats.dropped += 1
                    continue
            queue.pop(job)
            if victim is not None:              # evict it
                self.stats.evictions += 1
                unused_prefetch = self._unused_prefetch
                if victim in unused_prefetch:
                    unused_prefetch.discard(victim)
                    self.stats.prefetch_wasted += 1
                policy.on_evict(victim)
            job.slot = cache.place(key, scope, victim)   # the victim is checked above
            job.state = RUNNING
            job.started_ns = now_ns
            job.start_order = self._order
            self._order += 1
            self.running[key] = job
            if not job.demand:
                self._unused_prefetch.add(key)
            policy.on_insert(key)
            return job

    def copy_done(self, job: CopyJob, now_ns: int) -> None:
        job.state = DONE
        job.finished_ns = now_ns
        key = job.key
        del self.running[key]
        cache = self.cache                  # cache.finish_copy, inlined: once per copy
        cache.slot_state[job.slot] = RESIDENT
        cache.resident[key // self.num_experts if cache.per_layer else 0].add(key)
        stats = self.stats
        stats.copies += 1
        stats.bytes_moved += self.expert_bytes
        if job.demand:
            stats.demand_copies += 1
        else:
            stats.prefetch_copies += 1

    # -- internals -----------------------------------------------------------------------------
    def _check_demand_can_wait(self, job: CopyJob, scope: int) -> None:
        """A demand fetch found no slot and no victim. It may wait only for a copy in flight into its
        scope (a slot that will free up); else no slot ever frees, because the policy refused one or
        because its pins fill every slot the layer's experts do not hold: PolicyError."""
        cache = self.cache
        evictable = cache.evictable(scope)
        if evictable:
            raise PolicyError(self.policy, "choose_victim", None, f"a demand fetch of key {job.key} needs a slot "
                              f"and experts {sorted(evictable)} are evictable; choose_victim may refuse only "
                              f"prefetches")
        if not any(cache.scope(k) == scope for k in self.running):
            pinned = sorted(k for k in cache.pinned if cache.scope(k) == scope)
            raise PolicyError(self.policy, "preload", pinned, f"these pinned experts leave no slot of scope {scope} "
                              f"for a demand fetch of key {job.key}; pin at most the scope's slots minus top_k")

    def _checked_key(self, key, hook: str) -> int:
        """``key`` as an int in range, else PolicyError (numpy integers are accepted, bools are not)."""
        try:
            key = _as_int(key)
        except TypeError:
            raise PolicyError(self.policy, hook, key, "an expert key must be an integer "
                              "(layer * num_experts + expert)") from None
        n = self.num_layers * self.num_experts
        if not 0 <= key < n:
            # Within one layer past the end, a prefetch is nearly always asking for the layer after the last.
            hint = ("; a prefetch past the last layer: request layer + 1 only while it is < num_layers"
                    if hook == "prefetch" and n <= key < n + self.num_experts else "")
            raise PolicyError(self.policy, hook, key, f"out of range: expert keys are in [0, {n}) "
                              f"({self.num_layers} layers x {self.num_experts} experts){hint}")
        return key

    def _checked_victim(self, victim, scope: int) -> int:
        """The slow path of ``next_copy``'s check: a valid victim as an int, else PolicyError."""
        victim = self._checked_key(victim, "choose_victim")
        cache = self.cache
        if cache.scope(victim) != scope:
            raise PolicyError(self.policy, "choose_victim", victim, f"the victim must be in the asked scope "
                              f"{scope} (its scope is {cache.scope(victim)}); choose from cache.evictable(scope)")
        if not cache.is_evictable(victim):
            raise PolicyError(self.policy, "choose_victim", victim, "the victim must be resident, unpinned and "
                              "not in use by the layer computing; choose from cache.evictable(scope)")
        return victim

    def _apply_prefetch(self, requests: list[PrefetchRequest], now_ns: int, step: int) -> None:
        """Queue ``requests`` (the policy's answer at decode step ``step``): each a valid key needed at a step
        no earlier than ``step``."""
        queue, cache = self.queue, self.cache
        wanted: dict[int, int] = {}
        n = self.num_layers * self.num_experts
        try:
            for key, need_step in requests:
                if not (type(key) is int and 0 <= key < n and type(need_step) is int and need_step >= step):
                    key = self._checked_key(key, "prefetch")
                    try:
                        need_step = _as_int(need_step)
                    except TypeError:
                        raise PolicyError(self.policy, "prefetch", (key, need_step), "need_step must be an "
                                          "integer decode step (token * num_layers + layer)") from None
                    if need_step < step:
                        raise PolicyError(self.policy, "prefetch", (key, need_step), f"need_step {need_step} is in "
                                          f"the past: the layer asking is at step {step} (token * num_layers + "
                                          f"layer); request the step that will route to the expert")
                if key not in wanted:                    # a key's first request counts
                    wanted[key] = need_step
        except (TypeError, ValueError) as err:
            if isinstance(err, PolicyError):
                raise
            raise PolicyError(self.policy, "prefetch", requests, "expected a list of PrefetchRequest(key, "
                              "need_step), or None") from None
        stats, queued = self.stats, queue.queued
        if queued:
            for job in [j for j in queued.values() if not j.demand and j.key not in wanted]:
                queue.cancel(job)
                stats.cancelled += 1
        key_slot = cache.key_slot
        for key, need_step in wanted.items():
            if key in key_slot:                          # resident or being copied
                continue
            job = queued.get(key)
            if job is None:
                queue.push(key, False, need_step, now_ns)
                stats.prefetches += 1
            elif not job.demand and job.need_step != need_step:
                queue.reprioritise(job, False, need_step, now_ns)


def _copy_order(need: tuple[int, CopyJob]):
    """How a layer's waited-for copies are ordered: those in flight first, then queue order (the
    job's ``sort_key()``, inlined: demand before prefetch, then need step, then arrival)."""
    job = need[1]
    return job.state != RUNNING, not job.demand, job.need_step, job.seq


def _as_int(value) -> int:
    """``value`` as a Python int: ints and numpy integers; TypeError for anything else, bools included
    (``True`` is no expert key)."""
    if isinstance(value, bool):
        raise TypeError("a bool is not an integer here")
    return operator.index(value)
