"""Every policy at every cache size, measured in the engine beside the simulator's prediction of the same
recorded decode, the same training slice and the same hardware profile; lossy policies also get their
accuracy cost on held-out text. Every engine figure is the median of interleaved repeats
(``real.bench.engine_runs``), the all-resident engine measured in the same rounds as the reference."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hardware.profile import HardwareProfile
from offload.metrics import tpot_summary
from offload.predictors import policy_depth
from offload.session import RunSettings
from policies.lru import LRU
from policies.registry import RUN_FAILURES, resolve_policy
from real.bench.args import PolicyParams
from real.bench.engine_runs import (FIGURE_COLUMNS, EngineRuns, TokenCheck, error_files, figures, generated_steps,
                                    measure_session, run_problems)
from real.bench.recording import recorded_on, warm_engine
from real.bench.table import (IDENTICAL_COLUMN, NoiseFiles, correctness_table, engine_row, engine_table, measured_under,
                              policies_table, print_rows)
from real.bench.text import decode_mask
from real.engine import OffloadEngine
from real.measurement import Config, Report
from real.record import routing_trace
from traces import ModelShape, Trace, save_trace

SUMMARY_COLUMNS = ["policy", "cache_slots", "tokens_per_s", "spread_pct", "runs", "outliers", "sim_tokens_per_s",
                   "hit_rate", "hit_rate_all_steps", "sim_hit_rate_all_steps", "lossy", "identical_tokens", "held_out_perplexity", "top1_agreement"]
ALL_RESIDENT = "engine-all-resident"


@dataclass(frozen=True)
class PolicyRuns:
    """What to measure: ``policies`` (registry names, ``file.py:Class`` or ``module:Class``) at every
    ``cache_slots`` (expert slots per layer), ``repeats`` interleaved runs each (1: the smoke fast path,
    ``real.bench.engine_runs.discipline``); ``precision`` of the experts and ``prefetch_depth`` (layers
    ahead) as ``offload.session.RunSettings`` takes them; ``timed_policy`` at the smallest size also runs
    once more, untimed by the figures, recording layer timings and copy start/end; ``policy_params``: the
    parameters given to a policy (--policy-param; the others run at their defaults), which every engine and
    simulation of that policy gets and its rows name (``PolicyParams.label``)."""
    policies: tuple[str, ...]
    cache_slots: tuple[int, ...]
    precision: str = "bf16"
    prefetch_depth: int = 1
    timed_policy: str = "lru"
    repeats: int = 5
    policy_params: PolicyParams = PolicyParams()

    def settings(self, slots: int, policy: str | None = None) -> RunSettings:
        """The runs' settings at ``slots``, with ``policy``'s parameters (none without a policy)."""
        return RunSettings(cache_slots=slots, precision=self.precision, prefetch_depth=self.prefetch_depth,
                           policy_params=self.policy_params.of(policy))


# The simulator's prediction of one run: ``simulate(policy_cls, settings)`` returns an object with
# ``token_ns`` (per step, ns) and ``metrics["hit_rate"]``, as ``sim.simulator.simulate`` does. It is passed
# in because real/ never imports sim/: the commands, a floor above both, bind it to the recorded trace,
# the profile and the training slice.
Simulate = Callable[[type, RunSettings], Any]


def measure_policies(host, shape: ModelShape, name: str, recorded: Trace, train: Trace,
                     reference_tokens: list[list[int]], runs: PolicyRuns, hardware: HardwareProfile,
                     predictors_at: Callable[[int], dict], scored: list[list[int]], out: Path,
                     simulate: Simulate, deadline_s: float | None = None, started: float | None = None,
                     settings: dict | None = None) -> list[str]:
    """Run ``runs`` on ``host`` (a ``real.model.MoEModel`` with its experts on the host) over
    ``recorded``'s prompts (``real.bench.recording``), with ``recorded`` as the future the bounds read and
    ``train`` as the slice ``static`` and ``affinity`` learn from; ``simulate`` predicts each run, and must
    replay ``recorded`` (with its prediction tracks) on ``hardware`` with the same ``train``.

    One measurement session (``measure_session``; ``deadline_s`` after ``started`` as it takes them)
    interleaves every (policy, cache size) and the all-resident engine (every expert in its slot: the
    engine's speed without a copy). After every run it rewrites OUT/policies.csv (engine beside simulator:
    the median tokens/s with its spread, runs and outliers), this session's rows of OUT/engine.csv and
    OUT/correctness.csv (after the rows already there), and the session ``live-<name>`` of OUT's noise files
    (``settings`` recorded there). Every measured run's tokens are checked against ``reference_tokens`` (the
    fully-resident model's): correctness.csv counts the runs checked and identical per configuration. The
    timed run goes to OUT/<name>-<policy>-<slots>-timed.npz. ``scored``: held-out token windows for lossy
    policies' perplexity and top-1 agreement. A policy that fails is reported in one line with its file, line
    and hook, its traceback in OUT/errors (``error_files``), and the others still run. Returns one line per
    problem: a policy that failed before its runs, a configuration whose runs raised, a lossless configuration
    whose tokens differ from the reference.

    Every row of engine.csv, correctness.csv and policies.csv carries the columns of ``settings`` (the command's
    resolved config; ``real.bench.table.measured_under``): a row is replaced only by its configuration measured
    under the same settings, and one finished under them with the same engine code is not measured again
    (``measure_session``'s resume). ``hit_rate`` counts the generated tokens' steps (those tokens/s counts),
    ``hit_rate_all_steps`` and ``sim_hit_rate_all_steps`` every step (the simulator replays the prompt steps
    too)."""
    with measured_under(settings) if settings is not None else nullcontext():
        return _measure_policies(host, shape, name, recorded, train, reference_tokens, runs, hardware, predictors_at,
                                 scored, Path(out), simulate, deadline_s, started, settings)


def _measure_policies(host, shape: ModelShape, name: str, recorded: Trace, train: Trace,
                      reference_tokens: list[list[int]], runs: PolicyRuns, hardware: HardwareProfile,
                      predictors_at: Callable[[int], dict], scored: list[list[int]], out: Path,
                      simulate: Simulate, deadline_s: float | None, started: float | None,
                      settings: dict | None) -> list[str]:
    prompts, new_tokens = recorded.meta.extra["prompts"], recorded.meta.extra["new_tokens"]
    mask = decode_mask(recorded, prompts)
    smallest = min(runs.cache_slots)

    def engine(policy: str, policy_cls, slots: int, predictors=None, future=None,
               timed: bool = False) -> OffloadEngine:
        if host.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(host.device)
        return OffloadEngine(host, shape, policy_cls, runs.settings(slots, policy), hardware=hardware,
                             future=future, train_trace=train, predictors=predictors, record_layer_timings=timed)

    reference = OffloadEngine(host, shape, LRU, RunSettings(cache_slots=shape.num_experts)).score(scored)
    lossless_accuracy = {"perplexity": reference["perplexity"], "top1_agreement": 1.0}

    # Before anything is timed: each policy's class, predictors, accuracy and the simulator's predictions, keyed
    # by the policy's label (its name, with the parameters given to it), the name its rows carry.
    label = runs.policy_params.label
    prepared: dict[str, tuple[type, dict | None, dict]] = {}
    predicted: dict[tuple[str, int], tuple[dict, float]] = {}
    problems = []
    for policy in runs.policies:
        try:
            policy_cls = resolve_policy(policy)
            predictors = predictors_at(policy_depth(policy_cls, runs.prefetch_depth))
            accuracy = lossless_accuracy
            if not policy_cls.lossless:   # the accuracy cost: the cache does not change what runs
                lossy = engine(policy, policy_cls, shape.num_experts, predictors).score(scored)
                accuracy = {"perplexity": lossy["perplexity"], "top1_agreement": float(np.mean(
                    np.asarray(lossy["argmax"]) == np.asarray(reference["argmax"])))}
            for slots in runs.cache_slots:
                sim = simulate(policy_cls, runs.settings(slots, policy))
                predicted[label(policy), slots] = (tpot_summary(np.asarray(sim.token_ns)[mask]),  # the steps timed
                                                   sim.metrics["hit_rate"])
            prepared[label(policy)] = policy_cls, predictors, accuracy
        except RUN_FAILURES as err:    # one policy's failure must not lose the others' measurements
            line = error_files(out)(Config({"step": "prepare", "policy": policy}), err)
            problems.append(f"{label(policy)} failed before its runs ({line})")
            print(f"error: {problems[-1]}", flush=True)

    configs = [Config({"mode": ALL_RESIDENT, "policy": "static", "cache_slots": shape.num_experts})] + [
        Config({"mode": "live", "policy": p, "cache_slots": s}) for p in prepared for s in runs.cache_slots]

    def engine_for(config: Config) -> OffloadEngine:
        if config.fields["mode"] == ALL_RESIDENT:
            return warm_engine(host, shape, train, future=recorded)
        policy_cls, predictors, _ = prepared[config.fields["policy"]]
        return engine(runs.policy_params.policy(config.fields["policy"]), policy_cls, config.fields["cache_slots"],
                      predictors, future=recorded)

    lossless = {c.label: c.fields["mode"] == ALL_RESIDENT or prepared[c.fields["policy"]][0].lossless
                for c in configs}
    check = TokenCheck(lossless, reference_tokens)
    run = EngineRuns(host, shape, engine_for,
                     decode=lambda e, warmup: e.generate(prompts[:1] if warmup else prompts, new_tokens),
                     timed=generated_steps(prompts, new_tokens), check=check)
    engines, summary, correctness = engine_table(out), policies_table(out), correctness_table(out)
    files = NoiseFiles(out, f"live-{name}", settings or {})

    def progress(report: Report) -> None:
        files.write(report)
        found = figures(report)
        measured = [c for c in configs if c.label in found]
        engines.replace([engine_row(name, c.fields["mode"], c.fields["policy"], c.fields["cache_slots"],
                                    found[c.label]) for c in measured])
        correctness.replace([{"mode": c.fields["mode"], "policy": c.fields["policy"], "cache_slots": c.fields["cache_slots"],
                              **check.columns(c.label, report, IDENTICAL_COLUMN)} for c in measured])
        summary.replace([_summary(c, found[c.label], report, predicted, prepared, runs, name)
                         for c in measured if c.fields["mode"] == "live"])

    report = measure_session(run, configs, runs.repeats, progress, deadline_s, started, errors_to=out)
    problems += run_problems(report) + check.mismatches(report)
    resident = [r for r in engines.rows[len(engines.kept):] if r["mode"] == ALL_RESIDENT]
    print_rows(resident, ["model", "mode", "cache_slots", "tokens_per_s", "spread_pct", "runs", "outliers",
                          "outlier_causes"])
    print_rows(summary.rows[len(summary.kept):], SUMMARY_COLUMNS)

    timed = label(runs.timed_policy)
    if timed in prepared:       # an offloaded run's copies, stalls and layer times, as a trace
        policy_cls, predictors, _ = prepared[timed]
        try:
            r = engine(runs.timed_policy, policy_cls, smallest, predictors, future=recorded, timed=True
                       ).generate(prompts, new_tokens)
            save_trace(routing_trace(r, shape, source=f"real.bench.policies, model {name}",
                                     recorded_on=recorded_on(host.device),
                                     description=f"greedy decode, policy {timed}, {smallest} slots per "
                                                 "layer, layer timings and copy start/end recorded"),
                       out / f"{name}-{runs.timed_policy}-{smallest}-timed.npz")
        except RUN_FAILURES as err:
            failed = Config({"step": "timed", "policy": runs.timed_policy, "cache_slots": smallest})
            line = error_files(out)(failed, err)
            problems.append(f"the timed run of {timed} at {smallest} slots failed ({line})")
            print(f"error: {problems[-1]}", flush=True)
    return problems


def _checked(label: str, report: Report) -> list[dict]:
    return [r for r in report.rows if r["config"] == label and not r["error"]]


def _summary(config: Config, found: dict, report: Report, predicted: dict, prepared: dict, runs: PolicyRuns,
             name: str) -> dict:
    """A policies.csv row: the engine's figures beside the simulator's prediction and the accuracy."""
    policy, slots = config.fields["policy"], config.fields["cache_slots"]
    policy_cls, _, accuracy = prepared[policy]
    sim_decode, sim_hit_rate = predicted[policy, slots]
    checked = _checked(config.label, report)
    return {"policy": policy, "cache_slots": slots, "tokens_per_s": found["tokens_per_s"],
            **{k: found[k] for k in FIGURE_COLUMNS},
            "sim_tokens_per_s": sim_decode["tokens_per_s"], "hit_rate": found["hit_rate"],
            "hit_rate_all_steps": found["hit_rate_all_steps"], "sim_hit_rate_all_steps": sim_hit_rate,
            "failed": found["failed"], "error": found["error"],
            "lossy": not policy_cls.lossless,
            "identical_tokens": all(r["identical_tokens"] for r in checked) if checked else None,
            "held_out_perplexity": accuracy["perplexity"], "top1_agreement": accuracy["top1_agreement"],
            "tpot_ms_mean": found["tpot_ms_mean"], "sim_tpot_ms_mean": sim_decode["tpot_ms_mean"],
            "bytes_moved": found["bytes_moved"], "prefetch_depth": runs.prefetch_depth, "model": name,
            "precision": runs.precision}
