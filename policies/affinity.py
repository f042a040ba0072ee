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
        onehot = np.zeros((T, L, E), dtype=np.float64)
        np.put_along_axis(onehot, experts.astype(np.int64), 1.0, axis=2)
        popularity = onehot.sum(axis=0) / max(T, 1)             # [L, E]: P(expert chosen at layer)
        # cond[d-1, l, i, j] = P(j at l+d | i at l); an expert never seen at l falls back to the
        # target layer's popularity.
        self.cond = np.zeros((depth, L, E, E), dtype=np.float64)
        for d in range(1, depth + 1):
            for layer in range(L - d):
                joint = onehot[:, layer].T @ onehot[:, layer + d]
                seen = onehot[:, layer].sum(axis=0)
                self.cond[d - 1, layer] = np.where(seen[:, None] > 0, joint / np.maximum(seen[:, None], 1),
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


class AffinityPrefetch(LRU):
    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        train = ctx.require_train_trace("affinity")
        self.predictor = AffinityPredictor(train.experts, ctx.num_experts, ctx.prefetch_depth)

    def prefetch(self, access: LayerAccess) -> list[PrefetchRequest]:
        L, E, K = self.ctx.num_layers, self.ctx.num_experts, self.ctx.top_k
        requests = []
        for d in range(1, self.ctx.prefetch_depth + 1):
            target = access.layer + d
            if target >= L:
                break   # the next token's first layers depend on attention we have not run
            base = target * E
            predicted = self.predictor.predict(access.layer, access.experts, d, K)
            requests.extend(PrefetchRequest(base + e, access.step + d) for e in predicted)
        return requests
