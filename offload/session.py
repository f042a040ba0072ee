"""The one place where an offloaded run is assembled: settings, cache, policy context, controller.

The simulator, the untimed replay and the GPU engine each open a session from the same
``RunSettings`` and then only drive it; none builds a cache, a ``PolicyContext`` or a controller of
its own. What differs between the clocks enters here as arguments: the trace whose future the bounds
may read, the predictor (a trace's prediction track in the simulator, a live one in the engine), the
hardware profile whose estimates limit prefetch depth, and the bytes one expert copy moves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from offload.cache import CacheMode, ExpertCache
from offload.controller import OffloadController
from offload.policy import Policy, PolicyContext, check_params
from offload.predictors import Predictor

if TYPE_CHECKING:
    from hardware import HardwareProfile
    from traces import ModelShape, Trace

# Deepest prefetch a run may ask for, in layers. Past the model's last layer only the oracle looks
# further (it crosses token boundaries); a few tokens of lookahead already decide every copy that a
# cache of any size can hold, and each extra layer of depth costs the oracle a prefetch request per
# routed expert, so deeper settings only slow the simulator down.
MAX_PREFETCH_DEPTH = 256


MAX_COPIES_IN_FLIGHT = 64      # a stream holds this many copies at most before a demand fetch waits too long


class SettingsError(ValueError):
    """A run setting out of its range; the message names the setting, the value and the fix."""


@dataclass(frozen=True)
class RunSettings:
    """How one offloaded run is configured, the same for both clocks (the sweep's rows and the
    engine's commands build one of these).

    - ``cache_slots``: GPU expert slots per MoE layer (``global`` mode: that many times the number of
      layers, shared by all layers); at least the model's top-k.
    - ``cache_mode``: ``per_layer`` or ``global``.
    - ``precision``: expert format, which sets bytes per expert (``traces.ModelShape.expert_bytes``).
    - ``prefetch_depth``: layers ahead that prefetching policies look, 1..``MAX_PREFETCH_DEPTH``.
    - ``prompt_tokens``: context already in the KV cache when a request's decode starts.
    - ``policy_params``: parameters passed to the policy (``PolicyContext.params``).
    - ``copies_in_flight``: copies committed to the copy stream at once (the engine's ``real.copies``
      window, 1..``MAX_COPIES_IN_FLIGHT``): a committed copy can be neither cancelled nor overtaken by a
      later demand fetch, and the host commits copies only when it reaches its pump points. None: the
      simulator's ideal link, whose engines take the controller's next job the moment they free.
    """

    cache_slots: int
    cache_mode: CacheMode = CacheMode.PER_LAYER
    precision: str = "bf16"
    prefetch_depth: int = 1
    prompt_tokens: int = 0
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    copies_in_flight: int | None = 2

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "cache_mode", CacheMode(self.cache_mode))
        except ValueError:
            raise SettingsError(f"cache_mode={self.cache_mode!r} is not a cache mode; use one of "
                                f"{[m.value for m in CacheMode]}") from None
        checked = [("cache_slots", 1, None), ("prefetch_depth", 1, MAX_PREFETCH_DEPTH), ("prompt_tokens", 0, None)]
        if self.copies_in_flight is not None:
            checked.append(("copies_in_flight", 1, MAX_COPIES_IN_FLIGHT))
        for name, low, high in checked:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingsError(f"{name}={value!r} must be an integer")
            if value < low or (high is not None and value > high):
                bound = f">= {low}" if high is None else f"in {low}..{high}"
                raise SettingsError(f"{name}={value} is out of range; use a value {bound}")


@dataclass
class Session:
    """One assembled run: the cache, the policy (given a read-only view of the cache) and the
    controller between them, with the policy's preload already placed."""

    settings: RunSettings
    cache: ExpertCache
    policy: Policy
    ctrl: OffloadController


def open_session(shape: "ModelShape", policy_cls: type[Policy], settings: RunSettings, *,
                 expert_bytes: int, trace: "Trace | None" = None, train_trace: "Trace | None" = None,
                 predictor: Predictor | None = None,
                 hardware: "HardwareProfile | None" = None) -> Session:
    """Build the cache, context, policy and controller of one run, and place the preload.

    ``expert_bytes``: bytes one expert copy moves (counted in ``OffloadStats.bytes_moved``).
    ``trace``: the decode being run (its future for Belady and the oracle). ``train_trace``: a
    separate slice that ``static`` and ``affinity`` learn from. ``predictor``: what a predictive
    policy consults (``offload.predictors.predictor_for``). The policy sees the traces and a recorded
    prediction track read-only (``PolicyContext``): the caller's trace serves its next runs unchanged.
    ``hardware``: its estimates of one expert copy and one layer's compute limit prefetch depth; None
    means no limit (the untimed replay).
    Raises ``ValueError`` from the cache (slots out of range), the parameter check (a parameter the
    policy does not declare, ``offload.policy.check_params``) or the policy (missing trace, slice or
    predictor), naming the fix.
    """
    check_params(policy_cls, settings.policy_params)
    cache = ExpertCache(shape.num_layers, shape.num_experts, settings.cache_slots, settings.cache_mode,
                        shape.top_k)
    copy_ns, layer_ns = (None, None) if hardware is None else hardware.prefetch_estimates(
        shape, settings.precision)
    ctx = PolicyContext(shape, settings.cache_slots, settings.cache_mode, settings.prefetch_depth, trace,
                        train_trace, dict(settings.policy_params), predictor=predictor,
                        expert_copy_ns=copy_ns, layer_compute_ns=layer_ns)
    policy = policy_cls(ctx)
    ctrl = OffloadController(policy, cache, expert_bytes)
    ctrl.preload()
    return Session(settings, cache, policy, ctrl)
