"""Synthetic traces with tunable popularity skew and locality, for property tests and benchmarks only.

Each layer is generated for all tokens at once:
1. a "base" choice per (token, layer): Zipf-popular experts sampled without replacement (exponential race),
   where a slot may instead follow a fixed permutation of the same slot's expert at the previous layer;
2. temporal reuse: with probability `temporal_locality` a slot keeps the previous token's expert in that
   slot. Reuse chains are resolved with a running maximum over token indices; a row where a reused id
   collides with another id gives up reuse on the colliding slots, repeated until every row is distinct.
"""

from __future__ import annotations

import numpy as np

from traces.model_shape import ModelShape
from traces.trace import SCHEMA_VERSION, Trace, TraceMeta


def synthetic_trace(
    num_tokens: int = 10_000,
    num_layers: int = 24,
    num_experts: int = 32,
    top_k: int = 4,
    num_requests: int = 1,
    popularity_skew: float = 1.0,
    temporal_locality: float = 0.3,
    cross_layer_locality: float = 0.0,
    seed: int = 0,
    name: str = "synthetic",
    expert_bytes: int = 1_000_000,
) -> Trace:
    if not 1 <= num_requests <= num_tokens:
        raise ValueError(f"synthetic_trace: need 1 <= num_requests ({num_requests}) <= num_tokens ({num_tokens})")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"synthetic_trace: need 1 <= top_k ({top_k}) <= num_experts ({num_experts})")
    for label, p in (("temporal_locality", temporal_locality), ("cross_layer_locality", cross_layer_locality)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"synthetic_trace: {label} must be a probability in [0, 1], got {p}")
    rng = np.random.default_rng(seed)
    request_starts = np.linspace(0, num_tokens, num_requests + 1).round().astype(np.int64)
    # The KV cache restarts at a request boundary, so reuse never crosses one.
    first_of_request = np.zeros(num_tokens, dtype=bool)
    first_of_request[request_starts[:-1]] = True

    experts = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    # Exponential race: expert e's key is Exp(1) / popularity_e, so scaling by rank^skew is enough.
    inverse_popularity = np.arange(1, num_experts + 1, dtype=np.float32) ** np.float32(popularity_skew)
    previous_layer = None
    for layer in range(num_layers):
        layer_inv_pop = rng.permutation(inverse_popularity)  # each layer favours different experts
        if previous_layer is not None and cross_layer_locality > 0:
            base = _follow_previous_layer(rng, previous_layer, layer_inv_pop, cross_layer_locality)
        else:
            base = _sample_without_replacement(rng, layer_inv_pop, num_tokens, top_k)
        reuse = rng.random((num_tokens, top_k)) < temporal_locality
        reuse[first_of_request] = False
        experts[:, layer] = _resolve_reuse(base, reuse)
        previous_layer = experts[:, layer]

    logits = rng.standard_normal((num_tokens, num_layers, top_k)).astype(np.float32)
    weights = np.exp(-np.sort(-logits, axis=-1))  # router order: largest weight first
    weights /= weights.sum(axis=-1, keepdims=True)

    model = ModelShape(
        name=f"{name}-L{num_layers}-E{num_experts}-k{top_k}",
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=64,
        expert_intermediate_size=128,
        num_attention_heads=4,
        num_kv_heads=4,
        head_dim=16,
        vocab_size=256,
        expert_bytes_override=(("bf16", expert_bytes),),
    )
    meta = TraceMeta(
        schema_version=SCHEMA_VERSION,
        model=model,
        source="traces.synthetic.synthetic_trace",
        licence="n/a (generated)",
        recorded_on="n/a",
        description="synthetic routing for tests and benchmarks",
        extra={
            "seed": seed,
            "popularity_skew": popularity_skew,
            "temporal_locality": temporal_locality,
            "cross_layer_locality": cross_layer_locality,
        },
    )
    id_dtype = np.uint8 if num_experts <= 256 else np.uint16
    return Trace(meta=meta, experts=experts.astype(id_dtype), weights=weights, request_starts=request_starts)


