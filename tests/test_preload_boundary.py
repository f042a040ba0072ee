"""The preload check at its boundary: a scope can take exactly its slots, and one more is a PolicyError
naming the preload (not an IndexError from an empty free list, or a silently wrong cache). A key given twice
is placed once and counts once."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from offload.controller import PolicyError
from offload.session import RunSettings, open_session
from policies.lru import LRU
from traces import synthetic_trace


def preloading(entries):
    class Preloads(LRU):
        def preload(self):
            return list(entries)
    return Preloads


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(2, 6), st.sampled_from(["per_layer", "global"]), st.data())
def test_a_scope_takes_exactly_its_slots_and_one_more_is_refused(layers, experts, mode, data):
    trace = synthetic_trace(num_tokens=2, num_layers=layers, num_experts=experts, top_k=1)
    slots = data.draw(st.integers(1, experts))
    per_scope = slots if mode == "per_layer" else slots * layers
    scope_keys = list(range(experts)) if mode == "per_layer" else list(range(layers * experts))
    n = data.draw(st.integers(0, min(per_scope + 1, len(scope_keys))))
    keys = data.draw(st.permutations(scope_keys))[:n]
    twice = data.draw(st.lists(st.sampled_from(keys), max_size=3)) if keys else []
    entries = [(k, False) for k in keys + twice]
    settings_ = RunSettings(cache_slots=slots, cache_mode=mode)
    if n > per_scope:
        with pytest.raises(PolicyError, match="no free slot left"):
            open_session(trace.model, preloading(entries), settings_, expert_bytes=1)
        return
    cache = open_session(trace.model, preloading(entries), settings_, expert_bytes=1).cache
    assert sorted(cache.residents()) == sorted(keys)
    assert len(set(cache.key_slot.values())) == len(keys)
    assert cache.has_free_slot(0) == (n < per_scope)
