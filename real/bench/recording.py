"""Recording a live run with every expert resident: the routing (the future the bounds read), the
hidden states (what predictors are scored on) and the tokens, as a trace; and the all-resident engine's
own speed. The prompts, their new-token count and the fully-resident model's tokens go into the trace's
``extra``, so a later command replays the same decode and checks it against the same tokens."""
from __future__ import annotations

from pathlib import Path

import torch

from offload.session import RunSettings
from policies.lru import LRU
from policies.static import Static
from real.engine import EngineResult, OffloadEngine
from real.record import routing_trace
from real.bench.table import IDENTICAL_COLUMN, CsvTable
from traces import ModelShape, Trace, save_trace


def recorded_on(device: torch.device) -> str:
    """The ``recorded_on`` of a trace or profile measured on ``device``: the GPU's name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def record_run(host, shape: ModelShape, prompts: list[list[int]], new_tokens: int, source: str, description: str,
               hidden: bool = True, reference_tokens: list[list[int]] | None = None) -> tuple[Trace, EngineResult]:
    """Greedy decode of ``prompts`` by an engine with every expert resident (``host``: a
    ``real.model.MoEModel`` with its experts on the host), as (trace, engine result). The trace holds
    every step (prompt steps route experts too), with hidden states for all of them when ``hidden``;
    its ``extra`` holds ``prompts``, ``new_tokens``, the engine's ``generated`` tokens and
    ``reference_tokens`` (the fully-resident model's, when given)."""
    steps = sum(len(p) + new_tokens for p in prompts)
    engine = OffloadEngine(host, shape, LRU, RunSettings(cache_slots=shape.num_experts),
                           record_hidden_steps=steps if hidden else 0)
    result = engine.generate(prompts, new_tokens)
    extra = {"prompts": prompts, "new_tokens": new_tokens, "generated": result.generated}
    if reference_tokens is not None:
        extra["reference_tokens"] = reference_tokens
    trace = routing_trace(result, shape, source=source, recorded_on=recorded_on(host.device),
                          description=description, extra=extra)
    return trace, result


def warm_engine(host, shape: ModelShape, train: Trace, future: Trace | None = None) -> OffloadEngine:
    """An engine that starts with every expert in its slot (``static`` at as many slots as experts:
    every expert is preloaded, whatever ``train`` ranks first)."""
    _reset_peak(host.device)
    return OffloadEngine(host, shape, Static, RunSettings(cache_slots=shape.num_experts), future=future,
                         train_trace=train)


def measure_all_resident(host, shape: ModelShape, recorded: Trace, train: Trace) -> tuple[OffloadEngine, dict]:
    """The all-resident engine's decode of ``recorded``'s prompts: (the warm engine, its metrics). The
    engine's speed with no copies at all, the bound its offloaded runs are read against."""
    engine = warm_engine(host, shape, train, future=recorded)
    extra = recorded.meta.extra
    return engine, engine.generate(extra["prompts"], extra["new_tokens"]).metrics


def recording_prompts(trace: Trace, path) -> tuple[list[list[int]], int, list[list[int]]]:
    """(prompts, new tokens, reference tokens) of a trace ``record_run`` wrote; raises ValueError naming
    ``path`` and the fix for any other trace."""
    extra = trace.meta.extra
    missing = [k for k in ("prompts", "new_tokens", "reference_tokens") if k not in extra]
    if missing:
        raise ValueError(f"{path}: __meta__.extra has no {', '.join(missing)}: not a recording of "
                         f"python -m experiments.record (or engine_bench live); record the run with it")
    return [list(map(int, p)) for p in extra["prompts"]], int(extra["new_tokens"]), extra["reference_tokens"]


def record_slices(host, shape: ModelShape, name: str, prompts: list[list[int]], train_prompts: list[list[int]],
                  new_tokens: int, reference_tokens: list[list[int]], out: Path) -> tuple[Trace, Trace]:
    """The measured decode and the training slice, both recorded by the all-resident engine: (recorded,
    train). ``recorded`` (held-out ``prompts``, hidden states at every step) is the future the bounds
    read; ``train`` (``train_prompts``, from the training split) is what ``static`` and ``affinity``
    learn from in both clocks, so neither learns from the decode it is measured on. Writes
    OUT/<name>-train-trace.npz and OUT/correctness.csv (afresh: whether the all-resident engine's tokens
    equal ``reference_tokens``, the fully-resident model's); the caller saves ``recorded``."""
    recorded, base = record_run(host, shape, prompts, new_tokens, source=f"real.bench.recording, model {name}",
                                description="greedy decode of held-out corpus prompts (prompt steps included), "
                                            "all experts resident", reference_tokens=reference_tokens)
    train, _ = record_run(host, shape, train_prompts, new_tokens, source=f"real.bench.recording, model {name}",
                          description="greedy decode of training-split corpus prompts (prompt steps included), "
                                      "all experts resident: the slice static and affinity learn from",
                          hidden=False)
    save_trace(train, Path(out) / f"{name}-train-trace.npz")
    CsvTable(Path(out) / "correctness.csv", keep=False).add(
        {"policy": "all-resident-engine", "cache_slots": shape.num_experts, "lossless": True,
         IDENTICAL_COLUMN: base.generated == reference_tokens})
    return recorded, train
