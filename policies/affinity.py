"""Inter-layer affinity: experts chosen at layer l predict those of layer l+d.

A trace-only predictor for traces without hidden states. From a training slice it learns, for each
pair of layers (l, l+d), the conditional probability P(expert j at l+d | expert i at l) within one
token. A prediction combines the chosen experts' rows by noisy-OR, 1 - prod_i (1 - P(j | i)): an
expert that always follows one of the chosen experts scores 1 whatever the others say, where a plain
sum of counts would let a popular partner outvote it. Ties fall to the target layer's popularity.
The policy prefetches the predicted top-k of the next ``prefetch_depth`` layers with LRU eviction.
"""
from __future__ import annotations

import numpy as np

from offload.policy import LayerAccess, PolicyContext, PrefetchRequest
from policies.lru import LRU


class AffinityPredictor:
    def __init__(self, experts: np.ndarray, num_experts: int, depth: int):
        T, L, K = experts.shape
        E = num_experts
        self.depth = depth
        ids = experts.astype(np.int64)
        # Counts, not one-hot matrices: a token's ids are distinct within a layer, so counting them is the
        # same arithmetic on the same integers in a few bytes per access instead of 8 per expert.
        seen = np.stack([np.bincount(ids[:, layer].ravel(), minlength=E)[:E] for layer in range(L)])   # [L, E]
        popularity = seen / max(T, 1)                            # [L, E]: P(expert chosen at layer)
        # cond[d-1, l, i, j] = P(j at l+d | i at l); an expert never seen at l falls back to the
        # target layer's popularity.
        self.cond = np.zeros((depth, L, E, E), dtype=np.float64)
        for d in range(1, depth + 1):
            for layer in range(L - d):
                pairs = ids[:, layer, :, None] * E + ids[:, layer + d, None, :]     # [T, K, K]
                joint = np.bincount(pairs.ravel(), minlength=E * E).reshape(E, E)
                self.cond[d - 1, layer] = np.where(seen[layer][:, None] > 0,
                                                   joint / np.maximum(seen[layer][:, None], 1),
                                                   popularity[layer + d][None, :])
        self._tiebreak = 1e-6 * popularity

    def scores(self, layer: int, experts: list[int], distance: int) -> np.ndarray:
        """Scores over the experts of layer ``layer + distance``."""
        rows = self.cond[distance - 1, layer, experts]
        return 1.0 - np.prod(1.0 - rows, axis=0) + self._tiebreak[layer + distance]

    def predict(self, layer: int, experts: list[int], distance: int, k: int) -> list[int]:
        s = self.scores(layer, experts, distance)
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top], kind="stable")].tolist()

    def predict_token(self, experts: np.ndarray, k: int) -> list[list[list[int]]]:
        """``predict`` for every layer of one token at once: [distance - 1][layer] -> the top-k, for the
        layers that have a layer ``distance`` later. ``experts``: the token's routing, [L, K]. The same
        arithmetic row by row (the product runs over the K chosen experts in their order)."""
        L = experts.shape[0]
        out = []
        for d in range(1, min(self.depth, L - 1) + 1):
            layers = L - d
            rows = self.cond[d - 1, np.arange(layers)[:, None], experts[:layers]]        # [layers, K, E]
            s = 1.0 - np.prod(1.0 - rows, axis=1) + self._tiebreak[d:]
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
            out.append(np.take_along_axis(top, order, axis=1).tolist())
        return out


class AffinityPrefetch(LRU):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        train = ctx.require_train_trace("affinity")
        self.predictor = AffinityPredictor(train.experts, ctx.num_experts, ctx.prefetch_depth)
        # Replaying a trace, each token's predictions are made for all its layers at once (one numpy pass
        # instead of one per layer); a run that leaves the trace's routing is predicted layer by layer.
        self._token = -1
        self._routes: list[list[int]] = []
        self._predicted: list[list[list[int]]] = []

    def prefetch(self, access: LayerAccess) -> list[PrefetchRequest]:
        L, E, K = self.ctx.num_layers, self.ctx.num_experts, self.ctx.top_k
        trace = self.ctx.trace
        if access.token != self._token and trace is not None and access.token < trace.num_tokens:
            self._token = access.token
            routing = trace.experts[access.token]
            self._routes = routing.tolist()
            self._predicted = self.predictor.predict_token(routing.astype(np.int64), K)
        replayed = access.token == self._token and access.experts == self._routes[access.layer]
        requests = []
        for d in range(1, self.ctx.prefetch_depth + 1):
            target = access.layer + d
            if target >= L:
                break   # the next token's first layers depend on attention we have not run
            base = target * E
            predicted = (self._predicted[d - 1][access.layer] if replayed
                         else self.predictor.predict(access.layer, access.experts, d, K))
            requests.extend(PrefetchRequest(base + e, access.step + d) for e in predicted)
        return requests
