"""Generated user policies at the policy boundary: every hook may return a wrong type, a bad key (out of
range, negative, of another layer, float, bool, None, a string, a numpy integer), a malformed prefetch
list or preload, or raise. Run through the untimed replay, the SimPy reference and (a few) the CPU
engine, each case ends in one of:

- the run completes, its counts are consistent, the cache holds only int keys it can hold, and where
  every answer the policy gave was only another spelling of a valid one (numpy integers, tuples,
  generators, duplicates, held keys) the counts are exactly those of the plain policy;
- one ``PolicyError`` naming the policy class, the hook and the broken rule, for the first wrong answer
  the policy gave (the test's own statement of the rules decides which answers are wrong);
- the exception the policy itself raised, unchanged, which the sweep reports at its file, line and hook.

Never a bare library exception from inside the package, never a silent wrong number. The cases are
kept small (tiny traces) so that a few hundred run in seconds; FUZZ_EXAMPLES=5000 for a longer hunt.
``tests/test_policy_checks.py`` holds one example of each rule.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hardware import load_hardware
from offload.access import PrefetchRequest
from offload.controller import PolicyError
from offload.session import RunSettings
from policies.lru import LRU
from policies.registry import crash_site
from real.engine import OffloadEngine
from real.shape_model import random_model
from sim.replay import replay_untimed
from sim.simulator import simulate
from traces import ModelShape, synthetic_trace

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "600"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
H100 = load_hardware("h100-pcie5")
# (tokens, layers, experts, top_k): small enough for milliseconds a run, with one-expert layers too.
TRACES = [synthetic_trace(num_tokens=t, num_layers=l, num_experts=e, top_k=k, num_requests=2, seed=i)
          for i, (t, l, e, k) in enumerate([(10, 2, 6, 2), (8, 3, 5, 1), (8, 2, 8, 3), (12, 1, 4, 2)])]


class UserBug(Exception):
    """An exception class of the user's own."""


RAISED = [KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError, RuntimeError,
          AssertionError, UserBug]


# -- the rules, as the README states them (the test's own oracle, independent of the controller) ----
def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Verdict:
    error: str | None = None     # the rule's words in the expected PolicyError, or None: a valid answer
    normal: object = None        # a valid answer in its plain form (what the controller will act on)


def _key_verdict(key, n: int) -> Verdict | None:
    if not _is_int(key):
        return Verdict("an expert key must be an integer")
    if not 0 <= key < n:
        return Verdict(rf"expert keys are in \[0, {n}\)")
    return None


def preload_verdict(value, ctx) -> Verdict:
    try:
        entries = list(value)
    except TypeError:
        return Verdict(r"expected a list of \(key, pinned\) pairs")
    n, placed = ctx.num_layers * ctx.num_experts, {}
    for entry in entries:
        try:
            key, pinned = entry
        except (TypeError, ValueError):
            return Verdict(r"expected \(key, pinned\) pairs")
        if bad := _key_verdict(key, n):
            return bad
        if int(key) in placed:
            continue
        scope = _scope(ctx, int(key))
        if sum(_scope(ctx, k) == scope for k in placed) >= _capacity(ctx):
            return Verdict("no free slot left")
        placed[int(key)] = bool(pinned)
    return Verdict(normal=list(placed.items()))


def victim_verdict(value, scope: int, cache, job) -> Verdict:
    if value is None:
        if job.demand and cache.evictable(scope):
            return Verdict("choose_victim may refuse only prefetches")
        return Verdict()
    if bad := _key_verdict(value, cache.num_layers * cache.num_experts):
        return bad
    if cache.scope(int(value)) != scope:
        return Verdict("the victim must be in the asked scope")
    if not cache.is_evictable(int(value)):
        return Verdict("the victim must be resident, unpinned and not in use")
    return Verdict(normal=int(value))


