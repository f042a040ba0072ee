"""Statistics of top-k routing decisions: expert load skew, consecutive-token reuse and domain
specialisation. Applied alike to a model's own held-out routing (``real.train_lm``) and to recorded
traces (e.g. the gpt-oss-20b arrays in ``experiments.routing_compare``)."""
from __future__ import annotations

import math

import numpy as np


def routing_stats(expert_ids: np.ndarray, num_experts: int, domains: np.ndarray | None = None,
                  request_starts: np.ndarray | None = None) -> dict:
    """Statistics of top-k routing decisions ``expert_ids`` [T, L, K] (token, layer, choice).

    Per layer: each expert's share of the T*K assignments (with its max/min ratio and entropy);
    consecutive-token reuse, the mean of |S_t & S_t-1| / K over consecutive tokens of one request
    (a pair that crosses a start in ``request_starts`` is skipped; random routing gives K/E); and with
    ``domains`` [T] (any labels), how domain-specific the experts are: the mutual information between
    a token's domain and an assigned expert (the Jensen-Shannon divergence of the domains' expert
    distributions, weighted by token counts), and each domain's largest lift share_domain(e) / share(e).
    """
    ids = np.asarray(expert_ids)
    if ids.ndim != 3:
        raise ValueError(f"expert_ids must be [tokens, layers, top_k], got shape {ids.shape}")
    T, L, K = ids.shape
    ids = ids.astype(np.int64)
    if T and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids must lie in 0..{num_experts - 1}, got {ids.min()}..{ids.max()}")

    member = np.zeros((T, L, num_experts), dtype=bool)
    np.put_along_axis(member, ids, True, axis=2)
    counts = member.sum(axis=0).astype(np.float64)                       # [L, E]
    share = counts / max(T * K, 1)

    overlap = (member[1:] & member[:-1]).sum(axis=2) / K                 # [T-1, L]
    valid = np.ones(max(T - 1, 0), dtype=bool)
    starts = np.asarray([] if request_starts is None else request_starts, dtype=np.int64)
    inner = starts[(starts > 0) & (starts < T)]
    valid[inner - 1] = False
    reuse = overlap[valid].mean(axis=0) if valid.any() else np.full(L, np.nan)

    layers = []
    for layer in range(L):
        p = share[layer]
        lo, hi = p.min(), p.max()
        layers.append({
            "layer": layer,
            "load_share": _rounded(p),
            "load_max_min_ratio": None if lo == 0 else float(hi / lo),
            "load_entropy_bits": _entropy_bits(p),
            "load_entropy_normalized": _entropy_bits(p) / math.log2(num_experts),
            "unused_experts": int((p == 0).sum()),
            "reuse": float(reuse[layer]),
        })
    out = {
        "tokens": int(T), "layers": int(L), "top_k": int(K), "num_experts": int(num_experts),
        "requests": int(len(inner) + (T > 0)), "consecutive_pairs": int(valid.sum()),
        "random_reuse": K / num_experts,
        "per_layer": layers,
    }
    summary = {
        "reuse_mean": float(np.mean(reuse)),
        "reuse_by_layer": _rounded(reuse),
        "load_max_min_ratio_max": max((x["load_max_min_ratio"] or math.inf) for x in layers) if L else None,
        "load_entropy_normalized_mean": float(np.mean([x["load_entropy_normalized"] for x in layers])),
    }
    if summary["load_max_min_ratio_max"] == math.inf:
        summary["load_max_min_ratio_max"] = None          # some expert never chosen (JSON has no infinity)

    if domains is not None:
        domains = np.asarray(domains)
        if domains.shape != (T,):
            raise ValueError(f"domains must be [tokens] = [{T}], got shape {domains.shape}")
        names, which = np.unique(domains, return_inverse=True)
        per_domain = {}
        jsd = np.zeros(L)
        lifts = np.zeros((len(names), L))
        for d, name in enumerate(names):
            rows = which == d
            w = rows.sum() / T
            p_d = member[rows].sum(axis=0) / (rows.sum() * K)            # [L, E]
            for layer in range(L):
                jsd[layer] -= w * _entropy_bits(p_d[layer])
                used = share[layer] > 0
                lifts[d, layer] = (p_d[layer][used] / share[layer][used]).max()
            per_domain[str(name)] = {
                "tokens": int(rows.sum()),
                "max_lift_mean_over_layers": float(lifts[d].mean()),
                "max_lift_by_layer": _rounded(lifts[d]),
                "top_expert_by_layer": [int(e) for e in p_d.argmax(axis=1)],
                "load_share_by_layer": [_rounded(p_d[layer]) for layer in range(L)],
            }
        for layer in range(L):
            jsd[layer] += _entropy_bits(share[layer])
        for layer in range(L):
            layers[layer]["domain_jsd_bits"] = float(jsd[layer])
            layers[layer]["domain_max_lift_mean"] = float(lifts[:, layer].mean())
        summary["domain_jsd_bits_mean"] = float(jsd.mean())
        summary["domain_jsd_bits_by_layer"] = _rounded(jsd)
        summary["domain_max_lift_mean"] = float(lifts.mean())
        out["per_domain"] = per_domain
    out["summary"] = summary
    return out


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _rounded(a) -> list[float]:
    return [round(float(x), 6) for x in a]
