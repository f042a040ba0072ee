"""Replay without a clock: the same session and layer turn, every copy finishing the instant it starts.

Hit counts of on-demand policies do not depend on timing (a layer's demand fetches all finish
before the next layer routes), so this gives them cheaply; ``belady_hit_fraction`` divides a
policy's hits by Belady's from here.
"""
from __future__ import annotations

from offload.controller import OffloadStats
from offload.layer_turn import drive, layer_turn
from offload.policy import Policy
from offload.predictors import predictor_for
from offload.session import RunSettings, open_session
from traces import Trace


class _Instant:
    """The clock of the untimed replay: time stands at 0 and a copy completes when it starts."""

    def __init__(self, trace: Trace, ctrl):
        self.trace = trace
        self.ctrl = ctrl
        self._routes: list[list[int]] = []
        self._weights: list[list[float]] = []

    def now_ns(self) -> int:
        return 0

    def next_token(self, t: int) -> None:
        self._routes = self.trace.experts[t].tolist()
        self._weights = self.trace.weights[t].tolist()

    def route(self, token, layer):
        return ()

    def chosen(self, token, layer):
        return self._routes[layer], self._weights[layer], None

    def reweigh(self, layer, run, weights):
        return weights

    def start_copies(self):
        ctrl = self.ctrl
        while (job := ctrl.next_copy(0)) is not None:
            ctrl.copy_done(job, 0)
        return ()

    def launch_experts(self, token, layer, run, needs):
        return ()

    def decide(self, token, layer):
        return ()

    def decided_ns(self) -> int:
        return self.now_ns()

    def finish_experts(self, token, layer, needs):
        return ()


def replay_untimed(trace: Trace, policy_cls: type[Policy], settings: RunSettings,
                   train_trace: Trace | None = None, path: str = "auto") -> OffloadStats:
    """The controller's counts for ``policy_cls`` on ``trace`` with instant copies. No hardware, so
    predictive policies run without a depth limit. ``path``: as in ``sim.simulator.simulate``
    (``auto`` takes a compiled kernel where the policy has one; ``reference`` forces this walk)."""
    if path != "reference":
        from sim.fast_path import fast_replay_untimed
        stats = fast_replay_untimed(trace, policy_cls, settings, train_trace)
        if stats is not None:
            return stats
    predictor = predictor_for(policy_cls, settings.policy_params, settings.prefetch_depth, trace=trace)
    session = open_session(trace.model, policy_cls, settings, expert_bytes=1, trace=trace,
                           train_trace=train_trace, predictor=predictor)
    ctrl = session.ctrl
    clock = _Instant(trace, ctrl)
    for t in range(trace.num_tokens):
        clock.next_token(t)
        for layer in range(trace.num_layers):
            drive(layer_turn(ctrl, clock, t, layer))
    return ctrl.stats
