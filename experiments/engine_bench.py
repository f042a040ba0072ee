"""Every engine measurement of this machine in one process, the results the simulator is checked against.

    # a trained (or any HF Mixtral / Qwen-MoE / OLMoE) checkpoint, live routing
    python -m experiments.engine_bench live --model DIR --out experiments/results/h200
    # random weights of a trace's own shape, its routing forced (gpt-oss-20b: 38 GB of bf16 experts)
    python -m experiments.engine_bench replay --trace traces/samples/gpt-oss-20b-sample.npz --out OUT/replay
    # smoke use: one run per configuration, no warm-up
    python -m experiments.engine_bench replay --trace T.npz --out OUT --repeats 1

Every engine figure (tokens/s) is the median of --repeats runs (default 5) measured with the discipline
of ``real.measurement``: untimed warm-up passes until the per-step time is steady, the runs interleaved
round-robin across the configurations of a session with the order rotated each round, and every run's
host calibration, GPU clocks, garbage collections, steal time and halves drift recorded. Beside each
figure the tables say its spread ((max - min) / median), the runs, the outliers and their causes; the
noise floor of every session goes to OUT/noise_floor.csv, its runs to OUT/noise_runs.csv and its
settings to OUT/noise_sessions.json (``python -m experiments.noise --report OUT`` prints them). Every
measured run's tokens are checked: a lossless policy's must equal the fully-resident model's (``live``) or
the first lossless run's (``replay``, whose routing is forced); a mismatch, or a run that raised, ends the
command with exit code 1 and one line per configuration, after every table is written.

``live`` runs, in order, what the separate commands run one at a time (``experiments.references``,
``record``, predictor training as ``train_gate`` and ``make_tracks`` do it, and ``measure_policies``),
calling the same library functions (``real.bench``) and sharing the model and the recordings between the
steps: the fully-resident reference (every expert on the compute device; a session of its own,
``references-<name>``; OUT/engine.csv) and HF parity (OUT/hf_parity.json), the recorded decode with its
tracks and the training slice (OUT/<name>-trace.npz, OUT/<name>-train-trace.npz, OUT/correctness.csv), the
predictors the asked policies consult, trained and scored (OUT/gate_recall.csv, the lookahead gate in
--work; none for policies that consult none, such as lru,belady; every predictor and the offline context
gate with --recall), this machine's profile calibrated as ``experiments.validate``
calibrates (``validation.profile_fit.calibrate_and_fit``: the copy table, the kernels, hit/miss patterns,
a live decode of training text and every asked policy's own host work and per-layer cost beside LRU's;
OUT/<gpu>-measured.yaml, or cpu-measured.yaml, with OUT/calibration.json and OUT/profile_fit_notes.json), and every policy at every cache size in the engine, with the
all-resident engine in the same rounds (session ``live-<name>``; OUT/engine.csv, OUT/correctness.csv), and
in the simulator (OUT/policies.csv). ``replay`` replays a trace's requests after its leading quarter, which
is the training slice, as the sweep does (session ``replay-<shape>``; OUT/engine.csv). Both write
OUT/resolved_config-engine_bench-<mode>.yaml and check every value before measuring anything.

Settings: every row of OUT/engine.csv and policies.csv (and live's rows of correctness.csv) records the settings
it was measured under: ``settings`` (JSON of every setting but where results go, which configurations, --deadline-s and
--fresh), ``engine_code`` (a digest of the engine's code and real/bench), and columns of their own for device,
dtype, repeats, checkpoint, prompts, prompt_len_tokens, new_tokens, max_tokens, warmup_tokens, trace,
trace_sha256 and shape (those the command has). A row is replaced only by its configuration re-measured under
the same settings; rows of other settings stay beside it; rows written before settings were recorded read
``unrecorded`` there and are kept. ``hit_rate`` and ``misses`` count the steps tokens/s counts (a live run's
generated tokens), ``prompt_hit_rate`` a live run's prompt steps, ``hit_rate_all_steps`` every step (what the
simulator counts on the recorded trace).

Resume: a configuration whose engine.csv row was finished (every --repeats run, none failed) under the same
settings and engine code is skipped, one line each (--fresh measures it again); anything else is measured.
``live`` still records, trains the predictors and calibrates (a skipped fully-resident reference decodes once,
untimed, for its tokens).
Tables are rewritten atomically after every run. The runs of one session are interleaved, so an interrupt
loses the unfinished configurations of the session under way (with --repeats 1, the one in progress).

--deadline-s S (seconds from the command's start) is checked before every configuration's warm-up (none
starts that would end past S at the pace of the warm-up before it; the configurations not warmed up are not
measured), before the first round (none starts once S has passed), before every later round (none starts that
would end past S at the last round's pace) and, in ``live``, before the calibration (past S, the calibration
and every policy are skipped). A warm-up pass or round under way, and live's recording, HF parity and
predictor training, are not cut short. What was skipped is said in one line; what finished is kept; the exit
code stays 0 unless a run failed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from experiments.config import policy_label
from hardware.profile import load_hardware
from offload.session import RunSettings
from real.bench.args import (check_kernel_switches, add_device_arg, load_model_checkpoint, cpu_threads, device_default, add_measurement_args, host_memory_error, DTYPES, add_model_args, add_prompt_args, check_model_args, check_slots,
                             add_policy_param_arg, check_out, check_policy_params, check_text, existing_file, file_name,
                             hardware_profile, non_negative_int, policy_list, positive_float, positive_int, PolicyParams,
                             resolved, slot_list)
from experiments.interrupts import sigterm_as_interrupt
from real.bench.engine_runs import error_files, exit_message, interrupt_exits
from real.bench.policies import PolicyRuns, measure_policies
from real.bench.predictor_suite import LIVE_PREDICTORS, PredictorSettings, train_predictors
from real.bench.recording import record_slices
from real.bench.references import accelerate_offload, hf_parity, measure_fully_resident
from real.bench.replay import replay_slices, shape_replay
from real.bench.table import engine_table, measured_under, write_resolved_config
from real.bench.text import held_out_prompts, score_sequences, train_prompts
from real.lookahead_gate import VAL_TOKENS
from real.model import MoEModel
from real.profile_hw import (profile_name,
                             write_profile)
from real.shape_model import random_model
from sim.simulator import simulate
from validation.profile_fit import calibrate_and_fit
from traces import DEFAULT_TRACE, TraceError, load_shape, load_trace, save_trace
from traces.digest import bytes_sha256
from traces.io import atomic_write


CPU_NOTE = ("on a CPU the engine copies synchronously, which the simulator does not model: its column "
            "(sim_tokens_per_s in policies.csv) and the calibrated profile mean nothing here; this run checks the path")


def live(args) -> list[str]:
    out, work = args.out, args.work or args.out
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    name = args.name
    tok, domains = args.text
    prompts = held_out_prompts(tok, domains, args.prompts, args.prompt_len)
    train_text = train_prompts(tok, domains, args.train_prompts, args.prompt_len)
    config, tensors = load_model_checkpoint(args, dtype)
    shape = config.to_model_shape(name)

    # 1. References: the model fully resident, every expert on the device (upper bound), and its logits
    #    against HF's forward.
    resident = MoEModel(config, tensors, device=device, dtype=dtype)
    resident_tokens, report, problems = measure_fully_resident(resident, name, prompts, args.new_tokens, out,
                                                               args.repeats, args.deadline_s, args.started,
                                                               args.settings)
    if resident_tokens is None and "stopped" in report.info:
        print(f"deadline: stopped before the fully-resident reference's first run; not done: HF parity, the "
              f"recording, the predictors, the calibration and every policy ({out} holds what finished)", flush=True)
        return problems
    if resident_tokens is None:
        raise SystemExit(f"error: the fully-resident reference failed: {'; '.join(problems)}")
    parity = hf_parity(args.model, resident, prompts[0], resident_tokens[0])
    atomic_write(out / "hf_parity.json", lambda f: json.dump(parity, f, indent=1))
    print("hf parity", parity, flush=True)
    del resident
    if cuda:
        torch.cuda.empty_cache()

    # 2. The all-resident engine records the measured decode (its routing is the future the bounds are
    #    given, its hidden states what the predictors are scored on) and the training slice.
    host = MoEModel(config, tensors, device=device, dtype=dtype, experts_device="cpu")
    del tensors
    recorded, train = record_slices(host, shape, name, prompts, train_text, args.new_tokens, resident_tokens, out)

    # 3. Predictors, those the asked policies consult (all of them with --recall): default vectors and the
    #    lookahead gate learn from training-split text; tracks of the recorded (held-out) run let the
    #    simulator replay exactly what the live predictors say.
    names = sorted(LIVE_PREDICTORS if args.recall else args.policy_params.consulted(args.policies))
    if names or args.recall:
        print(f"predictors: {', '.join(names)}" + (" and the offline context gate (--recall)" if args.recall else
                                                   " (those the asked policies consult)"), flush=True)
    else:
        print("predictors: none (no asked policy consults one; --recall trains and scores them all)", flush=True)
    predictors_at, tracked = train_predictors(host, args.model, args.corpus, recorded, args.predictor_settings,
                                              name, out, work, names=names, offline=args.recall)
    save_trace(tracked, out / f"{name}-trace.npz")

    # 4. The hardware profile the simulator uses: this machine calibrated as experiments.validate calibrates
    #    (copies, kernels, hit/miss patterns, a live decode of training text, and each policy's own host work
    #    and per-layer cost beside LRU's, its predictors included), never from the runs it will predict.
    runs = PolicyRuns(args.policies, args.slots, args.precision, args.depth, args.timed_policy, args.repeats,
                      args.policy_params)
    if deadline_passed(args):
        print(f"deadline: {args.deadline_s:.0f} s passed before the calibration; not done: the calibration and every "
              f"policy's runs ({out} holds what finished)", flush=True)
        return problems
    profile, calibration, notes = calibrate_and_fit(
        host, shape, load_hardware(args.hardware), args.profile_name, args.precision, device, args.policies,
        runs.settings, min(args.slots), train, args.depth, predictors_at, train_text, args.new_tokens,
        command="python -m experiments.engine_bench live",
        on_error=error_files(out))
    atomic_write(out / "calibration.json", lambda f: json.dump(calibration, f, default=str))
    atomic_write(out / "profile_fit_notes.json", lambda f: json.dump(notes, f, indent=1, default=str))
    hardware = write_profile(out / f"{args.profile_name}.yaml", profile)
    print(f"profile -> {out / (args.profile_name + '.yaml')}", flush=True)
    estimates = hardware.prefetch_estimates(shape, args.precision)
    print(f"prefetch estimates: expert copy {estimates[0] / 1e3:.1f} us, layer compute {estimates[1] / 1e3:.1f} us",
          flush=True)
    if not cuda:
        print(CPU_NOTE, flush=True)
    if cuda and args.accelerate_gpu_GiB:       # one run: seconds per token
        engine_table(out, args.settings).add({
            "model": name, "mode": f"hf-accelerate-offload-{args.accelerate_gpu_GiB}GiB", "policy": "device_map",
            "cache_slots": -1, "runs": 1,
            **accelerate_offload(args.model, prompts[0], args.new_tokens, args.accelerate_gpu_GiB)})

    # 5. Every policy at every cache size and the all-resident engine, interleaved in one session; each
    #    policy also predicted by the simulator.
    problems += measure_policies(host, shape, name, tracked, train, resident_tokens, runs, hardware, predictors_at,
                                 score_sequences(tok, domains, args.score_seqs, args.score_len), out,
                                 lambda cls, settings: simulate(tracked, cls, hardware, settings, train_trace=train),
                                 args.deadline_s, args.started, args.settings)
    return problems


def deadline_passed(args) -> bool:
    """Whether ``args.deadline_s`` (seconds after ``args.started``, ``time.monotonic``) has passed."""
    return args.deadline_s is not None and time.monotonic() - args.started > args.deadline_s


def replay(args) -> list[str]:
    device = torch.device(args.device)
    model = random_model(args.shape_obj, device, getattr(torch, args.dtype), max_len=args.longest + 1)
    with measured_under(args.settings):     # engine.csv's rows carry the settings; finished ones are skipped
        _, problems = shape_replay(model, args.shape_obj, args.train, args.replayed, list(args.policies),
                                   list(args.slots), args.max_tokens, args.out, args.repeats, args.warmup_tokens,
                                   args.deadline_s, args.started, args.settings, args.policy_params)
    return problems


def code_digest() -> str:
    """The engine code a row is measured with (16 hex): the engine's modules as ``validation.store.engine_code``
    names them, and the measuring functions of ``real/bench``."""
    import hashlib
    from traces.digest import source_sha256
    from validation.store import engine_code
    return hashlib.sha256((engine_code() + source_sha256(("real/bench",))).encode()).hexdigest()[:16]


def _check_live(p: argparse.ArgumentParser, args) -> None:
    check_model_args(p, args)
    check_text(p, args)
    config = args.config
    error = check_slots(args.slots, config.top_k, config.num_experts, args.model)
    if error:
        p.error(error)
    check_policy_params(p, args, args.policies, policy_label, config.to_model_shape(args.name), min(args.slots),
                        args.depth)
    args.profile_name = args.profile_name or (profile_name(torch.cuda.get_device_name()) if args.device == "cuda"
                                              else "cpu-measured")
    args.predictor_settings = PredictorSettings(
        depth=args.depth, gate_train_tokens=args.gate_train_tokens, gate_val_tokens=args.gate_val_tokens,
        vector_tokens=args.vector_tokens, recall_tokens=args.recall_tokens, gate_steps=args.gate_steps,
        gate_rank=args.gate_rank, gate_lr=args.gate_lr, gate_batch=args.gate_batch, seed=args.seed)


def live_predictor_error(policies, params: PolicyParams) -> str | None:
    """Why a shape replay cannot run ``policies`` (those that consult a live predictor with their ``params``: the
    engine runs its predictors on the model's hidden states, which forced routing over random weights does not
    give, and it reads no prediction track), or None."""
    needs = {p: params.predictor(p) for p in policies}
    needs = {p: name for p, name in needs.items() if name is not None}
    if not needs:
        return None
    return (f"--policies {','.join(needs)}: consult{'s' if len(needs) == 1 else ''} a live predictor "
            f"({', '.join(sorted(set(needs.values())))}), which a shape replay cannot run (its forced routing over "
            f"random weights has no hidden states to predict from); measure {'it' if len(needs) == 1 else 'them'} "
            f"with engine_bench live --model CHECKPOINT, or simulate {'it' if len(needs) == 1 else 'them'} on a trace "
            f"with prediction tracks (python -m experiments.sweep trace=traces/moe-lm-h100.npz "
            f"policy={','.join(needs)}; python -m experiments.make_tracks adds them to a recorded trace)")


def _check_replay(p: argparse.ArgumentParser, args) -> None:
    device_default(args)
    cpu_threads(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (a production shape's copies and compute need a GPU; "
                "--device cpu replays a small shape)")
    check_kernel_switches(p, args)
    check_out(p, args.out)
    try:
        trace = load_trace(args.trace)
        args.shape_obj = trace.model if args.shape is None else load_shape(args.shape)
        args.train, args.replayed = replay_slices(trace, args.shape_obj, args.max_tokens, args.trace,
                                                    args.warmup_tokens)
        if args.max_tokens is None:
            args.max_tokens = min(REPLAY_TOKENS, args.replayed.num_tokens)
    except (TraceError, ValueError) as e:
        p.error(str(e))
    error = check_slots(args.slots, args.shape_obj.top_k, args.shape_obj.num_experts, args.shape_obj.name)
    if error:
        p.error(error)
    check_policy_params(p, args, args.policies, policy_label, args.shape_obj, min(args.slots),
                        RunSettings.prefetch_depth, args.replayed, args.train)
    error = live_predictor_error(args.policies, args.policy_params)
    if error:
        p.error(error)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.warmup_tokens = args.warmup_tokens or args.max_tokens
    args.shape = args.shape or args.shape_obj.name
    args.trace_sha256 = bytes_sha256(Path(args.trace).read_bytes())[:16]
    dtype_bytes = getattr(torch, args.dtype).itemsize
    error = host_memory_error(args.shape_obj, dtype_bytes, args.device)
    if error:
        p.error(error)
    starts = args.replayed.request_starts
    args.longest = int(max(b - a for a, b in zip(starts[:-1], starts[1:])))


REPLAY_TOKENS = 48     # replay's default timed tokens per run


def add_fresh_arg(p: argparse.ArgumentParser) -> None:
    """--fresh: re-measure configurations this OUT already holds."""
    p.add_argument("--fresh", action="store_true",
                   help="measure every configuration, also those whose OUT/engine.csv row was finished under the same "
                        "settings and engine code (default: skip them, one line each)")


def non_negative_float(text: str) -> float:
    """A number >= 0 (argparse type): ``--accelerate-gpu-GiB``, where 0 skips accelerate's reference."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 0")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("live")
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--train-prompts", type=positive_int, default=4,
                   help="training-split prompts recorded as the slice static and affinity learn from")
    p.add_argument("--policies", type=policy_list, default="lru,lfu,belady,oracle,mixtral-offloading,"
                                                         "speculating-experts,speculating-experts-lossy,lookahead")
    add_policy_param_arg(p)
    p.add_argument("--slots", type=slot_list, default="2,3,4,6")
    p.add_argument("--depth", type=positive_int, default=3, help="predictors look this many layers ahead")
    p.add_argument("--gate-train-tokens", type=positive_int, default=131072, help="training-split tokens for the gate")
    p.add_argument("--recall-tokens", type=positive_int, default=8192,
                   help="held-out-split tokens, teacher-forced, every predictor's recall is scored on")
    p.add_argument("--vector-tokens", type=positive_int, default=4096, help="of those, tokens for the default vectors")
    p.add_argument("--gate-val-tokens", type=positive_int, default=VAL_TOKENS,
                   help="more training-split tokens, not trained on, that pick the gate's best step")
    p.add_argument("--gate-steps", type=non_negative_int, default=4000)
    p.add_argument("--gate-rank", type=positive_int, default=64)
    p.add_argument("--gate-lr", type=positive_float, default=1e-3, help="the gates' learning rate (> 0)")
    p.add_argument("--gate-batch", type=positive_int, default=1024)
    p.add_argument("--score-seqs", type=positive_int, default=4, help="held-out windows for lossy policies' accuracy")
    p.add_argument("--score-len", type=positive_int, default=128)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--timed-policy", default="lru",
                   help="its run at the smallest --slots also records layer timings and copy start/end: "
                        "OUT/<model>-<policy>-<slots>-timed.npz")
    p.add_argument("--recall", action="store_true",
                   help="train and score every predictor (OUT/gate_recall.csv: the pre-gate, the quasi-hidden "
                        "pre-gate, the lookahead gate and the offline context gate), whichever policies are asked; "
                        "default: only those the asked policies consult, none for lru,lfu,belady,oracle,...")
    p.add_argument("--work", type=Path, help="where the trained gate goes (default: --out)")
    p.add_argument("--hardware", type=hardware_profile, default="h100-pcie5",
                   help="the profile whose unmeasured constants (the analytic model's) the calibrated one keeps")
    p.add_argument("--profile-name", type=file_name,
                   help="the calibrated profile's name (default: <gpu>-measured, or cpu-measured on a CPU)")
    p.add_argument("--accelerate-gpu-GiB", type=non_negative_float, default=2.0,
                   help="GPU memory accelerate's offload reference may use (0: skip that reference); CUDA only")
    add_measurement_args(p)
    add_fresh_arg(p)
    p.set_defaults(check=_check_live, func=live)
    r = sub.add_parser("replay")
    r.add_argument("--trace", type=existing_file, default=str(DEFAULT_TRACE))
    r.add_argument("--shape", help="a shape name (traces/shapes) or YAML path; default: the trace's own")
    r.add_argument("--max-tokens", type=positive_int,
                   help=f"replayed tokens per measured run (default {REPLAY_TOKENS}, or all the trace holds after its "
                        f"training slice when fewer; a value past that is refused)")
    r.add_argument("--warmup-tokens", type=positive_int, help="tokens per warm-up pass (default: --max-tokens)")
    r.add_argument("--policies", type=policy_list, default="lru,lfu,belady,oracle")
    add_policy_param_arg(r)
    r.add_argument("--slots", type=slot_list, default="4,8,16")
    add_device_arg(r)
    r.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on the CPU")
    r.add_argument("--out", required=True, type=Path)
    add_measurement_args(r)
    add_fresh_arg(r)
    r.set_defaults(check=_check_replay, func=replay)
    args = parser.parse_args(argv)
    args.check(sub.choices[args.mode], args)
    return args


def main(argv=None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.engine_code = code_digest()
    args.settings = {k: v for k, v in resolved(args).items()
                     if k not in ("check", "predictor_settings", "shape_obj", "train", "replayed", "longest")}
    write_resolved_config(args.out, f"engine_bench-{args.mode}", args.settings)
    args.started = started
    with interrupt_exits(args.out), sigterm_as_interrupt():
        problems = args.func(args)
    if problems:
        raise SystemExit(exit_message(problems, args.out))


if __name__ == "__main__":
    main()
