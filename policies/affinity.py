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

# PrefetchRequest(key, step) without the Python frame of a named tuple's __new__ (a request is built for
# every expert a decision asks for): _request(PrefetchRequest, (key, step)).
_request = tuple.__new__


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
        self._miss = 1.0 - self.cond          # [d-1, l, i, j] = 1 - P(j at l+d | i at l): what noisy-OR multiplies
        self._tiebreak = 1e-6 * popularity

    def scores(self, layer: int, experts: list[int], distance: int) -> np.ndarray:
        """Scores over the experts of layer ``layer + distance``."""
        rows = self._miss[distance - 1, layer, experts]
        return 1.0 - np.prod(rows, axis=0) + self._tiebreak[layer + distance]

    def predict(self, layer: int, experts: list[int], distance: int, k: int) -> list[int]:
        s = self.scores(layer, experts, distance)
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top], kind="stable")].tolist()

    def predict_token(self, experts: np.ndarray, k: int) -> list[list[list[int]]]:
        """``predict`` for every layer of one token at once: [distance - 1][layer] -> the top-k, for the
        layers that have a layer ``distance`` later. ``experts``: the token's routing, [L, K]."""
        return [top[0].tolist() for top in self.predict_tokens(experts[None], k)]

    def predict_tokens(self, experts: np.ndarray, k: int) -> list[np.ndarray]:
        """``predict`` for every layer of several tokens at once: [distance - 1] -> [tokens, layer, k], the
        top-k for the layers that have a layer ``distance`` later. ``experts``: the tokens' routing,
        [tokens, L, K]. The same arithmetic row by row (the product runs over the K chosen experts in
        their order; each row is partitioned and sorted on its own)."""
        L = experts.shape[1]
        out = []
        for d in range(1, min(self.depth, L - 1) + 1):
            layers = L - d
            rows = self._miss[d - 1, np.arange(layers)[:, None], experts[:, :layers]]     # [tokens, layers, K, E]
            s = 1.0 - np.prod(rows, axis=2) + self._tiebreak[d:]
            top = np.argpartition(-s, k - 1, axis=2)[..., :k]
            order = np.argsort(-np.take_along_axis(s, top, axis=2), axis=2, kind="stable")
            out.append(np.take_along_axis(top, order, axis=2))
        return out


class AffinityPrefetch(LRU):
    _BLOCK = 16     # tokens predicted at once (a larger block's arrays cost more than its fewer numpy calls save)

    def __init__(self, ctx: PolicyContext):
        super().__init__(ctx)
        train = ctx.require_train_trace("affinity")
        self.predictor = AffinityPredictor(train.experts, ctx.num_experts, ctx.prefetch_depth)
        self._L, self._E, self._K, self._depth = ctx.num_layers, ctx.num_experts, ctx.top_k, ctx.prefetch_depth
        # Replaying a trace, the predictions are made for a block of tokens at once (one numpy pass instead
        # of one per layer), as keys: [distance - 1][token - _first][layer] -> the keys predicted. A run that
        # leaves the trace's routing is predicted layer by layer.
        self._first = self._stop = 0
        self._routes: list[list[list[int]]] = []
        self._keys: list[list[list[list[int]]]] = []

    def _predict_block(self, token: int) -> None:
        trace, L, E = self.ctx.trace, self._L, self._E
        self._first, self._stop = token, min(token + self._BLOCK, trace.num_tokens)
        routing = trace.experts[self._first:self._stop]
        self._routes = routing.tolist()
        self._keys = [(top + (np.arange(d, L) * E)[:, None]).tolist()
                      for d, top in enumerate(self.predictor.predict_tokens(routing.astype(np.int64), self._K), 1)]

    def prefetch(self, access: LayerAccess) -> list[PrefetchRequest]:
        token, layer, step = access.token, access.layer, access.step
        if not self._first <= token < self._stop:
            trace = self.ctx.trace
            if trace is not None and token < trace.num_tokens:
                self._predict_block(token)
        L = self._L
        depth = min(self._depth, L - 1 - layer)   # the next token's first layers depend on attention not yet run
        row = token - self._first
        if self._first <= token < self._stop and access.experts == self._routes[row][layer]:
            # replayed: the block's predictions, less the experts that hold a slot (the controller skips them)
            holds, keys = self.cache.holds, self._keys
            requests = []
            for d in range(1, depth + 1):
                need = step + d
                for key in keys[d - 1][row][layer]:
                    if not holds(key):
                        requests.append(_request(PrefetchRequest, (key, need)))
            return requests
        E, K = self._E, self._K
        requests = []
        for d in range(1, depth + 1):
            base = (layer + d) * E
            requests.extend(PrefetchRequest(base + e, step + d) for e in self.predictor.predict(layer, access.experts, d, K))
        return requests