def _sample_without_replacement(rng, inverse_popularity: np.ndarray, rows: int, k: int) -> np.ndarray:
    """[rows, k] distinct ids per row in Plackett-Luce order: the k earliest arrivals of an exponential race."""
    out = np.empty((rows, k), dtype=np.int64)
    num_experts = len(inverse_popularity)
    chunk = max(1, 4_000_000 // num_experts)  # bounds the [chunk, E] key matrix
    for r0 in range(0, rows, chunk):
        n = min(chunk, rows - r0)
        keys = rng.standard_exponential((n, num_experts), dtype=np.float32) * inverse_popularity
        row = np.arange(n)
        # k repeated argmins beat a full argsort / argpartition for the small k of MoE routing.
        for slot in range(k):
            winner = keys.argmin(axis=1)
            out[r0 + row, slot] = winner
            keys[row, winner] = np.inf
    return out


def _follow_previous_layer(rng, previous_layer, inverse_popularity, probability) -> np.ndarray:
    """Slots flagged with `probability` take perm[previous layer's id]; the rest get fresh distinct ids."""
    rows, k = previous_layer.shape
    perm = rng.permutation(len(inverse_popularity))
    follow = rng.random((rows, k)) < probability
    followed = np.where(follow, perm[previous_layer], -1)
    # 2k candidates leave at least k that are not already taken by followed slots (or all experts if fewer).
    candidates = _sample_without_replacement(rng, inverse_popularity, rows, min(len(inverse_popularity), 2 * k))
    free = ~(candidates[:, :, None] == followed[:, None, :]).any(axis=2)
    free_first = np.argsort(~free, axis=1, kind="stable")
    free_ids = np.take_along_axis(candidates, free_first, axis=1)
    nth_free_slot = np.cumsum(~follow, axis=1) - 1
    fresh = np.take_along_axis(free_ids, np.clip(nth_free_slot, 0, None), axis=1)
    return np.where(follow, followed, fresh)


def _resolve_reuse(base: np.ndarray, reuse: np.ndarray) -> np.ndarray:
    rows, k = base.shape
    token = np.arange(rows)[:, None]
    slot = np.arange(k)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    reuse = reuse.copy()
    while True:
        # Each slot's value comes from the latest token at or before it that did not reuse.
        source = np.maximum.accumulate(np.where(reuse, 0, token), axis=0)
        ids = base[source, slot]
        clash = np.zeros_like(reuse)
        for i, j in pairs:
            same = ids[:, i] == ids[:, j]
            clash[:, i] |= same
            clash[:, j] |= same
        clash &= reuse  # base rows are distinct, so every clash involves a reused slot
        if not clash.any():
            return ids
        reuse &= ~clash


# Calibration patterns (real.calibration runs them on the engine, validation.profile_fit in the simulator).
PATTERNS = ("hits", "misses", "alternate")


def pattern_trace(shape: ModelShape, steps: int, pattern: str) -> Trace:
    """Synthetic routing of ``steps`` tokens, one request. ``hits``: experts 0..k-1 at every layer and step.
    ``misses``: step t routes experts (t*k .. t*k+k-1) mod E, so consecutive steps share none (E >= 2k)
    and with k slots per layer every access misses. ``alternate``: even layers as ``hits``, odd layers as
    ``misses``, so that with k slots a hit layer follows every miss layer (held out of the profile's fit, it
    checks what the fitted constants predict there). Weights are 1/k. Raises ValueError for an unknown
    pattern, or ``misses``/``alternate`` on a shape with fewer than 2k experts."""
    L, E, K = shape.num_layers, shape.num_experts, shape.top_k
    if pattern != "hits" and E < 2 * K:
        raise ValueError(f"pattern {pattern!r} needs at least 2 * top_k experts; {shape.name} has {E} for top-{K}")
    rotating = (np.arange(steps)[:, None, None] * K + np.arange(K)[None, None, :]) % E
    if pattern == "hits":
        ids = np.broadcast_to(np.arange(K), (steps, L, K))
    elif pattern == "misses":
        ids = np.broadcast_to(rotating, (steps, L, K))
    elif pattern == "alternate":
        odd = (np.arange(L) % 2 == 1)[None, :, None]
        ids = np.where(odd, rotating, np.arange(K)[None, None, :])
    else:
        raise ValueError(f"unknown pattern {pattern!r}; use one of {list(PATTERNS)}")
    meta = TraceMeta(SCHEMA_VERSION, shape, "traces.synthetic.pattern_trace", "Apache-2.0", "synthetic",
                     f"calibration pattern '{pattern}'", {})
    experts = np.ascontiguousarray(ids, dtype=np.uint8 if E <= 256 else np.uint16)
    return Trace(meta, experts, np.full((steps, L, K), 1.0 / K, dtype=np.float32), np.array([0, steps], np.int64))
