"""The policy interface: pure decisions, no clock, no SimPy, no CUDA.

Shaped after libCacheSim's eviction interface (find / insert / choose-victim / evict) with prefetch
and preload as separate hooks. The controller (``offload.controller``) calls these hooks in the same
order under both clocks; a policy never touches slots itself, it only answers questions.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from offload.access import LayerAccess, PrefetchRequest
from offload.cache import CacheMode, CacheView
from offload.next_use import NextUse
from offload.predictors import Predictor, TrackPredictor

if TYPE_CHECKING:
    from offload.copy_queue import CopyJob
    from traces import ModelShape, Trace


def read_only(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` that refuses writes (numpy's ``ValueError: ... read-only``); ``array`` itself
    stays writable for its owner, and nothing is copied."""
    view = array.view()
    view.flags.writeable = False
    return view


def read_only_trace(trace: "Trace") -> "Trace":
    """``trace`` as a policy sees it: every array a read-only view (those in its dicts of tracks too), the
    dicts and the meta's free-form ``extra`` its own. One trace serves every configuration a process runs
    (the sweep's, the engine commands'), so a policy that wrote to it would change the others' results."""
    def guarded(value):
        if isinstance(value, np.ndarray):
            return read_only(value)
        if isinstance(value, dict):
            return {k: guarded(v) for k, v in value.items()}
        return value
    changes = {f.name: guarded(getattr(trace, f.name)) for f in dataclasses.fields(trace)}
    changes["meta"] = dataclasses.replace(trace.meta, extra=copy.deepcopy(trace.meta.extra))
    return dataclasses.replace(trace, **changes)


@dataclass(frozen=True)
class PolicyContext:
    """Everything a policy may consult, fixed for one run. The traces it holds, and a recorded prediction
    track its predictor reads, are read-only for the policy (``read_only_trace``): a policy that needs to
    change one copies it first (``np.array(ctx.trace.experts)``)."""
    shape: "ModelShape"
    cache_slots: int
    cache_mode: CacheMode
    prefetch_depth: int = 1
    trace: "Trace | None" = None        # the decode being run: future knowledge for bounds, prediction tracks
    train_trace: "Trace | None" = None  # a separate slice to learn from (static pins, affinity counts)
    params: Mapping[str, Any] = field(default_factory=dict)
    # Predictive policies: the predictor they consult (the engine passes a live one; the simulator
    # reads the prediction track the policy class names), and the clock's estimates of one expert
    # copy's link time and one layer's compute, for limiting prefetch depth. None: not available.
    predictor: "Predictor | None" = None
    expert_copy_ns: int | None = None
    layer_compute_ns: int | None = None

    def __post_init__(self) -> None:
        for name in ("trace", "train_trace"):
            trace = getattr(self, name)
            if trace is not None:
                object.__setattr__(self, name, read_only_trace(trace))
        if isinstance(self.predictor, TrackPredictor):
            predictor = copy.copy(self.predictor)
            predictor.track = read_only(predictor.track)
            object.__setattr__(self, "predictor", predictor)

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    @property
    def num_experts(self) -> int:
        return self.shape.num_experts

    @property
    def top_k(self) -> int:
        return self.shape.top_k

    @cached_property
    def oracle(self) -> NextUse:
        if self.trace is None:
            raise ValueError("this policy needs the future of the run (a trace); the live engine "
                             "must record the run first and replay it")
        return NextUse(self.trace.experts, self.shape.num_experts)

    def require_train_trace(self, policy_name: str) -> "Trace":
        if self.train_trace is None or self.train_trace.num_tokens == 0:
            raise ValueError(f"policy {policy_name!r} learns from a training slice but none was given; "
                             f"set train_fraction to a value in (0, 1)")
        return self.train_trace


class Policy:
    """Base class: on-demand fetching, no preload, no prefetch. Subclasses choose victims.

    ``self.cache`` is a read-only view of the run's cache (``offload.cache.CacheView``), set by the
    controller before the first hook runs: every hook may ask what is resident, in flight or
    evictable there, so a policy keeps no residency bookkeeping of its own.
    """

    lossless: ClassVar[bool] = True
    # The ``ctx.params`` this policy reads: name -> one-line meaning. ``check_params`` refuses any
    # other name before a run starts, so a misspelt ``policy.NAME`` cannot be ignored silently.
    parameters: ClassVar[Mapping[str, str]] = {}
    cache: CacheView | None = None

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx

    def preload(self) -> list[tuple[int, bool]]:
        """Experts placed before decoding starts, as (key, pinned). Untimed, like model loading."""
        return []

    def on_access(self, access: LayerAccess, index: int, key: int, hit: bool) -> None:
        """``access.experts[index]`` (``key``) is needed now; ``hit`` says whether it was resident."""

    def on_insert(self, key: int) -> None:
        """A copy of ``key`` into a slot starts (or ``key`` was preloaded)."""

    def on_evict(self, key: int) -> None:
        """``key`` lost its slot."""

    def choose_victim(self, scope: int, cache: CacheView, job: "CopyJob") -> int | None:
        """An evictable key of ``scope`` to make room for ``job``, or None to refuse (a refused
        prefetch is dropped; a demand fetch may be refused only when nothing is evictable)."""
        raise NotImplementedError

    def execute(self, access: LayerAccess) -> list[int] | None:
        """Lossy policies only (``lossless = False``): the experts to *run* at this layer in place of
        the routed ``access.experts`` (same count), or None to run the routed ones. Asked before
        ``on_access``; what it returns is what the cache is asked for."""
        return None

    def prefetch(self, access: LayerAccess) -> list[PrefetchRequest] | None:
        """Copies to queue after this layer's routing, most urgent first. The list *replaces* the
        queued (not yet started) prefetches: those not in it are cancelled. None keeps them."""
        return None


def check_params(policy_cls: type[Policy], params: Mapping[str, Any]) -> None:
    """Raise ValueError naming the policy, the first unknown parameter and the declared ones.

    ``predictor`` is accepted for every policy that reads a prediction track (a ``track``
    attribute): ``offload.predictors.predictor_name`` reads it for any such class."""
    declared = dict(policy_cls.parameters)
    if getattr(policy_cls, "track", None) is not None:
        declared.setdefault("predictor", "the prediction track (simulator) or live predictor (engine) to use")
    unknown = sorted(set(params) - set(declared))
    if unknown:
        offer = ", ".join(sorted(declared)) or "none"
        raise ValueError(f"policy {policy_cls.__name__} has no parameter {unknown[0]!r} (it declares: {offer}); "
                         f"fix the name, or declare it in the class's `parameters`")
