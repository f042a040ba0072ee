"""GPU expert slot cache: which expert sits in which slot, in what state, and what may be evicted.

Both clocks (the SimPy simulator and the CUDA engine) hold one of these; neither keeps its own
residency bookkeeping. An expert is named by an integer *key* = layer * num_experts + expert, so the
hot path hashes small ints rather than tuples.

Slots are grouped into *scopes*: one scope per layer (``per_layer``: ``cache_slots`` slots for each
MoE layer) or a single scope (``global``: ``cache_slots * num_layers`` slots shared by all layers, the
same memory budget). A slot is EMPTY, COPYING (a copy into it is in flight) or RESIDENT.
"""
from __future__ import annotations

from enum import Enum

EMPTY, COPYING, RESIDENT = 0, 1, 2
ABSENT = -1  # state of a key that holds no slot


class CacheMode(str, Enum):
    PER_LAYER = "per_layer"
    GLOBAL = "global"


class ExpertCache:
    """Slots, residency, pins and in-use protection for the experts of one model."""

    def __init__(self, num_layers: int, num_experts: int, cache_slots: int, mode: CacheMode | str,
                 top_k: int):
        mode = CacheMode(mode)
        # Every expert of a layer must be resident at once while the layer computes: its own slots must
        # hold top_k (per-layer), or the shared pool of cache_slots x layers must (global).
        if mode is CacheMode.PER_LAYER and cache_slots < top_k:
            raise ValueError(f"cache_slots={cache_slots} is smaller than top_k={top_k}: a layer's "
                             f"{top_k} chosen experts must fit at once; use cache_slots >= {top_k}")
        if mode is CacheMode.GLOBAL and cache_slots * num_layers < top_k:
            need = -(-top_k // num_layers)
            raise ValueError(f"cache_slots={cache_slots} x {num_layers} layers = {cache_slots * num_layers} shared "
                             f"slots is smaller than top_k={top_k}: a layer's {top_k} chosen experts must fit "
                             f"at once; use cache_slots >= {need}")
        if mode is CacheMode.PER_LAYER and cache_slots > num_experts:
            raise ValueError(f"cache_slots={cache_slots} exceeds the {num_experts} experts per layer; "
                             f"use cache_slots <= {num_experts}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.cache_slots = cache_slots
        self.mode = mode
        self.per_layer = mode is CacheMode.PER_LAYER
        self.num_scopes = num_layers if self.per_layer else 1
        self.num_slots = cache_slots * num_layers
        self.slot_key = [ABSENT] * self.num_slots
        self.slot_state = [EMPTY] * self.num_slots
        # Free slots per scope, popped from the end so slot ids are handed out in ascending order (the
        # controller reads ``free[scope]`` for ``has_free_slot``).
        if self.per_layer:
            self.free = [list(range((s + 1) * cache_slots - 1, s * cache_slots - 1, -1))
                          for s in range(num_layers)]
        else:
            self.free = [list(range(self.num_slots - 1, -1, -1))]
        self.key_slot: dict[int, int] = {}
        # Resident keys per scope: the candidates an eviction policy chooses among.
        self.resident: list[set[int]] = [set() for _ in range(self.num_scopes)]
        self.in_use: dict[int, int] = {}
        self.pinned: set[int] = set()

    # -- queries -------------------------------------------------------------------------------
    def view(self) -> "CacheView":
        return CacheView(self)

    def scope(self, key: int) -> int:
        return key // self.num_experts if self.per_layer else 0

    def state(self, key: int) -> int:
        slot = self.key_slot.get(key)
        return ABSENT if slot is None else self.slot_state[slot]

    def is_resident(self, key: int) -> bool:
        slot = self.key_slot.get(key)
        return slot is not None and self.slot_state[slot] == RESIDENT

    def holds(self, key: int) -> bool:
        """``key`` has a slot: resident, or its copy is in flight."""
        return key in self.key_slot

    def is_evictable(self, key: int) -> bool:
        """Resident, not pinned, and not needed by the layer now computing."""
        slot = self.key_slot.get(key)
        return (slot is not None and self.slot_state[slot] == RESIDENT
                and key not in self.in_use and key not in self.pinned)

    def is_evictable_in(self, key: int, scope: int) -> bool:
        """``is_evictable(key)`` and ``key`` is of ``scope``: a victim for a copy into ``scope``."""
        slot = self.key_slot.get(key)
        return (slot is not None and self.slot_state[slot] == RESIDENT and key not in self.in_use
                and key not in self.pinned and (key // self.num_experts if self.per_layer else 0) == scope)

    def evictable(self, scope: int) -> list[int]:
        in_use, pinned = self.in_use, self.pinned
        if pinned:
            return [k for k in self.resident[scope] if k not in in_use and k not in pinned]
        keys = []             # a loop, not a comprehension: a scope holds a few keys, asked once per eviction
        for k in self.resident[scope]:
            if k not in in_use:
                keys.append(k)
        return keys

    def has_free_slot(self, scope: int) -> bool:
        return bool(self.free[scope])

    def residents(self) -> list[int]:
        return [k for s in self.resident for k in s]

    # -- in-use protection ---------------------------------------------------------------------
    def acquire(self, key: int) -> None:
        self.in_use[key] = self.in_use.get(key, 0) + 1

    def release(self, key: int) -> None:
        n = self.in_use[key] - 1
        if n:
            self.in_use[key] = n
        else:
            del self.in_use[key]

    def pin(self, key: int) -> None:
        self.pinned.add(key)

    # -- transitions ---------------------------------------------------------------------------
    def start_copy(self, key: int, victim: int | None) -> int:
        """Give ``key`` a slot for an incoming copy: a free slot of its scope, else ``victim``'s."""
        scope = key // self.num_experts if self.per_layer else 0
        if victim is not None and not self.is_evictable_in(victim, scope):
            raise AssertionError(f"victim {victim} is not evictable in scope {scope}")
        return self.place(key, scope, victim)

    def place(self, key: int, scope: int, victim: int | None) -> int:
        """``start_copy`` for a caller that has checked ``victim`` already (the controller, which checks
        every victim a policy returns): ``scope`` is ``key``'s, ``victim`` None or evictable in it."""
        key_slot = self.key_slot
        if victim is None:
            slot = self.free[scope].pop()
        else:
            slot = key_slot.pop(victim)
            self.resident[scope].discard(victim)
        self.slot_key[slot] = key
        self.slot_state[slot] = COPYING
        key_slot[key] = slot
        return slot

    def finish_copy(self, key: int) -> None:
        self.slot_state[self.key_slot[key]] = RESIDENT
        self.resident[key // self.num_experts if self.per_layer else 0].add(key)

    def load_resident(self, key: int) -> int:
        """Place ``key`` before decoding starts (model load: untimed, not counted as a copy)."""
        slot = self.start_copy(key, None)
        self.finish_copy(key)
        return slot


class CacheView:
    """The cache as a policy sees it, in every hook: the queries, none of the transitions.

    Policies decide; only the controller changes slots. A policy that needs to know what is resident
    asks here instead of mirroring inserts and evictions in a shadow copy of its own.
    """

    __slots__ = ("num_layers", "num_experts", "cache_slots", "mode", "per_layer", "num_scopes",
                 "num_slots", "scope", "state", "holds", "is_resident", "is_evictable", "evictable",
                 "has_free_slot", "residents")

    def __init__(self, cache: ExpertCache):
        for name in ("num_layers", "num_experts", "cache_slots", "mode", "per_layer", "num_scopes",
                     "num_slots"):
            setattr(self, name, getattr(cache, name))
        # Bound query methods of the one cache: no copy of its state, no way to change it.
        self.scope = cache.scope
        self.state = cache.state
        self.holds = cache.key_slot.__contains__   # cache.holds without a Python frame: asked per prefetch request
        self.is_resident = cache.is_resident
        self.is_evictable = cache.is_evictable
        self.evictable = cache.evictable
        self.has_free_slot = cache.has_free_slot
        self.residents = cache.residents
