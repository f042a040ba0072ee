"""Shape replay: a named production shape with random weights (``real.shape_model``), its routing
forced from a recorded trace, so real copies and real compute run at the model's size."""
from __future__ import annotations

from offload.session import RunSettings
from policies.registry import resolve_policy
from real.bench.table import CsvTable, engine_row
from real.engine import OffloadEngine
from traces import ModelShape, Trace

TRAIN_FRACTION = 0.25       # as the sweep: the leading quarter of requests trains static/affinity, the rest replay


def replay_slices(trace: Trace, shape: ModelShape, max_tokens: int, path) -> tuple[Trace, Trace]:
    """(train, replayed): the leading ``TRAIN_FRACTION`` of ``trace``'s requests, then the rest up to
    ``max_tokens`` tokens (whole requests). Raises ValueError naming ``path`` when the trace is for another
    shape or has fewer than two requests."""
    if trace.model.num_experts != shape.num_experts or trace.model.num_layers != shape.num_layers:
        raise ValueError(f"{path}: recorded for {trace.model.name} ({trace.model.num_layers} layers, "
                         f"{trace.model.num_experts} experts), not {shape.name}; pass a trace of that shape")
    if trace.num_requests < 2:
        raise ValueError(f"{path}: {trace.num_requests} request; replay needs two or more (a training slice "
                         f"and the replayed rest)")
    train, rest = trace.split(TRAIN_FRACTION)
    return train, rest.head_tokens(max_tokens)


def shape_replay(model, shape: ModelShape, train: Trace, trace: Trace, policies: list[str], slots: list[int],
                 max_tokens: int, table: CsvTable) -> None:
    """Every policy at every cache size replays the first ``max_tokens`` steps of ``trace`` on ``model``,
    ``train`` being the slice ``static`` and ``affinity`` learn from; one engine.csv row (mode
    ``shape-replay``) each."""
    for policy in policies:
        for s in slots:
            engine = OffloadEngine(model, shape, resolve_policy(policy), RunSettings(cache_slots=s), future=trace,
                                   train_trace=train)
            table.add(engine_row(shape.name, "shape-replay", policy, s, engine.replay(trace, max_tokens).metrics))
