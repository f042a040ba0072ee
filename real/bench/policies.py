"""Every policy at every cache size, measured in the engine beside the simulator's prediction of the same
recorded decode, the same training slice and the same hardware profile; lossy policies also get their
accuracy cost on held-out text."""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from hardware.profile import HardwareProfile
from offload.metrics import tpot_summary
from offload.predictors import policy_depth
from offload.session import RunSettings
from policies.lru import LRU
from policies.registry import resolve_policy
from real.bench.recording import recorded_on
from real.bench.table import CsvTable, engine_row, engine_table
from real.bench.text import decode_mask
from real.engine import OffloadEngine
from real.record import routing_trace
from traces import ModelShape, Trace, save_trace

SUMMARY_COLUMNS = ["policy", "cache_slots", "tokens_per_s", "sim_tokens_per_s", "hit_rate", "sim_hit_rate", "lossy",
                   "held_out_perplexity", "top1_agreement"]


@dataclass(frozen=True)
class PolicyRuns:
    """What to measure: ``policies`` (registry names, ``file.py:Class`` or ``module:Class``) at every
    ``cache_slots`` (expert slots per layer); ``precision`` of the experts and ``prefetch_depth``
    (layers ahead) as ``offload.session.RunSettings`` takes them; ``timed_policy`` at the smallest size
    also records layer timings and copy start/end."""
    policies: tuple[str, ...]
    cache_slots: tuple[int, ...]
    precision: str = "bf16"
    prefetch_depth: int = 1
    timed_policy: str = "lru"

    def settings(self, slots: int) -> RunSettings:
        return RunSettings(cache_slots=slots, precision=self.precision, prefetch_depth=self.prefetch_depth)


# The simulator's prediction of one run: ``simulate(policy_cls, settings)`` returns an object with
# ``token_ns`` (per step, ns) and ``metrics["hit_rate"]``, as ``sim.simulator.simulate`` does. It is passed
# in because real/ never imports sim/: the commands, a floor above both, bind it to the recorded trace,
# the profile and the training slice.
Simulate = Callable[[type, RunSettings], Any]


def measure_policies(host, shape: ModelShape, name: str, recorded: Trace, train: Trace,
                     reference_tokens: list[list[int]], runs: PolicyRuns, hardware: HardwareProfile,
                     predictors_at: Callable[[int], dict], scored: list[list[int]], out: Path,
                     simulate: Simulate) -> list[str]:
    """Run ``runs`` on ``host`` (a ``real.model.MoEModel`` with its experts on the host) over
    ``recorded``'s prompts (``real.bench.recording``), with ``recorded`` as the future the bounds read and
    ``train`` as the slice ``static`` and ``affinity`` learn from; ``simulate`` predicts each run, and must
    replay ``recorded`` (with its prediction tracks) on ``hardware`` with the same ``train``. Writes, after every size,
    OUT/policies.csv (engine beside simulator), rows to OUT/engine.csv and OUT/correctness.csv (whether a
    run's tokens equal ``reference_tokens``, the fully-on-GPU model's), and the timed run as
    OUT/<name>-<policy>-<slots>-timed.npz. ``scored``: held-out token windows for lossy policies'
    perplexity and top-1 agreement. A policy that fails is reported with its traceback and the others
    still run; returns the names of those that failed."""
    out = Path(out)
    prompts, new_tokens = recorded.meta.extra["prompts"], recorded.meta.extra["new_tokens"]
    engines, correctness = engine_table(out), CsvTable(out / "correctness.csv", keep=True)
    summary = CsvTable(out / "policies.csv", keep=False)
    mask = decode_mask(recorded, prompts)
    smallest = min(runs.cache_slots)

    def engine(policy_cls, slots: int, predictors=None, future=None, timed: bool = False) -> OffloadEngine:
        if host.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(host.device)
        return OffloadEngine(host, shape, policy_cls, runs.settings(slots), hardware=hardware, future=future,
                             train_trace=train, predictors=predictors, record_layer_timings=timed)

    reference = OffloadEngine(host, shape, LRU, RunSettings(cache_slots=shape.num_experts)).score(scored)
    lossless_accuracy = {"perplexity": reference["perplexity"], "top1_agreement": 1.0}

    def measure(policy: str) -> None:
        policy_cls = resolve_policy(policy)
        predictors = predictors_at(policy_depth(policy_cls, runs.prefetch_depth))
        accuracy = lossless_accuracy
        if not policy_cls.lossless:   # the accuracy cost: the cache does not change what runs
            lossy = engine(policy_cls, shape.num_experts, predictors).score(scored)
            accuracy = {"perplexity": lossy["perplexity"], "top1_agreement": float(np.mean(
                np.asarray(lossy["argmax"]) == np.asarray(reference["argmax"])))}
        for slots in runs.cache_slots:
            timed = policy == runs.timed_policy and slots == smallest
            r = engine(policy_cls, slots, predictors, future=recorded, timed=timed).generate(prompts, new_tokens)
            if timed:   # an offloaded run's copies, stalls and layer times, as a trace
                save_trace(routing_trace(r, shape, source=f"real.bench.policies, model {name}",
                                         recorded_on=recorded_on(host.device),
                                         description=f"greedy decode, policy {policy}, {slots} slots per layer, "
                                                     "layer timings and copy start/end recorded"),
                           out / f"{name}-{policy}-{slots}-timed.npz")
            identical = r.generated == reference_tokens
            correctness.add({"policy": policy, "cache_slots": slots, "lossless": policy_cls.lossless,
                             "identical_to_fully_on_gpu": identical})
            engines.add(engine_row(name, "live", policy, slots, r.metrics))
            sim = simulate(policy_cls, runs.settings(slots))
            sim_decode = tpot_summary(np.asarray(sim.token_ns)[mask])   # the steps the engine timed
            summary.add({"policy": policy, "cache_slots": slots, "tokens_per_s": r.metrics["tokens_per_s"],
                         "sim_tokens_per_s": sim_decode["tokens_per_s"], "hit_rate": r.metrics["hit_rate"],
                         "sim_hit_rate": sim.metrics["hit_rate"], "lossy": not policy_cls.lossless,
                         "identical_tokens": identical, "held_out_perplexity": accuracy["perplexity"],
                         "top1_agreement": accuracy["top1_agreement"], "tpot_ms_mean": r.metrics["tpot_ms_mean"],
                         "sim_tpot_ms_mean": sim_decode["tpot_ms_mean"], "bytes_moved": r.metrics["bytes_moved"],
                         "prefetch_depth": runs.prefetch_depth, "model": name, "precision": runs.precision})

    failed = []
    for policy in runs.policies:
        try:
            measure(policy)
        except Exception:       # one policy's failure must not lose the others' measurements
            traceback.print_exc()
            failed.append(policy)
    if summary.rows:
        print(pd.DataFrame(summary.rows)[SUMMARY_COLUMNS].to_string(index=False), flush=True)
    return failed
