"""The exact fast path for on-demand policies: a compiled hit/miss kernel (``sim.kernels``) and the
simulator's timing in closed form (``sim.closed_form``).

It applies to the built-in LRU, LFU, FIFO, static and Belady classes themselves, run without policy
parameters: they fetch only on demand and are lossless, so no decision depends on time. Everything
else (prefetching, lossy and user policies, subclasses of the built-ins, which may override any
hook) gets None here and takes the SimPy reference, ``sim.simulator.simulate``; so does a run that
wants an event timeline. ``tests/test_fast_path.py`` demands identical results from both paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hardware.profile import HardwareProfile
from offload.cache import CacheMode, ExpertCache
from offload.controller import OffloadStats
from offload.metrics import run_metrics
from offload.policy import Policy, PolicyContext
from offload.session import RunSettings
from policies.registry import resolve_policy
from sim import closed_form, kernels
from traces import Trace

# Identity, not subclassing: a subclass may override any hook the kernel hard-codes.
_KERNEL_OF: dict[type[Policy], int] = {resolve_policy(name): code for name, code in kernels.KERNELS.items()}


@dataclass(frozen=True)
class FastRun:
    """What ``sim.simulator.simulate`` reports, from the fast path: ``metrics`` with the same keys and
    values as ``SimResult.metrics`` (``offload.metrics.run_metrics``), the controller's ``stats``
    (accesses, hits, misses, copies, demand copies, evictions, bytes; the prefetch and lossy counts
    are 0) and each token's time in integer ns. No wall time: the caller times the call."""
    metrics: dict[str, float | int]
    stats: OffloadStats
    token_ns: list[int]
    layer_steps: int


def kernel_for(policy: str | type[Policy], policy_params=None) -> int | None:
    """The kernel code (``sim.kernels``) that replays ``policy`` exactly, or None when only the
    reference can."""
    if policy_params:
        return None
    return _KERNEL_OF.get(resolve_policy(policy) if isinstance(policy, str) else policy)


def fast_simulate(trace: Trace, policy: str | type[Policy], hardware: HardwareProfile,
                  settings: RunSettings, train_trace: Trace | None = None) -> FastRun | None:
    """``sim.simulator.simulate`` without a timeline, for the policies that have a kernel; None for
    the others (run the reference). Raises the reference's errors for an impossible cache size or a
    static run without a training slice."""
    kernel = kernel_for(policy, settings.policy_params)
    if kernel is None:
        return None
    shape = trace.model
    expert_bytes = shape.expert_bytes(settings.precision)
    stats, misses = _replay(trace, kernel, settings, train_trace, expert_bytes)
    copy_ns = hardware.copy.copy_ns(expert_bytes)
    cost = hardware.compute_cost(shape, settings.precision)
    policy_cls = resolve_policy(policy) if isinstance(policy, str) else policy
    token_ns, stall_ns = closed_form.token_times(
        misses, shape.top_k, trace.request_starts, settings.prompt_tokens, cost, copy_ns, hardware.copy_engines,
        cost.decision_ns(policy_cls), settings.copies_in_flight, cost.layer_extra_ns(policy_cls))
    token_ns = token_ns.tolist()
    metrics = run_metrics(token_ns, stats, link_busy_ns=stats.copies * copy_ns,
                          copy_engines=hardware.copy_engines, stall_ns=stall_ns)
    return FastRun(metrics, stats, token_ns, trace.num_tokens * trace.num_layers)


def fast_replay_untimed(trace: Trace, policy: str | type[Policy], settings: RunSettings,
                        train_trace: Trace | None = None) -> OffloadStats | None:
    """``sim.replay.replay_untimed`` (which counts one byte per copy) for the policies that have a
    kernel; None for the others."""
    kernel = kernel_for(policy, settings.policy_params)
    if kernel is None:
        return None
    return _replay(trace, kernel, settings, train_trace, 1)[0]


def _replay(trace: Trace, kernel: int, settings: RunSettings, train_trace: Trace | None,
            expert_bytes: int) -> tuple[OffloadStats, np.ndarray]:
    shape = trace.model
    slots, mode = settings.cache_slots, settings.cache_mode
    # The reference's own checks of the cache size, with its messages.
    ExpertCache(shape.num_layers, shape.num_experts, slots, mode, shape.top_k)
    preload: list[tuple[int, bool]] = []
    if kernel == kernels.STATIC:
        # The pins come from the policy itself: one definition of what static places.
        ctx = PolicyContext(shape, slots, mode, trace=trace, train_trace=train_trace)
        preload = resolve_policy("static")(ctx).preload()
    next_use = kernels.next_use_table(trace.experts, shape.num_experts) if kernel == kernels.BELADY else None
    misses, hits, evictions = kernels.replay(
        trace.experts, shape.num_experts, slots, mode is CacheMode.GLOBAL, kernel,
        np.array([k for k, _ in preload], dtype=np.int64), np.array([p for _, p in preload], dtype=np.bool_),
        next_use)
    accesses = trace.experts.size
    n_miss = accesses - hits
    return OffloadStats(accesses=accesses, hits=hits, misses=n_miss, copies=n_miss, demand_copies=n_miss,
                        evictions=evictions, bytes_moved=n_miss * expert_bytes), misses
