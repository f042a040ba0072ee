"""Golden hit counts from libCacheSim, an independent cache simulator, for the cross-check test.

    pip install -e '.[crosscheck]'                  # libcachesim, an optional extra
    python -m experiments.libcachesim_golden        # rewrites tests/golden/libcachesim_counts.json

The trace is the committed sample (``traces.DEFAULT_TRACE``) as the sweep replays it: the requests
after its 25 % training slice. Each of libCacheSim's caches holds ``cache_slots`` objects of size 1,
one cache per MoE layer (``per_layer``) or one of ``cache_slots x layers`` for all (``global``), fed
the trace's (token, layer) groups in decode order. ``tests/test_libcachesim_golden.py`` compares our
controller's counts with these; it needs libcachesim only to recompute them.

Where the two count the same way, and how they are fed so that they do:

- Our cache keeps a layer's chosen experts resident until the layer ends; a plain cache serves one
  request at a time and may evict an expert that the same layer chose.
- ``grouped``: each group's hits are served first (libCacheSim's own ``find`` says which are hits),
  then its misses. A plain LRU then never evicts a chosen expert (its hits are the most recent), and
  its counts are ours at every size >= top-k. A plain FIFO still can (hits do not move an entry),
  so FIFO is only recorded: ``evicted_in_use`` counts its evictions of a chosen expert.
- ``protected``: Belady is told the rule. Each group is requested twice, first with every expert
  needed again at the end of the group (so none is the farthest while the group is served), then
  again with its true next use (all hits; subtracted). Its counts are ours at every size.
- ``plain``: one request at a time in router order, Belady with each request's own next use. With
  top-1 routing (``routing: top1``, each layer's first-ranked expert) a group is one request and the
  rule changes nothing: plain LRU, FIFO and Belady are ours. With top-4 plain Belady is an upper
  bound on ours: it may evict an expert its layer still needs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from traces import DEFAULT_TRACE, Trace, load_trace
from traces.digest import file_sha256

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "libcachesim_counts.json"
TRAIN_FRACTION = 0.25
NEVER = 2 ** 62            # next use of an expert that is not used again

# name -> (libCacheSim algorithm, feeding, routing, cache mode, cache sizes, how it relates to ours)
ENTRIES: dict[str, tuple[str, str, str, str, tuple[int, ...], str]] = {
    "lru/grouped": ("LRU", "grouped", "top_k", "per_layer", (4, 5, 6, 7, 8), "equal"),
    "belady/protected": ("Belady", "protected", "top_k", "per_layer", (4, 5, 6, 7, 8), "equal"),
    "belady/plain": ("Belady", "plain", "top_k", "per_layer", (4, 5, 6, 7, 8), "upper bound"),
    "fifo/grouped": ("FIFO", "grouped", "top_k", "per_layer", (4, 5, 6, 7, 8), "differs"),
    "lru/grouped/global": ("LRU", "grouped", "top_k", "global", (4, 6, 8), "equal"),
    "belady/protected/global": ("Belady", "protected", "top_k", "global", (4, 6, 8), "equal"),
    "lru/top1": ("LRU", "plain", "top1", "per_layer", (1, 2, 3, 4, 6, 8), "equal"),
    "fifo/top1": ("FIFO", "plain", "top1", "per_layer", (1, 2, 3, 4, 6, 8), "equal"),
    "belady/top1": ("Belady", "plain", "top1", "per_layer", (1, 2, 3, 4, 6, 8), "equal"),
}


def replayed_trace(path: Path = DEFAULT_TRACE) -> Trace:
    """The requests the sweep replays by default: those after the leading 25 % training slice."""
    return load_trace(path).split(TRAIN_FRACTION)[1]


def with_routing(trace: Trace, routing: str) -> Trace:
    """``top_k``: the trace as recorded; ``top1``: only each layer's first-ranked expert."""
    if routing == "top_k":
        return trace
    model = dataclasses.replace(trace.model, top_k=1)
    return dataclasses.replace(trace, meta=dataclasses.replace(trace.meta, model=model),
                               experts=trace.experts[:, :, :1], weights=trace.weights[:, :, :1])


def layer_trace(trace: Trace, layer: int) -> Trace:
    """One MoE layer as a trace of its own: in ``per_layer`` mode a layer's cache sees only its own
    experts, so its counts are that layer's share of the whole run's."""
    model = dataclasses.replace(trace.model, num_layers=1)
    return dataclasses.replace(trace, meta=dataclasses.replace(trace.meta, model=model),
                               experts=trace.experts[:, layer:layer + 1], weights=trace.weights[:, layer:layer + 1])


