"""Speculative expert scheduling: what the predictive policies share (Ou et al. 2025's scheduling).

After each layer the policy asks its predictor for the experts of layers l+1..l+D and queues their
copies so that they arrive in the order they will be needed:

- *order*: one request per predicted expert, by distance (need step l+d) and within a distance by
  score; the controller's queue serves demand fetches first, then by need step.
- *cancellation*: the list replaces the queued prefetches, so a newer prediction that drops an
  expert cancels its queued copy (``OffloadController._apply_prefetch``).
- *depth limit*: a copy requested now for layer l+d is useful only if it lands before l+d's experts
  run, about d layers of compute from now. In that time the link delivers d * layer_compute_ns /
  expert_copy_ns copies, so at most floor(d * layer_compute_ns / expert_copy_ns) + top_k copies are
  requested for distances 1..d together. The + top_k keeps the next layer's predicted experts even on
  a slow link: a late prefetch still starts earlier than the demand fetch it replaces. Experts that
  already hold a slot cost no copy and do not count. Without the clock's estimates (None) there is
  no limit.
- *protection*: the eviction victim is the least recently used evictable expert that the latest
  prediction does not name. When every candidate is predicted, the one predicted for the latest step
  goes, but for a prefetch only if that step is later than the prefetch's own (else it is refused).

Predictions never cross into the next token: its layers depend on attention not yet run.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from offload.policy import LayerAccess, PolicyContext, PrefetchRequest
from offload.cache import CacheView
from offload.predictors import TrackPredictor
from policies.lru import LRU

# PrefetchRequest(key, step) without the Python frame of a named tuple's __new__ (a request is built for
# every expert a decision asks for): _request(PrefetchRequest, (key, step)).
_request = tuple.__new__


class SpeculativePrefetch(LRU):
    """LRU eviction plus predicted prefetch with speculative scheduling. Subclasses name the track
    they read in the simulator and may switch the scheduling features off."""

    track: ClassVar[str | None] = None        # the prediction track the simulator reads
    max_depth: ClassVar[int | None] = None    # look no further than this, whatever prefetch_depth says
    protect: ClassVar[bool] = True            # keep predicted-soon experts from eviction
    limit_depth: ClassVar[bool] = True        # request no more than the link can deliver in time
    parameters = {"min_score": "fetch every predicted expert scoring at least this, instead of the top-k"}
    _BLOCK = 16     # tokens whose top-k are sorted at once from a recorded track (as affinity's blocks)

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        if ctx.predictor is None:
            raise ValueError(f"policy {type(self).__name__} needs a predictor: in the simulator a trace "
                             f"with the prediction track {self.track!r} (or policy.predictor=<track>), "
                             f"in the engine a live predictor")
        self.predictor = ctx.predictor
        depth = min(ctx.prefetch_depth, self.predictor.depth)
        self.depth = depth if self.max_depth is None else min(depth, self.max_depth)
        min_score = ctx.params.get("min_score")
        self.min_score = None if min_score is None else float(min_score)
        self.budget = self.copy_budget(ctx, self.depth) if self.limit_depth else None
        self._predicted: dict[int, int] = {}   # key -> need step, from the latest prediction
        self._step = -1                         # the step being routed now
        self.latest_scores: tuple[int, np.ndarray] | None = None   # (step, [D, E]) of the latest prediction
        self._L, self._E = ctx.num_layers, ctx.num_experts
        # Replaying a recorded track (the simulator), every decision's scores are known in advance: the top-k
        # of a block of tokens come from one sort ([tokens, layers, depth, E]; slice by slice the same order
        # as ``_chosen``'s), instead of a sort per decision. A live predictor and min_score decide one by one.
        self._track = (self.predictor.track if isinstance(self.predictor, TrackPredictor) and self.min_score is None
                       else None)
        self._first = self._stop = 0
        self._block: list[list[list[list[int]]]] = []    # [token - _first][layer][distance - 1] -> the top-k

    @staticmethod
    def copy_budget(ctx: PolicyContext, depth: int) -> list[int] | None:
        """Copies allowed for distances 1..d together, for d = 1..depth; None without estimates."""
        if ctx.expert_copy_ns is None or ctx.layer_compute_ns is None:
            return None
        return [d * ctx.layer_compute_ns // ctx.expert_copy_ns + ctx.top_k for d in range(1, depth + 1)]

    def _chosen(self, rows: np.ndarray) -> list[list[int]]:
        """For each row of scores (a target layer), the experts to fetch, best first: the top-k, or
        those >= min_score. One stable sort of all rows: row by row it orders as a sort of each."""
        order = np.argsort(-rows, axis=1, kind="stable")
        if self.min_score is None:
            return order[:, : self.ctx.top_k].tolist()
        return [o[r[o] >= self.min_score].tolist() for o, r in zip(order, rows)]

    def _chosen_replayed(self, token: int, layer: int, depth: int) -> list[list[int]]:
        """``_chosen`` of the track's rows for ``layer``'s next ``depth`` layers, from the block of ``token``."""
        if not self._first <= token < self._stop:
            self._first, self._stop = token, min(token + self._BLOCK, len(self._track))
            rows = self._track[self._first:self._stop, :, :self.depth]
            self._block = np.argsort(-rows, axis=-1, kind="stable")[..., : self.ctx.top_k].tolist()
        return self._block[token - self._first][layer][:depth]

    def prefetch(self, access: LayerAccess) -> list[PrefetchRequest]:
        L, E = self._L, self._E
        rows = self.predictor.scores(access)
        self.latest_scores = (access.step, rows)
        budget, holds = self.budget, self.cache.holds
        predicted: dict[int, int] = {}
        requests: list[PrefetchRequest] = []
        depth = min(self.depth, L - 1 - access.layer)
        if depth <= 0:
            chosen = []
        elif self._track is not None:
            chosen = self._chosen_replayed(access.token, access.layer, depth)
        else:
            chosen = self._chosen(rows[:depth])
        for d in range(1, depth + 1):
            need = access.step + d
            base = (access.layer + d) * E
            cap = None if budget is None else budget[d - 1]
            for e in chosen[d - 1]:
                key = base + e
                predicted[key] = need
                if holds(key):                  # resident or in flight: costs no copy
                    continue
                if cap is not None and len(requests) >= cap:
                    continue
                requests.append(_request(PrefetchRequest, (key, need)))
        if self.protect:
            self._predicted = predicted
        return requests

    def on_access(self, access: LayerAccess, index: int, key: int, hit: bool) -> None:
        self._step = access.step
        super().on_access(access, index, key, hit)

    def choose_victim(self, scope: int, cache: CacheView, job) -> int | None:
        predicted = self._predicted
        if not predicted:
            return super().choose_victim(scope, cache, job)
        latest, latest_need = None, -1
        for key in self.recency_order(scope, cache):
            need = predicted.get(key)
            if need is None or need <= self._step:    # not predicted, or its layer has already routed
                return key
            if need > latest_need:
                latest, latest_need = key, need
        if latest is not None and (job.demand or latest_need > job.need_step):
            return latest
        return None