def prefetch_verdict(value, cache) -> Verdict:
    if value is None:
        return Verdict()
    listed = "expected a list of PrefetchRequest"
    try:
        items = list(value)
    except TypeError:
        return Verdict(listed)
    wanted: dict[int, int] = {}
    for item in items:
        try:
            key, need_step = item
        except (TypeError, ValueError):
            return Verdict(listed)
        if bad := _key_verdict(key, cache.num_layers * cache.num_experts):
            return bad
        if not _is_int(need_step):
            return Verdict("need_step must be an integer")
        wanted.setdefault(int(key), int(need_step))
    # Keys already held (resident or in flight) are not copied: the same answer without them.
    return Verdict(normal=[(k, s) for k, s in wanted.items() if not cache.holds(k)])


def execute_verdict(value, experts: list[int], num_experts: int) -> Verdict:
    if value is None:
        return Verdict()
    try:
        ids = list(value)
    except TypeError:
        ids = None
    if (ids is None or not all(_is_int(e) for e in ids) or len(ids) != len(experts) or len(set(ids)) != len(ids)
            or not all(0 <= e < num_experts for e in ids)):
        return Verdict("distinct integer expert ids")
    return Verdict(normal=[int(e) for e in ids])


def _scope(ctx, key: int) -> int:
    return key // ctx.num_experts if ctx.cache_mode == "per_layer" else 0


def _capacity(ctx) -> int:
    return ctx.cache_slots * (1 if ctx.cache_mode == "per_layer" else ctx.num_layers)


def pins_can_block(pinned: list[int], ctx) -> bool:
    """Pins that leave fewer free slots in a scope than a layer's chosen experts may need."""
    keys_per_scope = ctx.num_experts if ctx.cache_mode == "per_layer" else ctx.num_layers * ctx.num_experts
    per_scope = Counter(_scope(ctx, k) for k in pinned)
    return any(_capacity(ctx) - p < min(ctx.top_k, keys_per_scope - p) for p in per_scope.values())


# -- what a fuzzed policy answers instead of its plain answer -----------------------------------------
def _first_absent(cache, scope: int):
    keys = range(cache.num_layers * cache.num_experts)
    return next((k for k in keys if cache.scope(k) == scope and not cache.holds(k)), 0)


VICTIMS = {   # name -> (plain victim v or None, scope, cache, job, policy) -> what the policy returns
    "numpy64": lambda v, s, c, j, p: None if v is None else np.int64(v),
    "numpy_uint8": lambda v, s, c, j, p: None if v is None else np.uint8(v),
    "float": lambda v, s, c, j, p: float(v or 0),
    "str": lambda v, s, c, j, p: str(v),
    "bool": lambda v, s, c, j, p: True,
    "numpy_bool": lambda v, s, c, j, p: np.bool_(True),
    "none": lambda v, s, c, j, p: None,
    "negative": lambda v, s, c, j, p: -1,
    "out_of_range": lambda v, s, c, j, p: c.num_layers * c.num_experts + (v or 0),
    "other_layer": lambda v, s, c, j, p: ((v or 0) + c.num_experts) % (c.num_layers * c.num_experts),
    "in_use": lambda v, s, c, j, p: p.last_keys[0] if p.last_keys else 0,
    "absent": lambda v, s, c, j, p: _first_absent(c, s),
    "its_own_key": lambda v, s, c, j, p: j.key,
    "another_evictable": lambda v, s, c, j, p: max(c.evictable(s), default=None),
}

