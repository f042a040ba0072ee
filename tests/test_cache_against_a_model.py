"""``offload.cache.ExpertCache`` and the ``CacheView`` policies read, against a plain model of what a
slot cache is: random sequences of copies, completions, in-use protection and pins, with every query
(state, is_resident, holds, is_evictable, is_evictable_in, evictable, has_free_slot, residents) compared
with the model after every step, for every key and scope.

The built-in policies ask only a few of these queries (``evictable``, ``holds``), so a wrong answer from
the others (``is_resident`` true for a copy still in flight, ``is_evictable_in`` ignoring the scope, a
slot handed out twice) would reach only a user policy: no simulator test could see it.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from offload.cache import ABSENT, COPYING, EMPTY, RESIDENT, ExpertCache


class Model:
    """What the cache must answer, with no slots at all: per key its state, per scope a capacity."""

    def __init__(self, layers: int, experts: int, slots: int, per_layer: bool):
        self.E, self.per_layer = experts, per_layer
        self.scopes = layers if per_layer else 1
        self.capacity = slots if per_layer else slots * layers
        self.state: dict[int, int] = {}          # key -> COPYING | RESIDENT
        self.in_use: dict[int, int] = {}
        self.pinned: set[int] = set()

    def scope(self, key: int) -> int:
        return key // self.E if self.per_layer else 0

    def held(self, scope: int) -> int:
        return sum(1 for k in self.state if self.scope(k) == scope)

    def evictable(self, key: int) -> bool:
        return self.state.get(key) == RESIDENT and key not in self.in_use and key not in self.pinned


def check(cache: ExpertCache, model: Model, keys: int) -> None:
    view = cache.view()
    for key in range(keys):
        st_ = model.state.get(key, ABSENT)
        for q in (cache, view):
            assert q.state(key) == st_, key
            assert q.is_resident(key) == (st_ == RESIDENT), key
            assert q.holds(key) == (st_ != ABSENT), key
            assert q.is_evictable(key) == model.evictable(key), key
        for scope in range(model.scopes):
            assert cache.is_evictable_in(key, scope) == (model.evictable(key) and model.scope(key) == scope)
    for scope in range(model.scopes):
        want = {k for k in model.state if model.scope(k) == scope and model.evictable(k)}
        got = cache.evictable(scope)
        assert len(got) == len(set(got)) and set(got) == want
        assert set(view.evictable(scope)) == want
        assert cache.has_free_slot(scope) == (model.held(scope) < model.capacity)
        assert view.has_free_slot(scope) == cache.has_free_slot(scope)
    assert sorted(cache.residents()) == sorted(k for k, s in model.state.items() if s == RESIDENT)
    assert sorted(view.residents()) == sorted(cache.residents())
    # The slots themselves: one key per slot, each key's slot in its own scope's range, the rest empty.
    slots = cache.key_slot
    assert len(set(slots.values())) == len(slots) == len(model.state)
    per_scope = cache.num_slots // cache.num_scopes
    for key, slot in slots.items():
        assert slot // per_scope == model.scope(key)
        assert cache.slot_key[slot] == key
        assert cache.slot_state[slot] == model.state[key]
    for slot in set(range(cache.num_slots)) - set(slots.values()):
        assert slot in cache.free[slot // per_scope]
    assert sum(len(f) for f in cache.free) + len(slots) == cache.num_slots


@st.composite
def shapes(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, experts))
    per_layer = draw(st.booleans())
    least = top_k if per_layer else -(-top_k // layers)
    slots = draw(st.integers(least, experts))
    return layers, experts, slots, top_k, per_layer


@settings(max_examples=60, deadline=None)
@given(shapes(), st.lists(st.tuples(st.sampled_from(["copy", "copy", "finish", "acquire", "release", "pin",
                                                     "bad_victim"]),
                                    st.integers(0, 10**6), st.integers(0, 10**6)), max_size=60))
def test_the_cache_answers_every_query_as_a_plain_model_does(shape, ops):
    layers, experts, slots, top_k, per_layer = shape
    cache = ExpertCache(layers, experts, slots, "per_layer" if per_layer else "global", top_k)
    model = Model(layers, experts, slots, per_layer)
    keys = layers * experts
    assert all(cache.slot_state[s] == EMPTY for s in range(cache.num_slots))
    check(cache, model, keys)
    for op, a, b in ops:
        key = a % keys
        scope = model.scope(key)
        if op == "copy" and key not in model.state:
            if model.held(scope) < model.capacity:
                victim = None
            else:
                victims = sorted(k for k in model.state if model.scope(k) == scope and model.evictable(k))
                if not victims:
                    continue
                victim = victims[b % len(victims)]
                del model.state[victim]
            slot = cache.start_copy(key, victim)
            assert cache.slot_state[slot] == COPYING
            model.state[key] = COPYING
        elif op == "finish" and model.state.get(key) == COPYING:
            cache.finish_copy(key)
            model.state[key] = RESIDENT
        elif op == "acquire":
            cache.acquire(key)
            model.in_use[key] = model.in_use.get(key, 0) + 1
        elif op == "release" and key in model.in_use:
            cache.release(key)
            model.in_use[key] -= 1
            if not model.in_use[key]:
                del model.in_use[key]
        elif op == "pin" and model.state.get(key) == RESIDENT:
            cache.pin(key)
            model.pinned.add(key)
        elif op == "bad_victim" and key not in model.state:
            # A victim that is not evictable in the key's scope is refused, and nothing changes.
            bad = [k for k in range(keys) if not (model.evictable(k) and model.scope(k) == scope)]
            if bad:
                with pytest.raises(AssertionError):
                    cache.start_copy(key, bad[b % len(bad)])
        check(cache, model, keys)


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_load_resident_fills_the_slots_in_ascending_order_and_never_twice(mode):
    cache = ExpertCache(2, 4, 3, mode, 2)
    slots = [cache.load_resident(k) for k in (0, 1, 2, 4, 5, 6)]
    assert len(set(slots)) == 6
    if mode == "per_layer":
        assert slots == [0, 1, 2, 3, 4, 5]
        assert not cache.has_free_slot(0) and not cache.has_free_slot(1)
    else:
        assert slots == [0, 1, 2, 3, 4, 5] and not cache.has_free_slot(0)
    assert all(cache.is_resident(k) for k in (0, 1, 2, 4, 5, 6))
