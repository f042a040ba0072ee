"""Measure every policy at every cache size in the engine and predict each with the simulator, on one
recorded decode (``python -m experiments.record``) with this machine's hardware profile.

    python -m experiments.measure_policies --model DIR --trace OUT/<name>-trace.npz \
        --train-trace OUT/<name>-train-trace.npz --hardware OUT/h200-measured.yaml --out OUT \
        [--gate GATE_DIR] [--policies lru,belady,...] [--policy-param oracle.cross_tokens=false ...] \
        [--slots 2,4,6] [--depth 3] [--vector-tokens 4096] [--repeats 5] [--deadline-s S]

The engine decodes the recording's prompts; the bounds read the recording as their future; ``static``
and ``affinity`` learn from the training slice in both clocks. Live predictors, those the asked policies
consult: the pre-gate, the quasi-hidden pre-gate (default vectors from ``--vector-tokens`` training-split
tokens, captured only when a policy consults it) and, with ``--gate`` (``python -m experiments.train_gate``),
the lookahead gate; their tracks on the recording's hidden states are what the simulator replays.

Every engine figure is the median of --repeats runs (default 5; 1: one cold run each, for smoke use),
interleaved round-robin across every (policy, cache size) and the all-resident engine, after untimed
warm-up passes, with the discipline of ``real.measurement``. Writes OUT/policies.csv (each figure with its
spread, runs, outliers and their causes, beside the simulator's), rows of OUT/engine.csv (the all-resident
engine and every policy) and OUT/correctness.csv (every measured run's tokens against the fully-resident
tokens the recording holds), the session ``live-<name>`` of OUT/noise_runs.csv, OUT/noise_floor.csv and
OUT/noise_sessions.json (``python -m experiments.noise --report OUT`` prints them), the timed run's trace
and OUT/resolved_config-measure_policies.yaml. Every value is checked before anything is measured. A
policy that fails, or a lossless one whose tokens differ, ends the command with exit code 1 and one line
each, after every table is written.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from experiments.config import policy_label
from hardware.profile import load_hardware
from real.bench.args import (add_measurement_args, load_model_checkpoint, add_model_args, check_model_args, check_slots, check_text, existing_dir, existing_file,
                             add_policy_param_arg, check_policy_params, hardware_profile, non_negative_int, policy_list,
                             positive_int, resolved, slot_list)
from experiments.interrupts import sigterm_as_interrupt
from real.bench.engine_runs import exit_message, interrupt_exits
from real.bench.policies import PolicyRuns, measure_policies
from real.bench.predictor_suite import live_predictors
from real.bench.recording import recording_prompts
from real.bench.table import write_resolved_config
from real.bench.text import score_sequences
from real.corpus import DEFAULT_CORPUS_DIR
from real.hidden_capture import capture_hidden_states
from real.lookahead_gate import LookaheadGate
from real.model import MoEModel
from real.predictors import default_vectors
from real.tracks import compute_tracks, recorded_tokens
from sim.simulator import simulate
from traces import TraceError, load_trace
from validation.sim_side import fallback_note

DEFAULT_POLICIES = "lru,lfu,belady,oracle,mixtral-offloading,speculating-experts,speculating-experts-lossy"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--trace", required=True, type=existing_file, help="a recording of experiments.record")
    p.add_argument("--train-trace", required=True, type=existing_file, help="its training slice")
    p.add_argument("--gate", type=existing_dir, help="a lookahead gate for the lookahead policy")
    p.add_argument("--hardware", type=hardware_profile, default="h100-pcie5",
                   help="profile name or YAML (experiments.profile measures this GPU's)")
    p.add_argument("--policies", type=policy_list, default=DEFAULT_POLICIES)
    add_policy_param_arg(p)
    p.add_argument("--slots", type=slot_list, default="2,3,4,6")
    p.add_argument("--depth", type=positive_int, default=3, help="predictors look this many layers ahead")
    p.add_argument("--vector-tokens", type=positive_int, default=4096,
                   help="training-split tokens the quasi-hidden pre-gate's default vectors average")
    p.add_argument("--corpus", type=existing_dir, default=str(DEFAULT_CORPUS_DIR))
    p.add_argument("--score-seqs", type=positive_int, default=4, help="held-out windows for lossy policies' accuracy")
    p.add_argument("--score-len", type=positive_int, default=128)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--timed-policy", default="lru",
                   help="its run at the smallest --slots also records layer timings and copy start/end")
    add_measurement_args(p)
    args = p.parse_args(argv)
    check_model_args(p, args)
    check_text(p, args)
    config = args.config
    error = check_slots(args.slots, config.top_k, config.num_experts, args.model)
    if error:
        p.error(error)
    if args.gate is not None and args.depth > config.num_layers - 1:    # a gate predicts a layer ahead at most L-1
        p.error(f"--depth {args.depth}: {args.model} has {config.num_layers} layers, so a gate looks at most "
                f"{config.num_layers - 1} layer(s) ahead; use --depth 1..{config.num_layers - 1}")
    try:
        args.recorded, args.train = load_trace(args.trace), load_trace(args.train_trace)
        recording_prompts(args.recorded, args.trace)
        if recorded_tokens(args.recorded, args.trace).num_tokens != args.recorded.num_tokens:
            raise ValueError(f"{args.trace}: hidden states for {len(args.recorded.hidden_token_index)} of "
                             f"{args.recorded.num_tokens} steps; the tracks need every step: record with "
                             f"python -m experiments.record")
    except (TraceError, ValueError) as e:
        p.error(str(e))
    for path, trace in ((args.trace, args.recorded), (args.train_trace, args.train)):
        s = trace.model
        if (s.num_layers, s.num_experts, s.top_k) != (config.num_layers, config.num_experts, config.top_k):
            p.error(f"{path}: recorded with {s.num_layers} layers, top-{s.top_k} of {s.num_experts} experts, "
                    f"not {args.model}'s; record it with that checkpoint")
    check_policy_params(p, args, args.policies, policy_label, config.to_model_shape(args.name), min(args.slots),
                        args.depth, args.recorded, args.train)
    needs_gate = [n for n in args.policies if args.policy_params.predictor(n) == "lookahead"]
    if needs_gate and args.gate is None:
        p.error(f"--policies {','.join(needs_gate)}: consults the lookahead gate; pass --gate GATE_DIR "
                f"(python -m experiments.train_gate)")
    return args


def main(argv=None) -> list[str]:
    started = time.monotonic()
    args = parse_args(argv)
    with interrupt_exits(args.out), sigterm_as_interrupt():
        return _measure(args, started)


def _measure(args, started: float) -> list[str]:
    args.out.mkdir(parents=True, exist_ok=True)
    config_out = {k: v for k, v in resolved(args).items() if k not in ("recorded", "train")}
    write_resolved_config(args.out, "measure_policies", config_out)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    reference_tokens = recording_prompts(args.recorded, args.trace)[2]
    config, tensors = load_model_checkpoint(args, dtype)
    shape = config.to_model_shape(args.name)
    host = MoEModel(config, tensors, device=device, dtype=dtype, experts_device="cpu")
    del tensors
    gate = LookaheadGate.load(args.gate, host, device) if args.gate else None
    if gate is not None and gate.depth < args.depth:
        raise SystemExit(f"error: {args.gate}: the gate looks {gate.depth} layer(s) ahead, not --depth {args.depth}; "
                         f"pass --depth {gate.depth}, or retrain it with --depth {args.depth}")
    names = args.policy_params.consulted(args.policies)        # only what the asked policies consult is built
    vectors = default_vectors(host, capture_hidden_states(args.model, args.vector_tokens, args.corpus,
                                                          device=str(device), dtype=dtype, seed=args.seed)
                              ) if "quasi" in names else None
    predictors_at = live_predictors(host, vectors, gate, args.depth, names)
    tracked, _ = compute_tracks(args.recorded, predictors_at(args.depth), args.depth, str(args.trace))
    hardware = load_hardware(args.hardware)
    note = fallback_note(hardware, shape, args.precision)
    if note:        # its simulator column: say which model it is, as the sweep and validate do
        print(f"note: sim_tokens_per_s: {note}; or pass --hardware OUT/<gpu>-measured.yaml", file=sys.stderr,
              flush=True)
    tok, domains = args.text
    runs = PolicyRuns(args.policies, args.slots, args.precision, args.depth, args.timed_policy, args.repeats,
                      args.policy_params)
    problems = measure_policies(host, shape, args.name, tracked, args.train, reference_tokens, runs, hardware,
                                predictors_at, score_sequences(tok, domains, args.score_seqs, args.score_len),
                                args.out, lambda cls, settings: simulate(tracked, cls, hardware, settings,
                                                                         train_trace=args.train),
                                args.deadline_s, started, config_out)
    if problems:
        raise SystemExit(exit_message(problems, args.out))
    return problems


if __name__ == "__main__":
    main()