PREFETCHES = {   # name -> (plain list of PrefetchRequest, access, policy) -> what the policy returns
    "tuples": lambda r, a, p: [tuple(x) for x in r],
    "lists": lambda r, a, p: [[k, s] for k, s in r],
    "numpy": lambda r, a, p: [(np.int64(k), np.int32(s)) for k, s in r],
    "generator": lambda r, a, p: (x for x in r),
    "tuple_of_requests": lambda r, a, p: tuple(r),
    "duplicate": lambda r, a, p: r + [PrefetchRequest(k, s + 7) for k, s in r[:1]],
    "held_keys": lambda r, a, p: r + [PrefetchRequest(k, a.step) for k in p.cache.residents()[:2]],
    "none": lambda r, a, p: None,
    "empty": lambda r, a, p: [],
    "unguarded": lambda r, a, p: [PrefetchRequest((a.layer + 1) * p.ctx.num_experts + e, a.step + 1)
                                  for e in a.experts],
    "bare_request": lambda r, a, p: r[0] if r else PrefetchRequest(0, 0),
    "int": lambda r, a, p: 5,
    "str": lambda r, a, p: "ab",
    "dict": lambda r, a, p: {k: s for k, s in r} or {0: 0},
    "element_none": lambda r, a, p: r + [None],
    "element_short": lambda r, a, p: [(k,) for k, _ in r] or [(0,)],
    "element_long": lambda r, a, p: r + [(0, 0, 0)],
    "element_str": lambda r, a, p: ["ab"] + r,
    "key_float": lambda r, a, p: [(float(k), s) for k, s in r] or [(1.0, 0)],
    "key_none": lambda r, a, p: r + [(None, a.step)],
    "key_str": lambda r, a, p: [(str(k), s) for k, s in r] or [("0", 0)],
    "key_bool": lambda r, a, p: [(True, a.step + 1)] + r,
    "key_numpy_bool": lambda r, a, p: [(np.bool_(False), a.step + 1)],
    "key_negative": lambda r, a, p: r + [(-1, a.step + 1)],
    "key_too_big": lambda r, a, p: r + [(p.ctx.num_layers * p.ctx.num_experts, a.step + 1)],
    "step_float": lambda r, a, p: [(k, s + 0.5) for k, s in r] or [(0, 0.5)],
    "step_none": lambda r, a, p: [(k, None) for k, _ in r] or [(0, None)],
    "step_str": lambda r, a, p: [(k, "soon") for k, _ in r] or [(0, "soon")],
}

PRELOADS = {   # name -> (plain list of (key, pinned), policy) -> what the policy returns
    "numpy": lambda r, p: [(np.int64(k), np.bool_(q)) for k, q in r],
    "lists": lambda r, p: [[k, q] for k, q in r],
    "generator": lambda r, p: (x for x in r),
    "duplicate": lambda r, p: r + r[:1],
    "none": lambda r, p: None,
    "int": lambda r, p: 3,
    "entry_int": lambda r, p: r + [3],
    "entry_triple": lambda r, p: r + [(0, False, 0)],
    "key_float": lambda r, p: [(float(k), q) for k, q in r] or [(0.0, False)],
    "key_str": lambda r, p: r + [("1", False)],
    "key_bool": lambda r, p: [(True, False)] + r,
    "key_none": lambda r, p: r + [(None, False)],
    "key_negative": lambda r, p: r + [(-2, False)],
    "key_too_big": lambda r, p: r + [(p.ctx.num_layers * p.ctx.num_experts, False)],
    "whole_layer": lambda r, p: [(k, False) for k in range(p.ctx.num_experts)],
    "pin_everything": lambda r, p: [(k, True) for k in range(min(p.ctx.num_experts, _capacity(p.ctx)))],
}

EXECUTES = {   # name -> (plain ids, routed experts, num_experts) -> what the policy returns
    "numpy": lambda r, x, e: np.array(r),
    "tuple": lambda r, x, e: tuple(r),
    "none": lambda r, x, e: None,
    "shifted": lambda r, x, e: [(i + 1) % e for i in r],
    "short": lambda r, x, e: r[:-1],
    "long": lambda r, x, e: r + [next(i for i in range(e + 1) if i not in r)],
    "duplicate": lambda r, x, e: [r[0]] * len(r),
    "out_of_range": lambda r, x, e: [e] + r[1:],
    "negative": lambda r, x, e: r[:-1] + [-1],
    "float": lambda r, x, e: [float(i) for i in r],
    "element_none": lambda r, x, e: [None] + r[1:],
    "str": lambda r, x, e: "ab",
    "int": lambda r, x, e: 3,
    "bools": lambda r, x, e: [True] + r[1:],
}

ANSWERS = {"preload": PRELOADS, "choose_victim": VICTIMS, "prefetch": PREFETCHES, "execute": EXECUTES}
HOOKS = ["__init__", "preload", "on_access", "on_insert", "on_evict", "choose_victim", "prefetch", "execute"]


@dataclass(frozen=True)
class Fault:
    hook: str
    answer: str | None        # a name in ANSWERS[hook], or None: the hook raises ``raises``
    raises: type[BaseException] | None
    at: int | None            # the call (0 = first) it happens at; None: every call


