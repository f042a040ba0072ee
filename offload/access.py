"""What a policy is told when a layer routes, and what it answers with a prefetch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class PrefetchRequest(NamedTuple):
    key: int          # layer * num_experts + expert
    need_step: int    # the decode step (token * num_layers + layer) expected to use it; sets the order


@dataclass(slots=True)
class LayerAccess:
    """What a policy learns when a layer's router has chosen: the step, the choice, and in the live
    engine the hidden state that predictors read."""
    token: int                 # token index in the run (the replayed trace slice in the simulator)
    layer: int
    step: int                  # token * num_layers + layer
    experts: list[int]
    weights: list[float] | None = None
    hidden: Any = None         # live engine only: the post-attention residual entering this MoE layer