def _groups(trace: Trace, cache_mode: str, layers) -> list[list[list[int]]]:
    """Per cache scope, its (token, layer) groups of object ids in decode order."""
    experts = trace.experts.astype(np.int64)
    if cache_mode == "global":
        keys = experts + (np.arange(trace.num_layers) * trace.num_experts)[None, :, None]
        return [keys.reshape(-1, trace.top_k).tolist()]
    return [experts[:, layer, :].tolist() for layer in layers]


def _next_group(groups: list[list[int]]) -> list[list[int]]:
    """For each group and position: the index of the next group that uses the same object."""
    last: dict[int, int] = {}
    out: list[list[int]] = [[]] * len(groups)
    for g in range(len(groups) - 1, -1, -1):
        out[g] = [last.get(o, NEVER) for o in groups[g]]
        for o in groups[g]:
            last[o] = g
    return out


def _feed(cache, groups: list[list[int]], feeding: str) -> tuple[int, int]:
    """(hits, evictions of an object of the group being served) of ``cache`` fed ``groups``."""
    import libcachesim as lcs
    req = lcs.Request(obj_size=1)
    K = len(groups[0])

    def get(obj: int, next_vtime: int = NEVER) -> bool:
        req.obj_id, req.next_access_vtime = obj + 1, next_vtime    # libCacheSim's ids start at 1
        return cache.get(req)

    def resident(obj: int) -> bool:
        req.obj_id = obj + 1
        return cache.find(req, False) is not None

    nxt = _next_group(groups)
    hits = evicted_in_use = 0
    for g, group in enumerate(groups):
        if feeding == "plain":    # virtual time: request g*K+i; its next use, that request's index
            for i, obj in enumerate(group):
                n = nxt[g][i]
                hits += get(obj, NEVER if n == NEVER else n * K + groups[n].index(obj))
        elif feeding == "protected":   # virtual time: group g's two passes are 2gK.., (2g+1)K..
            for obj in group:
                hits += get(obj, (2 * g + 1) * K)
            for i, obj in enumerate(group):
                n = nxt[g][i]
                assert get(obj, NEVER if n == NEVER else 2 * n * K), "the second pass must hit"
        else:                                            # grouped: the group's hits first
            held = [obj for obj in group if resident(obj)]
            for obj in held:
                hits += get(obj)
            for obj in group:
                if obj not in held:
                    get(obj)
            evicted_in_use += sum(not resident(obj) for obj in held)
    return hits, evicted_in_use


def libcachesim_counts(trace: Trace, names=None, layers=None, sizes=None) -> dict[str, dict]:
    """libCacheSim's hits per cache scope for ``ENTRIES`` (all, or ``names``) on ``trace``; per-layer
    entries for ``layers`` only, and only the cache sizes in ``sizes`` (default all). Needs libcachesim."""
    import libcachesim as lcs
    layers = list(range(trace.num_layers)) if layers is None else list(layers)
    out = {}
    for name in names or ENTRIES:
        algorithm, feeding, routing, mode, entry_sizes, relation = ENTRIES[name]
        groups = _groups(with_routing(trace, routing), mode, layers)
        entry = {"algorithm": algorithm, "feeding": feeding, "routing": routing, "cache_mode": mode,
                 "relation": relation, "hits": {}}
        for slots in (slots for slots in entry_sizes if sizes is None or slots in sizes):
            size = slots * (trace.num_layers if mode == "global" else 1)
            counts = [_feed(getattr(lcs, algorithm)(size, hashpower=12), scope, feeding) for scope in groups]
            entry["hits"][str(slots)] = [h for h, _ in counts]
            if relation == "differs":
                entry.setdefault("evicted_in_use", {})[str(slots)] = [e for _, e in counts]
        out[name] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=GOLDEN)
    args = parser.parse_args(argv)
    import libcachesim as lcs
    trace = replayed_trace()
    golden = {
        "note": "libCacheSim's hit counts per cache scope (a layer, or the one global cache) on the sample "
                "trace's replayed requests; how each is fed and how it relates to ours: "
                "experiments/libcachesim_golden.py. Checked by tests/test_libcachesim_golden.py.",
        "produced_by": "python -m experiments.libcachesim_golden",
        "libcachesim": lcs.__version__,
        "trace": {"path": DEFAULT_TRACE.relative_to(REPO).as_posix(), "sha256": file_sha256(DEFAULT_TRACE),
                  "replayed": f"the requests after the leading {TRAIN_FRACTION:g} (train_fraction), as the sweep "
                              f"replays them", "tokens": trace.num_tokens, "layers": trace.num_layers,
                  "experts": trace.num_experts, "top_k": trace.top_k},
        "entries": libcachesim_counts(trace),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(golden, indent=1)
    text = re.sub(r"\[[\d,\s]*\]", lambda m: " ".join(m.group().split()), text)   # a list of counts on one line
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