@dataclass(frozen=True)
class Plan:
    prefetching: bool         # the plain policy prefetches the next layer's experts (else on demand only)
    lossy: bool               # the plain policy runs the routed experts in reverse order (``execute``)
    preload: int              # the plain policy preloads this many experts of layer 0 ...
    pins: int                 # ... the first ``pins`` of them pinned
    faults: tuple[Fault, ...] = ()


@dataclass
class Log:
    """What one run's policy did: each answer that differs from the plain one, with its verdict."""
    entries: list = field(default_factory=list)      # (hook, Verdict | BaseException, plain_equivalent)
    policies: list = field(default_factory=list)
    pinned: list = field(default_factory=list)


class Fuzzed(LRU):
    """LRU with the plain behaviour its ``plan`` asks for, and its ``plan.faults`` on top."""

    plan: Plan = Plan(False, False, 0, 0)
    log: Log = Log()

    def __init__(self, ctx):
        self.calls: Counter = Counter()
        self.due: Fault | None = None
        self.last_keys: list[int] = []
        self.faults = {f.hook: f for f in self.plan.faults}
        if (err := self._exception_now("__init__")) is not None:
            raise err
        super().__init__(ctx)
        self.log.policies.append(self)

    # -- fault bookkeeping -------------------------------------------------------------------------
    def _exception_now(self, hook: str) -> BaseException | None:
        """Counts this call of ``hook`` and notes its fault if due now (``self.due``); returns the
        exception to raise when that fault is one. Every hook calls this first (the raise is then in
        the hook's own frame, where the sweep's report looks for it)."""
        count = self.calls[hook]
        self.calls[hook] += 1
        fault = self.faults.get(hook)
        self.due = fault if fault is not None and fault.at in (None, count) else None
        if self.due is None or self.due.raises is None:
            return None
        err = self.due.raises(f"fuzzed {hook} raised")
        self.log.entries.append((hook, err, False))
        return err

    def _answer(self, hook: str, plain, judge, *args):
        """The plain answer, or the due fault's in its place; the verdict of what is returned is logged."""
        if self.due is None or self.due.answer is None:
            return plain
        value = ANSWERS[hook][self.due.answer]([] if plain is None else plain, *args)
        if hasattr(value, "__next__"):          # a generator: judged as a list, handed over as a generator
            items = list(value)
            verdict, value = judge(items), (x for x in items)
        else:
            verdict = judge(value)
        self.log.entries.append((hook, verdict, verdict.error is None and verdict.normal == judge(plain).normal))
        self.answered = verdict
        return value

    # -- the hooks ---------------------------------------------------------------------------------
    def preload(self):
        if (err := self._exception_now("preload")) is not None:
            raise err
        plain = [(k, k < self.plan.pins) for k in range(self.plan.preload)]
        value = self._answer("preload", plain, lambda v: preload_verdict(v, self.ctx), self)
        placed = preload_verdict(plain, self.ctx) if value is plain else self.answered
        self.log.pinned = [k for k, pinned in placed.normal or [] if pinned]    # for ``pins_can_block``
        return value

    def on_access(self, access, index, key, hit):
        if (err := self._exception_now("on_access")) is not None:
            raise err
        if index == 0:
            self.last_keys = []
        self.last_keys.append(key)
        super().on_access(access, index, key, hit)

    def on_insert(self, key):
        if (err := self._exception_now("on_insert")) is not None:
            raise err
        super().on_insert(key)

    def on_evict(self, key):
        if (err := self._exception_now("on_evict")) is not None:
            raise err
        super().on_evict(key)

    def choose_victim(self, scope, cache, job):
        if (err := self._exception_now("choose_victim")) is not None:
            raise err
        plain = super().choose_victim(scope, cache, job)
        return self._answer("choose_victim", plain, lambda v: victim_verdict(v, scope, cache, job),
                            scope, cache, job, self)

    def prefetch(self, access):
        if (err := self._exception_now("prefetch")) is not None:
            raise err
        nxt = access.layer + 1
        plain = None
        if self.plan.prefetching:
            plain = [] if nxt >= self.ctx.num_layers else [
                PrefetchRequest(nxt * self.ctx.num_experts + e, access.step + 1) for e in access.experts]
        return self._answer("prefetch", plain, lambda v: prefetch_verdict(v, self.cache), access, self)

    def execute(self, access):
        if (err := self._exception_now("execute")) is not None:
            raise err
        plain = list(reversed(access.experts))
        return self._answer("execute", plain, lambda v: execute_verdict(v, access.experts, self.ctx.num_experts),
                            access.experts, self.ctx.num_experts)


