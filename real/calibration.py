"""Calibration micro-benchmarks: what the simulator's hardware profile needs, measured on the engine apart
from any run it will be checked against (``python -m experiments.validate``).

For one model (a checkpoint, or random weights of a shape) this measures, and returns as plain data:

- ``compute``: attention against context length, the router, one expert and the per-token work (embedding,
  LM head, sampling) with CUDA events (``real.profile_hw.measure_compute``) on the engine's own kernels;
- ``patterns``: the engine decoding synthetic routing that isolates one cost at a time, with every step's
  wall time from a run that records nothing (as the validated runs), and the per-layer timings of a second
  run that records them (``OffloadEngine(record_layer_timings=True)``, whose CUDA events cost the host
  about 25 us a layer on the H200, so its own step times are kept apart, ``marked_step_ms``):
  ``hits`` routes the same top-k experts at every step, so after the first step nothing is copied: the
  per-layer time of a decode with no miss; ``misses`` routes experts round-robin, so that at top-k slots
  per layer every access misses: a demand copy's cost on the critical path, the link's achieved copy
  time and how long after a copy ends the layer can go on; and, per layer of the run that records
  nothing, the host clock from the routing read-back to the first demand copy's issue (``miss_issue_us``,
  two ``perf_counter_ns`` calls a layer, no CUDA event): how late after routing a miss's copy starts; and,
  per layer without a demand copy, the host clock from the routing read-back to the prefetch decision's
  start (``decide_us``): how late after routing a prefetch can be decided (the ``hits`` pattern's gives it);
- ``decisions``: each policy's own host work per layer (the controller's ``begin_layer`` and the policy's
  ``prefetch_layer``, host clock), the policy run on a *training* trace, never the trace validated; and
  its all-resident step time beside LRU's (``resident_step_ms``): what the policy adds to every layer
  whatever the cache holds.

Each timed part also records the host's speed just before and after it (``host_cal_ms``: the fixed
calibration loop every engine run records, ``real.measurement.calibration_ms``): a host that switches speed
gives constants of the state it was in, and the validation reads each run against the calibration of its own
host state (``validation.report``).

The numbers become profile constants in ``validation.profile_fit``; nothing here is fitted.
Units: ms for times unless a name says us.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from offload.policy import Policy
from offload.predictors import policy_depth
from offload.session import RunSettings
from policies.lru import LRU
from policies.registry import RUN_FAILURES, resolve_policy
from real.engine import OffloadEngine
from real.measurement import Config, calibration_ms, print_error
from real.profile_hw import measure_compute
from traces import ModelShape, Trace
from traces.synthetic import PATTERNS, pattern_trace

@dataclass
class PatternRun:
    slots: int
    step_ms: list[float]                # each step's wall time, nothing recorded: what the profile is fitted on
    layer_timings: dict[str, list]      # name -> [T][L] or [T][L][K] (real.engine.Routing.layer_timings)
    marked_step_ms: list[float]         # the step times of the run that recorded ``layer_timings``
    copy_ms: list[float]                # each demand copy's own time on the copy stream (0 on a CPU)
    hit_rate: float
    # per layer with a demand copy, in order, from the run that records nothing: the routing read-back to the
    # first demand copy's issue, host clock (``OffloadEngine.miss_issue_ns``); the fit's ``miss_latency_us``
    miss_issue_us: list[float] = field(default_factory=list)
    # per layer without a demand copy, in order, from the same run: the routing read-back to the start of the
    # prefetch decision, host clock (``OffloadEngine.decide_ns``); the fit's ``prefetch_latency_us``
    decide_us: list[float] = field(default_factory=list)
    # the host calibration loop just before and just after the run that records nothing (ms)
    host_cal_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"slots": self.slots, "step_ms": self.step_ms, "layer_timings": self.layer_timings,
                "marked_step_ms": self.marked_step_ms, "copy_ms": self.copy_ms, "hit_rate": self.hit_rate,
                "miss_issue_us": self.miss_issue_us, "decide_us": self.decide_us, "host_cal_ms": self.host_cal_ms}


def run_pattern(model, shape: ModelShape, pattern: str, steps: int, hardware=None) -> PatternRun:
    """The engine (LRU, top-k slots per layer) replaying ``pattern_trace``: once untimed (warming the engine's
    kernels and the allocator), once timed step by step with nothing recorded, as every validated run is
    (the profile's constants come from these step times), and once more with layer timings recorded, for the
    per-layer comparison of both clocks (``validation.timelines``): the events that run records sit between
    the routing read-back and the expert launches, on the critical path, so its step times are not the
    engine's and are kept apart."""
    trace = pattern_trace(shape, steps, pattern)
    settings = RunSettings(cache_slots=shape.top_k)
    OffloadEngine(model, shape, LRU, settings, hardware=hardware).replay(trace, max(steps // 4, 2))
    engine = OffloadEngine(model, shape, LRU, settings, hardware=hardware, record_host_stamps=True)
    before = calibration_ms()
    result = engine.replay(trace)
    after = calibration_ms()
    marked = OffloadEngine(model, shape, LRU, settings, hardware=hardware, record_layer_timings=True).replay(trace)
    timings = {name: np.stack(values).tolist() for name, values in marked.routing.layer_timings.items() if values}
    return PatternRun(shape.top_k, list(result.routing.step_ms), timings, list(marked.routing.step_ms),
                      [c.duration_ms for c in result.copies if c.demand], float(result.metrics["hit_rate"]),
                      [ns / 1e3 for ns in engine.miss_issue_ns], [ns / 1e3 for ns in engine.decide_ns],
                      [before, after])


def decision_costs(model, shape: ModelShape, policy_cls: type[Policy], settings: RunSettings, trace: Trace,
                   hardware=None, predictors=None, max_tokens: int | None = None) -> dict:
    """The host time per layer (us, mean over the run) of the controller's ``begin_layer`` and of
    ``prefetch_layer`` (the policy's prefetch decision, a live predictor's read-back included) for
    ``policy_cls`` replaying ``trace`` (a training slice: never the trace being validated), and the run's
    own per-layer step time. Timed by wrapping the two controller calls of one engine."""
    engine = OffloadEngine(model, shape, policy_cls, settings, hardware=hardware, future=trace, train_trace=trace,
                           predictors=predictors)
    spent = {"begin_layer": 0, "prefetch_layer": 0}
    calls = {"begin_layer": 0, "prefetch_layer": 0}
    ctrl = engine.ctrl
    for name in spent:
        method = getattr(ctrl, name)

        def timed(*args, _method=method, _name=name):
            start = time.perf_counter_ns()
            try:
                return _method(*args)
            finally:
                spent[_name] += time.perf_counter_ns() - start
                calls[_name] += 1
        setattr(ctrl, name, timed)
    before = calibration_ms()
    result = engine.replay(trace, max_tokens)
    after = calibration_ms()
    layers = max(calls["begin_layer"], 1)
    return {"begin_layer_us": spent["begin_layer"] / 1e3 / layers,
            "prefetch_layer_us": spent["prefetch_layer"] / 1e3 / max(calls["prefetch_layer"], 1),
            "layer_ms": float(np.sum(result.routing.step_ms)) / layers, "hit_rate": float(result.metrics["hit_rate"]),
            "cache_slots": settings.cache_slots, "steps": len(result.routing.step_ms), "host_cal_ms": [before, after]}


def resident_step_ms(model, shape: ModelShape, engines: dict, decode, passes: int = 3) -> dict[str, float]:
    """The median step time (ms) of each engine that ``engines`` builds (name -> a function returning an
    ``OffloadEngine`` with every expert's slot, ``cache_slots`` = experts per layer), decoding with
    ``decode(engine)`` (the same input each time). Each engine decodes twice: the first, untimed, makes every
    expert it routes resident (nothing is evicted at that size), so the timed second copies nothing. Passes go
    round-robin over the engines, one engine alive at a time (a production shape's slots fill the GPU). What
    differs between them is the policy's own per-layer work: a live predictor's kernels in the layer graph,
    and whatever of its host decision the layer's experts do not hide."""
    steps: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(passes):
        for name, build in engines.items():
            engine = build()
            decode(engine)
            before = len(engine.routing.step_ms)
            decode(engine)
            steps[name].extend(engine.routing.step_ms[before:])
            del engine
    return {name: float(np.median(s)) for name, s in steps.items()}


def resident_live(model, shape: ModelShape, prompts: list[list[int]], new_tokens: int) -> dict:
    """A live decode (the model routes itself) with every expert resident: ``prompts`` (training text, never
    the validated requests) generated greedily after an untimed pass. Its steps' wall times and positions
    (context length) give a live run's per-layer overhead: a forced-routing pattern run combines its experts
    eagerly, a live one in the captured graph."""
    from policies.static import Static
    settings = RunSettings(cache_slots=shape.num_experts)
    OffloadEngine(model, shape, Static, settings, train_trace=_any_trace(shape)).generate(
        prompts[:1], max(new_tokens // 4, 2))
    engine = OffloadEngine(model, shape, Static, settings, train_trace=_any_trace(shape))
    before = calibration_ms()
    result = engine.generate(prompts, new_tokens)
    after = calibration_ms()
    starts = result.routing.request_starts
    positions = np.concatenate([np.arange(b - a) for a, b in zip(starts[:-1], starts[1:])])
    return {"slots": shape.num_experts, "step_ms": list(result.routing.step_ms), "positions": positions.tolist(),
            "host_cal_ms": [before, after]}


def _any_trace(shape: ModelShape) -> Trace:
    """Static needs a training slice to rank experts; with every expert resident, any ranking places them all."""
    return pattern_trace(shape, 1, "hits")


def calibrate_model(model, shape: ModelShape, steps: int = 48, hardware=None,
                    live_prompts: list[list[int]] | None = None, new_tokens: int = 0) -> dict:
    """``compute`` and ``patterns`` of the module docstring for ``model`` (a ``real.model.MoEModel`` with its
    experts on the host) of shape ``shape``; with ``live_prompts``, also ``resident_live`` (a live model's
    own per-layer overhead, ``resident_live``)."""
    engine = OffloadEngine(model, shape, LRU, RunSettings(cache_slots=shape.top_k), hardware=hardware)
    with torch.no_grad():
        compute = measure_compute(model, contexts=[c for c in (0, 128, 512, 1024) if c < model.max_len],
                                  engine=engine)
    del engine
    patterns = {p: run_pattern(model, shape, p, steps, hardware).to_dict() for p in PATTERNS}
    if live_prompts:
        patterns["resident-live"] = resident_live(model, shape, live_prompts, new_tokens)
    return {"compute": compute, "patterns": patterns}


def calibrate_policies(model, shape: ModelShape, policies: Iterable[str], settings: Callable[[int, str], RunSettings],
                       slots: int, train: Trace, prefetch_depth: int, predictors_at=None,
                       train_prompts: list[list[int]] | None = None, new_tokens: int = 0,
                       on_error: Callable[[Config, BaseException], str] | None = None) -> tuple[dict, dict]:
    """(``decisions``, ``failed``) of the module docstring for ``policies`` (LRU, the baseline, first):
    per policy ``decision_costs`` at ``slots`` on the training slice ``train`` (at most 64 of its tokens) and
    ``resident_step_ms``, its all-resident decode beside LRU's (``train_prompts`` generated ``new_tokens``
    each for a live model, else ``train`` replayed). ``settings(slots, policy)``: the policy's runs' settings; ``predictors_at
    (depth)``: the live predictors at a depth (None: none). A policy whose calibration raises is left out
    with its error in ``failed``, so that the others are still calibrated: ``on_error(config, err)`` says
    what its error is, one line, as ``Measurement``'s does (``config``: ``step`` calibration and the
    ``policy``; default: the traceback printed, then the exception's type and message)."""
    def one_line(policy: str, err: BaseException) -> str:
        return (on_error or print_error)(Config({"step": "calibration", "policy": policy}), err)

    decisions, resident, failed = {}, {}, {}
    tokens = min(train.num_tokens, 64)
    sample = train if train_prompts is not None else train.first_tokens(tokens)
    twice = sample.repeat(2)         # each all-resident engine decodes its input twice
    for policy in dict.fromkeys(["lru", *policies]):
        cls = resolve_policy(policy)
        predictors = predictors_at(policy_depth(cls, prefetch_depth)) if predictors_at else None
        try:
            decisions[policy] = decision_costs(model, shape, cls, settings(slots, policy), train, predictors=predictors,
                                               max_tokens=tokens)
        except RUN_FAILURES as err:     # one policy's failure must not stop the others' calibration
            failed[policy] = one_line(policy, err)
            print(f"calibration of {policy} failed ({failed[policy]}); its runs will say why", flush=True)
            continue
        resident[policy] = (lambda cls=cls, predictors=predictors, policy=policy: OffloadEngine(
            model, shape, cls, settings(shape.num_experts, policy), future=twice, train_trace=train, predictors=predictors))
    if train_prompts is not None:      # a live model decodes its training text; a replay, its trace
        decode = lambda engine: engine.generate(train_prompts, new_tokens)   # noqa: E731
    else:
        decode = lambda engine: engine.replay(sample)                        # noqa: E731
    try:
        for policy, ms in resident_step_ms(model, shape, resident, decode).items():
            decisions[policy]["resident_step_ms"] = ms
    except RUN_FAILURES as err:
        failed["resident"] = one_line("lru", err)
        print(f"calibration of the all-resident steps failed ({failed['resident']})", flush=True)
    return decisions, failed
