"""Shape replay: a named production shape with random weights (``real.shape_model``), its routing
forced from a recorded trace, so real copies and real compute run at the model's size. Every figure is
the median of interleaved repeats (``real.bench.engine_runs``)."""
from __future__ import annotations

from pathlib import Path

from offload.session import RunSettings
from policies.registry import resolve_policy
from real.bench.args import PolicyParams
from real.bench.engine_runs import EngineRuns, TokenCheck, figures, measure_session, run_problems
from real.bench.table import NoiseFiles, correctness_table, engine_row, engine_table, print_rows
from real.engine import OffloadEngine
from real.measurement import Config, Report
from traces import ModelShape, Trace

TRAIN_FRACTION = 0.25       # as the sweep: the leading quarter of requests trains static/affinity, the rest replay
PRINTED = ["policy", "cache_slots", "tokens_per_s", "spread_pct", "runs", "outliers", "outlier_causes", "hit_rate"]


def replay_slices(trace: Trace, shape: ModelShape, max_tokens: int | None, path,
                  warmup_tokens: int | None = None) -> tuple[Trace, Trace]:
    """(train, replayed): the leading ``TRAIN_FRACTION`` of ``trace``'s requests, then the rest up to
    ``max_tokens`` tokens (whole requests; None: all of it). Raises ValueError naming ``path`` when the trace is for another
    shape (layers, experts or top-k: the forced routing gives each step the trace's top-k experts, and the
    model's graphs combine its own top-k), has fewer than two requests, or holds fewer tokens after its
    training slice than ``max_tokens`` (or ``warmup_tokens``) asks to time: a run would time fewer tokens than
    its row records."""
    recorded = (trace.model.num_layers, trace.model.num_experts, trace.model.top_k)
    if recorded != (shape.num_layers, shape.num_experts, shape.top_k):
        raise ValueError(f"{path}: recorded for {trace.model.name} ({trace.model.num_layers} layers, top-"
                         f"{trace.model.top_k} of {trace.model.num_experts} experts), not {shape.name} "
                         f"({shape.num_layers} layers, top-{shape.top_k} of {shape.num_experts} experts); pass a "
                         f"trace of that shape, or drop --shape to replay the trace's own")
    if trace.num_requests < 2:
        raise ValueError(f"{path}: {trace.num_requests} request; replay needs two or more (a training slice "
                         f"and the replayed rest)")
    train, rest = trace.split(TRAIN_FRACTION)
    for option, wanted in (("--max-tokens", max_tokens), ("--warmup-tokens", warmup_tokens)):
        if wanted is not None and wanted > rest.num_tokens:
            raise ValueError(f"{path}: holds {rest.num_tokens} tokens after its training slice (the first "
                             f"{train.num_requests} of {trace.num_requests} requests), fewer than {option} "
                             f"{wanted}; ask for at most {rest.num_tokens}, or record a longer trace")
    return train, rest if max_tokens is None else rest.head_tokens(max_tokens)


def shape_replay(model, shape: ModelShape, train: Trace, trace: Trace, policies: list[str], slots: list[int],
                 max_tokens: int, out: Path, repeats: int = 5, warmup_tokens: int | None = None,
                 deadline_s: float | None = None, started: float | None = None,
                 settings: dict | None = None,
                 policy_params: PolicyParams = PolicyParams()) -> tuple[Report, list[str]]:
    """Every policy at every cache size replays the first ``max_tokens`` steps of ``trace`` on ``model``
    (``warmup_tokens`` per warm-up pass, default the same), ``train`` being the slice ``static`` and
    ``affinity`` learn from; ``repeats`` interleaved runs each (``measure_session``). A policy given
    ``policy_params`` (--policy-param) runs with them, its rows named with them (``PolicyParams.label``); the
    others at their defaults, under their names. Writes, after every run, one OUT/engine.csv row per
    configuration (mode ``shape-replay``: the median and its spread, runs and outliers) after the rows already
    there, one OUT/correctness.csv row (its runs checked, identical to the reference, the first lossless run's
    tokens), and the session ``replay-<shape>`` of OUT's noise files (``settings`` recorded there). Every measured run's tokens are checked: a lossless policy's must equal
    the first lossless run's (the routing is forced, so every lossless run decodes the same tokens).
    Returns (the report, one line per failed run or lossless mismatch)."""
    classes = {p: resolve_policy(p) for p in policies}
    # a configuration's policy column: the policy's label, its name where it is given no parameters
    configs = [Config({"mode": "shape-replay", "policy": policy_params.label(p), "cache_slots": s})
               for p in policies for s in slots]
    check = TokenCheck({c.label: classes[policy_params.policy(c.fields["policy"])].lossless for c in configs})

    def engine_for(c: Config) -> OffloadEngine:
        policy = policy_params.policy(c.fields["policy"])
        return OffloadEngine(model, shape, classes[policy],
                             RunSettings(cache_slots=c.fields["cache_slots"], policy_params=policy_params.of(policy)),
                             future=trace, train_trace=train)

    runs = EngineRuns(model, shape, engine_for=engine_for,
                      decode=lambda engine, warmup: engine.replay(trace, (warmup_tokens or max_tokens) if warmup
                                                                  else max_tokens),
                      check=check)
    table = engine_table(out)
    files = NoiseFiles(out, f"replay-{shape.name}", settings or {})

    def rows(report: Report) -> list[dict]:
        found = figures(report)
        return [engine_row(shape.name, "shape-replay", c.fields["policy"], c.fields["cache_slots"], found[c.label])
                for c in configs if c.label in found]

    correctness = correctness_table(out)

    def checked(report: Report) -> list[dict]:
        """correctness.csv's rows: per configuration measured so far, its runs checked against the first
        lossless run's tokens (``check.source``) and how many were identical."""
        measured = {r["config"] for r in report.rows}
        return [{"mode": "shape-replay", "model": shape.name, "policy": c.fields["policy"],
                 "cache_slots": c.fields["cache_slots"],
                 **check.columns(c.label, report, "identical_to_reference", named=True)}
                for c in configs if c.label in measured]

    def progress(report: Report) -> None:
        files.write(report)
        table.replace(rows(report))
        correctness.replace(checked(report))

    report = measure_session(runs, configs, repeats, progress, deadline_s, started, errors_to=out)
    print_rows(rows(report), PRINTED)
    return report, run_problems(report) + check.mismatches(report)