def policy_class(plan: Plan) -> type[Fuzzed]:
    return type("UserPolicy", (Fuzzed,), {"plan": plan, "log": Log(), "lossless": not plan.lossy})


# -- the property --------------------------------------------------------------------------------------
def _check_counts(stats, accesses: int, expert_bytes: int, untimed: bool) -> None:
    assert stats.accesses == accesses
    assert stats.hits + stats.misses + stats.late == stats.accesses
    assert stats.copies == stats.demand_copies + stats.prefetch_copies
    assert stats.bytes_moved == stats.copies * expert_bytes
    assert stats.evictions <= stats.copies
    assert stats.prefetch_useful + stats.prefetch_wasted <= stats.prefetch_copies
    assert stats.prefetch_copies + stats.cancelled + stats.dropped <= stats.prefetches
    if untimed:     # every copy finishes as it starts: each miss was copied
        assert stats.demand_copies >= stats.misses


def _check_cache(policy, settings: RunSettings) -> None:
    cache = policy.cache
    residents = cache.residents()
    assert all(type(k) is int and 0 <= k < cache.num_layers * cache.num_experts for k in residents), residents
    per_scope = Counter(cache.scope(k) for k in residents)
    assert all(n <= settings.cache_slots * (1 if cache.per_layer else cache.num_layers) for n in per_scope.values())


def outcome(cls: type[Fuzzed], run):
    """Run ``run()`` and check the property; returns its stats, or None when it stopped as it must."""
    cls.log = Log()
    try:
        result = run()
    except PolicyError as err:
        log = cls.log
        first = _first_wrong(log)
        if first is not None:
            assert first == len(log.entries) - 1, "the run went on after a wrong answer"
            hook, verdict, _ = log.entries[first]
            assert not isinstance(verdict, BaseException), f"{hook} raised {verdict!r}, the run reported {err!r}"
            assert str(err).startswith(f"policy {cls.__name__}.{hook} returned "), (str(err), hook)
            assert re.search(verdict.error, str(err)), (str(err), verdict.error)
            event(f"PolicyError from {hook}")
        else:
            assert pins_can_block(log.pinned, log.policies[0].ctx), f"no wrong answer, yet {err!r}"
            assert str(err).startswith(f"policy {cls.__name__}.preload returned ") and "pinned experts" in str(err)
            event("PolicyError: pins leave no slot")
        return None
    except Exception as err:   # noqa: BLE001  (the property: only the policy's own exception may escape)
        first = _first_wrong(cls.log)
        assert first is not None and err is cls.log.entries[first][1], f"a bare {type(err).__name__} escaped: {err!r}"
        assert first == len(cls.log.entries) - 1, "the run went on after the policy raised"
        hook = cls.log.entries[first][0]
        site = crash_site(cls, err)
        assert site.startswith(f"{__file__}:") and site.endswith(f" in {hook}"), site
        event(f"raised in {hook}")
        return None
    first = _first_wrong(cls.log)
    assert first is None, f"the run completed although the policy answered {cls.log.entries[first]}: a silent wrong number"
    event("completed")
    return result


def _first_wrong(log: Log) -> int | None:
    """Index of the policy's first exception or wrong answer in ``log``."""
    return next((i for i, (_, v, _) in enumerate(log.entries) if isinstance(v, BaseException) or v.error), None)


def _equivalent_only(cls) -> bool:
    return all(same for _, _, same in cls.log.entries)


ANSWERING = sorted(ANSWERS)


@st.composite
def faults(draw) -> Fault:
    """Mostly a wrong or odd answer from a hook that answers; else an exception from any hook."""
    if draw(st.integers(0, 3)):
        hook = draw(st.sampled_from(ANSWERING))
        answer, raises = draw(st.sampled_from(sorted(ANSWERS[hook]))), None
    else:
        hook, answer, raises = draw(st.sampled_from(HOOKS)), None, draw(st.sampled_from(RAISED))
    return Fault(hook, answer, raises, draw(st.one_of(st.none(), st.integers(0, 6))))


