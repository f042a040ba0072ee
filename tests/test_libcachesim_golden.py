"""Our controller's hit counts against libCacheSim's (an independent cache simulator), on the sample
trace as the sweep replays it (``tests/golden/libcachesim_counts.json``; how it was made and how each
cache was fed: ``experiments/libcachesim_golden.py``).

Where the two count the same way the counts are equal in every cache scope (each layer, or the one
global cache), at every size recorded:

- LRU at every size >= top-k, per layer and global, with each layer's hits served first;
- Belady at every size, per layer and global, when libCacheSim's Belady is told that a layer's chosen
  experts are needed until the layer ends;
- LRU, FIFO and Belady plain, with top-1 routing (a layer uses one expert: the rule changes nothing).

Elsewhere plain Belady is an upper bound on ours (it may evict an expert its layer still needs), and
the README states by how much. The committed counts are checked without libcachesim; with it
(``pip install -e '.[crosscheck]'``) they are recomputed too. Both of our paths are checked: the
compiled kernels (``auto``) in every scope, the policies' own code (``reference``) in the first and
last layer; a policy changed in a small way fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.libcachesim_golden import (ENTRIES, GOLDEN, layer_trace, libcachesim_counts, replayed_trace,
                                            with_routing)
from offload.session import RunSettings
from policies.belady import Belady
from policies.fifo import FIFO
from policies.lru import LRU
from policies.registry import resolve_policy
from sim.replay import replay_untimed
from traces import DEFAULT_TRACE
from traces.digest import file_sha256

README = Path(__file__).resolve().parents[1] / "README.md"
GOLD = json.loads(GOLDEN.read_text())
TRACE = replayed_trace()
EDGE_LAYERS = (0, TRACE.num_layers - 1)
EQUAL = [name for name, entry in GOLD["entries"].items() if entry["relation"] == "equal"]
OURS = {"LRU": "lru", "FIFO": "fifo", "Belady": "belady"}


def ours(name: str, slots: int, policy=None, path: str = "auto", layers=None) -> list[int]:
    """Our hits per cache scope for the golden entry ``name`` (its routing and cache mode) at
    ``slots``: one count for the global cache, else one per layer of ``layers`` (default all)."""
    entry = GOLD["entries"][name]
    policy = policy or resolve_policy(OURS[entry["algorithm"]])
    trace = with_routing(TRACE, entry["routing"])
    if entry["cache_mode"] == "global":
        return [replay_untimed(trace, policy, RunSettings(slots, "global"), path=path).hits]
    return [replay_untimed(layer_trace(trace, layer), policy, RunSettings(slots), path=path).hits
            for layer in (range(trace.num_layers) if layers is None else layers)]


def mismatches(name: str, policy=None, path: str = "auto", layers=None) -> list[tuple]:
    """(slots, scope, ours, libCacheSim's) wherever our count differs from the golden one."""
    entry, out = GOLD["entries"][name], []
    for slots, theirs in entry["hits"].items():
        scopes = range(len(theirs)) if layers is None or entry["cache_mode"] == "global" else layers
        got = ours(name, int(slots), policy, path, scopes)
        out += [(int(slots), s, g, theirs[s]) for s, g in zip(scopes, got) if g != theirs[s]]
    return out


def test_the_golden_counts_are_of_the_committed_trace_and_every_entry():
    assert GOLD["trace"]["path"] == DEFAULT_TRACE.relative_to(README.parent).as_posix()
    assert GOLD["trace"]["sha256"] == file_sha256(DEFAULT_TRACE), "the sample trace changed: regenerate the golden file"
    assert GOLD["trace"]["tokens"] == TRACE.num_tokens and GOLD["trace"]["top_k"] == TRACE.top_k == 4
    assert set(GOLD["entries"]) == set(ENTRIES)
    assert {"lru/grouped", "belady/protected", "lru/top1", "fifo/top1", "belady/top1"} <= set(EQUAL)


@pytest.mark.parametrize("name", EQUAL)
def test_our_counts_are_libcachesims_where_both_count_the_same_way(name):
    assert not mismatches(name), mismatches(name)[:5]


@pytest.mark.parametrize("name", [n for n in EQUAL if GOLD["entries"][n]["cache_mode"] == "per_layer"])
def test_the_policies_own_code_gives_the_same_counts(name):
    """The reference walk runs the policy classes themselves (the kernels above do not)."""
    assert not mismatches(name, path="reference", layers=EDGE_LAYERS)


def test_plain_belady_is_an_upper_bound_on_ours_by_what_the_readme_says():
    plain, under_rule = GOLD["entries"]["belady/plain"]["hits"], GOLD["entries"]["belady/protected"]["hits"]
    more = {}
    for slots, theirs in plain.items():
        got = ours("belady/plain", int(slots))
        assert got == under_rule[slots]
        assert all(g <= t for g, t in zip(got, theirs)), (slots, got, theirs)
        more[int(slots)] = sum(theirs) / sum(got) - 1
    assert all(more[s] > more[s + 1] > 0 for s in sorted(more)[:-1]), more   # the rule costs less with more slots
    low, high = round(100 * more[max(more)]), round(100 * more[min(more)])
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `belady` | Belady's MIN"))
    assert f"{low}–{high} % more hits at {max(more)} down to {min(more)} slots" in row, (low, high, row)


class LRUHitsDoNotRefresh(LRU):
    def on_access(self, access, index, key, hit):
        if not hit:
            self.touch(key)


class FIFOHitsRefresh(FIFO):
    on_access = LRU.on_access


class BeladySecondFarthest(Belady):
    """Evicts the second-farthest next use where there is a choice."""

    def choose_victim(self, scope, cache, job):
        ranked = sorted(cache.evictable(scope), key=lambda k: (-self.next_use(k), k))
        return ranked[min(1, len(ranked) - 1)] if ranked else None


@pytest.mark.parametrize("policy, name", [(LRUHitsDoNotRefresh, "lru/grouped"), (FIFOHitsRefresh, "fifo/top1"),
                                          (BeladySecondFarthest, "belady/protected"),
                                          (BeladySecondFarthest, "belady/top1")])
def test_a_policy_changed_in_a_small_way_fails_the_crosscheck(policy, name):
    assert mismatches(name, policy, layers=EDGE_LAYERS[:1])


def test_libcachesim_recomputes_the_golden_counts():
    pytest.importorskip("libcachesim", reason="libcachesim is an optional extra: pip install -e '.[crosscheck]'")
    per_layer = [name for name, entry in GOLD["entries"].items() if entry["cache_mode"] == "per_layer"]
    whole = [name for name in GOLD["entries"] if name not in per_layer]
    # A few seconds of libCacheSim: every size in the first and last layer, the global cache at its smallest.
    live = {**libcachesim_counts(TRACE, per_layer, layers=EDGE_LAYERS), **libcachesim_counts(TRACE, whole, sizes=(4,))}
    for name, entry in live.items():
        gold = GOLD["entries"][name]
        assert {k: v for k, v in entry.items() if not isinstance(v, dict)} == {
            k: v for k, v in gold.items() if not isinstance(v, dict)}
        for counts in ("hits", "evicted_in_use"):
            for slots, theirs in entry.get(counts, {}).items():
                want = gold[counts][slots]
                assert theirs == ([want[layer] for layer in EDGE_LAYERS] if name in per_layer else want), (name, slots)