@st.composite
def plans(draw, trace):
    E, K, L = trace.num_experts, trace.top_k, trace.num_layers
    mode = draw(st.sampled_from(["per_layer", "global"]))
    slots = draw(st.integers(K, E))
    capacity = slots * (1 if mode == "per_layer" else L)
    preload = draw(st.integers(0, min(capacity, E)))
    # Pins that leave a layer's top-k room, mostly; sometimes any number (the controller must notice).
    pins = draw(st.integers(0, preload) if draw(st.integers(0, 2)) == 0 else st.integers(0, max(0, min(preload, capacity - K))))
    drawn = {}
    for fault in draw(st.lists(faults(), min_size=1, max_size=2)):
        drawn.setdefault(fault.hook, fault)       # one fault a hook
    plan = Plan(prefetching=draw(st.booleans()), lossy=draw(st.integers(0, 3)) == 0, preload=preload, pins=pins,
                faults=tuple(drawn.values()))
    return plan, RunSettings(cache_slots=slots, cache_mode=mode, prefetch_depth=1)


@st.composite
def cases(draw):
    trace = draw(st.sampled_from(TRACES))
    plan, run_settings = draw(plans(trace))
    return trace, plan, run_settings


@FUZZ
@given(case=cases())
def test_a_fuzzed_user_policy_runs_correctly_or_stops_with_one_error_naming_it(case):
    trace, plan, run_settings = case
    cls = policy_class(plan)
    untimed = outcome(cls, lambda: replay_untimed(trace, cls, run_settings))
    if untimed is not None:
        _check_counts(untimed, trace.experts.size, 1, untimed=True)
        _check_cache(cls.log.policies[0], run_settings)
        plain_only = _equivalent_only(cls)
    simulated = outcome(cls, lambda: simulate(trace, cls, H100, run_settings, path="reference"))
    if simulated is not None:
        _check_counts(simulated.stats, trace.experts.size, trace.model.expert_bytes(run_settings.precision),
                      untimed=False)
        _check_cache(cls.log.policies[0], run_settings)
        assert len(simulated.token_ns) == trace.num_tokens and min(simulated.token_ns) > 0
    if untimed is not None and plain_only and plan.faults:
        # Another spelling of the plain answers: the plain policy's counts exactly.
        plain = policy_class(replace(plan, faults=()))
        assert replay_untimed(trace, plain, run_settings) == untimed
        if simulated is not None and _equivalent_only(cls):
            again = simulate(trace, plain, H100, run_settings, path="reference")
            assert (again.stats, again.token_ns) == (simulated.stats, simulated.token_ns)
        event("same counts as the plain policy")


# -- a few through the CPU engine -------------------------------------------------------------------
SHAPE = ModelShape("fuzz-moe", num_layers=2, num_experts=5, top_k=2, hidden_size=16, expert_intermediate_size=16,
                   num_attention_heads=2, num_kv_heads=1, head_dim=8, vocab_size=32)
ENGINE_TRACE = synthetic_trace(num_tokens=4, num_layers=SHAPE.num_layers, num_experts=SHAPE.num_experts,
                               top_k=SHAPE.top_k, seed=0)


@settings(max_examples=max(EXAMPLES // 10, 20), deadline=None, suppress_health_check=list(HealthCheck))
@given(drawn=plans(ENGINE_TRACE))
@torch.no_grad()
def test_the_engine_holds_the_same_property(drawn):
    plan, run_settings = drawn
    cls = policy_class(plan)
    model = random_model(SHAPE, "cpu", torch.float32, seed=2, max_len=16)
    engine = []

    def run():     # the preload is placed when the engine is built
        engine.append(OffloadEngine(model, SHAPE, cls, run_settings))
        return engine[0].generate([[1, 2], [3]], 3)

    result = outcome(cls, run)
    if result is not None:
        steps = len(result.routing.experts)
        _check_counts(result.stats, steps * SHAPE.num_layers * SHAPE.top_k, engine[0].expert_bytes, untimed=False)
        _check_cache(cls.log.policies[0], run_settings)
