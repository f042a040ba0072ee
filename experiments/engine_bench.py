"""Measure the offloaded engine on this machine and write the results the simulator is checked against.

    # a trained (or any HF Mixtral / Qwen-MoE / OLMoE) checkpoint, live routing
    python -m experiments.engine_bench live --model DIR --out experiments/results/h100
    # a named shape with random weights, routing forced from a trace (gpt-oss-20b: 38 GB of bf16 experts)
    python -m experiments.engine_bench replay --shape gpt-oss-20b --out experiments/results/h100

Each run appends rows to OUT/engine.csv (written atomically after every run, so a crash keeps what
was measured). ``live`` also checks correctness (every lossless policy at every cache size gives the
all-resident engine's tokens: OUT/correctness.csv; the resident model's logits against Hugging Face's
forward: OUT/hf_parity.json), records a trace with hidden states (OUT/<name>-trace.npz), measures the
hardware profile (OUT/<hardware>-measured.yaml), and runs the two references: the model fully on the
GPU, and Hugging Face accelerate's CPU offload.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from policies.registry import resolve_policy
from offload.predictors import policy_depth
from real.checkpoint import load_checkpoint
from real.corpus import DEFAULT_CORPUS_DIR
from real.engine import OffloadEngine
from real.model import MoEModel, quiet_gc
from experiments.make_tracks import RECALL_COLUMNS, affinity_recall, compute_tracks, text_recall
from real.hidden_capture import CAPTURE_WINDOW, capture_hidden_states
from real.lookahead_gate import VAL_TOKENS, train_lookahead_gate
from real.predictors import LookaheadGatePredictor, PreGate, QuasiHiddenPreGate, default_vectors
from real.profile_hw import measure_compute, measure_copies, measure_layer_overhead
from real.record import routing_trace
from real.shape_model import random_model
from hardware.profile import hardware_from_dict, hardware_to_dict, load_hardware
from offload.session import RunSettings
from offload.metrics import tpot_summary
from sim.simulator import simulate
from traces import DEFAULT_TRACE, load_shape, load_trace, save_trace
from traces.io import atomic_write

ENGINE_COLUMNS = ["model", "mode", "policy", "cache_slots", "tokens_per_s", "tpot_ms_mean", "hit_rate",
                  "bytes_moved", "copy_GBps", "gpu_mem_GB", "tokens", "tpot_ms_p50", "tpot_ms_p99",
                  "misses"]


class Results:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "engine.csv"
        self.rows = pd.read_csv(self.path).to_dict("records") if self.path.exists() else []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        frame = pd.DataFrame(self.rows)
        cols = [c for c in ENGINE_COLUMNS if c in frame] + [c for c in frame if c not in ENGINE_COLUMNS]
        atomic_write(self.path, lambda f: frame[cols].to_csv(f, index=False))
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)


def _row(model: str, mode: str, policy: str, slots: int, metrics: dict) -> dict:
    return {"model": model, "mode": mode, "policy": policy, "cache_slots": slots,
            **{k: metrics[k] for k in ENGINE_COLUMNS[4:] if k in metrics}}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(model, shape, policy: str, slots: int, future=None, record_hidden_steps: int = 0,
            predictors=None, hardware=None, depth: int = 1, precision: str = "bf16",
            record_layer_timings: bool = False) -> OffloadEngine:
    _reset_peak(model.device)
    settings = RunSettings(cache_slots=slots, prefetch_depth=depth, precision=precision)
    return OffloadEngine(model, shape, resolve_policy(policy), settings, hardware=hardware, future=future,
                         train_trace=future, record_hidden_steps=record_hidden_steps, predictors=predictors,
                         record_layer_timings=record_layer_timings)


def _held_out(tokenizer_dir: Path, corpus: str):
    """The tokenizer and the corpus domains, loaded once for the prompts and the scored windows."""
    from transformers import AutoTokenizer
    from real.corpus import load_corpus
    return AutoTokenizer.from_pretrained(tokenizer_dir), load_corpus(corpus)


def _prompts(tok, domains, count: int, length: int) -> list[list[int]]:
    """The start of the held-out text of ``count`` corpus domains, ``length`` tokens each."""
    return [tok(domains[d].held_out[0][:4000])["input_ids"][:length] for d in sorted(domains)[:count]]


def _score_sequences(tok, domains, count: int, length: int) -> list[list[int]]:
    """Held-out text for accuracy: ``count`` windows of ``length`` tokens, later in each domain's held-out
    split than the prompts, one domain after another."""
    names = sorted(domains)
    return [tok(domains[names[i % len(names)]].held_out[0][8000:16000])["input_ids"][:length] for i in range(count)]


def _decode_mask(trace, prompts: list[list[int]]) -> np.ndarray:
    """True for the steps of ``trace`` that generated a token (a request's steps after its prompt)."""
    mask = np.zeros(trace.num_tokens, dtype=bool)
    for r, prompt in enumerate(prompts):
        mask[int(trace.request_starts[r]) + len(prompt):int(trace.request_starts[r + 1])] = True
    return mask


def live(args) -> None:
    out = Path(args.out)
    work = Path(args.work) if args.work else out
    results = Results(out)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = args.name or Path(args.model).name
    dtype = getattr(torch, args.dtype)
    config, tensors = load_checkpoint(args.model, dtype)
    shape = config.to_model_shape(name)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "bf16")
    for policy in args.policies.split(","):     # a misspelt name fails now, not after minutes of measuring
        resolve_policy(policy)
    tok, domains = _held_out(Path(args.model), args.corpus)
    prompts = _prompts(tok, domains, args.prompts, args.prompt_len)
    steps = sum(len(p) + args.new_tokens for p in prompts)

    # 1. References: the model fully on the GPU (upper bound) and its logits against HF's forward.
    resident = MoEModel(config, tensors, device=device, dtype=dtype)
    resident.capture_graphs()          # the same lean decode path the engine runs
    _reset_peak(device)
    with quiet_gc():                    # as the engine decodes (its full collection stays outside the timing)
        start = time.perf_counter()
        resident_tokens = [resident.generate_greedy(p, args.new_tokens) for p in prompts]
        _sync(device)
        wall = time.perf_counter() - start
    ran = steps - len(prompts)            # generate_greedy skips the step after the last token
    results.add({"model": name, "mode": "fully-on-gpu", "policy": "none", "cache_slots": shape.num_experts,
                 "tokens_per_s": ran / wall, "tpot_ms_mean": 1e3 * wall / ran,
                 "gpu_mem_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0})
    _hf_parity(args.model, resident, prompts[0], resident_tokens[0], out)
    compute = measure_compute(resident) if cuda else None
    del resident
    if cuda:
        torch.cuda.empty_cache()

    # 2. The all-resident engine records the run: routing, hidden states, timings. Its routing is the
    #    future the bounds (Belady, oracle) are given, and its hidden states are what the predictors
    #    are scored on (held-out text: the prompts and their greedy continuations).
    host = MoEModel(config, tensors, device=device, dtype=dtype, experts_device="cpu")
    del tensors
    eng = _engine(host, shape, "lru", shape.num_experts, record_hidden_steps=steps)
    base = eng.generate(prompts, args.new_tokens)
    recorded = routing_trace(base, shape, source=f"experiments.engine_bench live --model {name}",
                             recorded_on=torch.cuda.get_device_name() if cuda else "cpu", description="greedy decode of "
                             "held-out corpus prompts (prompt steps included), all experts resident")
    correctness = [{"policy": "all-resident-engine", "cache_slots": shape.num_experts, "lossless": True,
                    "identical_to_fully_on_gpu": base.generated == resident_tokens}]
    warm = _engine(host, shape, "static", shape.num_experts, future=recorded)
    measured = warm.generate(prompts, args.new_tokens)
    results.add(_row(name, "engine-all-resident", "static", shape.num_experts, measured.metrics))

    # 3. The hardware profile the simulator uses (measured on a GPU; the named one on a CPU).
    if cuda:
        compute["layer_overhead_us"] = measure_layer_overhead(warm, compute)
        compute["precision"] = precision
        hardware = hardware_from_dict(_write_profile(args.hardware, out, {name: compute}))
    else:
        hardware = load_hardware(args.hardware)
    estimates = hardware.prefetch_estimates(shape, precision)
    print(f"prefetch estimates: expert copy {estimates[0] / 1e3:.1f} us, layer compute {estimates[1] / 1e3:.1f} us",
          flush=True)

    # 4. Predictors: default vectors and the lookahead gate learn from training-split text; tracks of
    #    the recorded (held-out) run let the simulator replay exactly what the live predictors say.
    predictors_at, tracked = _predictors(args, host, recorded, out, work, name)
    if cuda and args.accelerate_gpu_GiB:
        _accelerate(args.model, name, prompts, args.new_tokens, args.accelerate_gpu_GiB, results)

    # 5. Every policy at every cache size: measured in the engine, predicted by the simulator.
    mask = _decode_mask(recorded, prompts)
    scored = _score_sequences(tok, domains, args.score_seqs, args.score_len)
    reference = _engine(host, shape, "lru", shape.num_experts).score(scored)
    accuracy = {}
    rows = []
    failed = []

    def measure(policy: str) -> None:
        """One policy at every cache size: engine run, correctness, simulator prediction; policies.csv
        and correctness.csv are rewritten after each size."""
        policy_cls = resolve_policy(policy)
        predictors = predictors_at(policy_depth(policy_cls, args.depth))
        if not policy_cls.lossless:   # the accuracy cost: the cache does not change what runs
            lossy = _engine(host, shape, policy, shape.num_experts, predictors=predictors, hardware=hardware,
                            depth=args.depth, precision=precision).score(scored)
            accuracy[policy] = {"perplexity": lossy["perplexity"], "top1_agreement": float(np.mean(
                np.asarray(lossy["argmax"]) == np.asarray(reference["argmax"])))}
        for slots in [int(s) for s in args.slots.split(",")]:
            timed = policy == args.timed_policy and slots == min(int(s) for s in args.slots.split(","))
            r = _engine(host, shape, policy, slots, future=recorded, predictors=predictors, hardware=hardware,
                        depth=args.depth, precision=precision, record_layer_timings=timed).generate(
                prompts, args.new_tokens)
            if timed:   # an offloaded run's copies, stalls and layer times, as a trace
                save_trace(routing_trace(r, shape, source=f"experiments.engine_bench live --model {name}",
                                         recorded_on=torch.cuda.get_device_name() if cuda else "cpu",
                                         description=f"greedy decode, policy {policy}, {slots} slots per layer, "
                                                     "layer timings and copy start/end recorded"),
                           out / f"{name}-{policy}-{slots}-timed.npz")
            identical = r.generated == resident_tokens
            correctness.append({"policy": policy, "cache_slots": slots, "lossless": policy_cls.lossless,
                                "identical_to_fully_on_gpu": identical})
            results.add(_row(name, "live", policy, slots, r.metrics))
            sim = simulate(tracked, policy_cls, hardware, RunSettings(cache_slots=slots, precision=precision,
                                                                      prefetch_depth=args.depth))
            sim_decode = tpot_summary(np.asarray(sim.token_ns)[mask])   # the steps the engine timed
            acc = accuracy.get(policy, {"perplexity": reference["perplexity"], "top1_agreement": 1.0})
            rows.append({"policy": policy, "cache_slots": slots, "tokens_per_s": r.metrics["tokens_per_s"],
                         "sim_tokens_per_s": sim_decode["tokens_per_s"], "hit_rate": r.metrics["hit_rate"],
                         "sim_hit_rate": sim.metrics["hit_rate"], "lossy": not policy_cls.lossless,
                         "identical_tokens": identical, "held_out_perplexity": acc["perplexity"],
                         "top1_agreement": acc["top1_agreement"], "tpot_ms_mean": r.metrics["tpot_ms_mean"],
                         "sim_tpot_ms_mean": sim_decode["tpot_ms_mean"], "bytes_moved": r.metrics["bytes_moved"],
                         "prefetch_depth": args.depth, "model": name, "precision": precision})
            atomic_write(out / "policies.csv", lambda f: pd.DataFrame(rows).to_csv(f, index=False))
            atomic_write(out / "correctness.csv", lambda f: pd.DataFrame(correctness).to_csv(f, index=False))

    for policy in args.policies.split(","):
        try:
            measure(policy)
        except Exception:       # one policy's failure must not lose the others' measurements
            traceback.print_exc()
            failed.append(policy)
    if rows:
        print(pd.DataFrame(rows)[["policy", "cache_slots", "tokens_per_s", "sim_tokens_per_s", "hit_rate",
                                  "sim_hit_rate", "lossy", "held_out_perplexity", "top1_agreement"]].to_string(index=False),
              flush=True)
    if failed:
        raise SystemExit(f"error: policies {', '.join(failed)} failed (tracebacks above); the others are in {out}")


def _predictors(args, host: MoEModel, recorded, out: Path, work: Path, name: str):
    """The live predictors (pre-gate, quasi-hidden pre-gate, lookahead gate) and ``recorded`` with their
    tracks; writes OUT/gate_recall.csv (with the offline context gate's text recall) and
    OUT/<name>-trace.npz (the recording with its tracks)."""
    # The gate's validation text (for keeping its best step) is carved from the training split: the text
    # recall is scored on must not choose the gate.
    captured = capture_hidden_states(args.model, args.gate_train_tokens + args.gate_val_tokens, args.corpus,
                                     device=str(host.device), dtype=host.dtype, seed=args.seed, window=CAPTURE_WINDOW)
    n_train = (len(captured) - args.gate_val_tokens) // CAPTURE_WINDOW * CAPTURE_WINDOW    # whole windows each
    train_h, val_h = captured[:n_train], captured[n_train:]
    text_h = capture_hidden_states(args.model, args.recall_tokens, args.corpus, device=str(host.device),
                                   dtype=host.dtype, seed=args.seed, split="held_out", window=CAPTURE_WINDOW)
    vectors = default_vectors(host, train_h[:args.vector_tokens])
    gates, gate_s = {}, {}
    for key, context in (("lookahead", False), ("lookahead-context", True)):
        start = time.perf_counter()
        print(f"training {key}", flush=True)
        gates[key] = train_lookahead_gate(host, train_h, args.depth, args.gate_rank, args.gate_steps, args.gate_lr,
                                          args.seed, host.device, args.gate_batch,
                                          log_every=max(args.gate_steps // 20, 1), val_hidden_states=val_h,
                                          keep_best=True, context=context, window=CAPTURE_WINDOW)
        gate_s[key] = round(time.perf_counter() - start, 2)
        print(f"{key}: trained in {gate_s[key]} s", flush=True)
    gate = gates["lookahead"]
    del captured, train_h, val_h
    def at_depth(depth: int) -> dict:
        return {"pregate": PreGate(host, depth), "quasi": QuasiHiddenPreGate(host, vectors, depth),
                "lookahead": LookaheadGatePredictor(gate)}

    predictors = at_depth(args.depth)
    # A policy that looks one layer ahead gets one-layer predictors: the live cost of the deeper ones
    # (three chained quasi-hidden steps, a [3E, H] matvec) would be paid for rows it never reads.
    shallow = at_depth(1)
    tracked, recall = compute_tracks(recorded, predictors, args.depth, f"{name}: held-out decode")
    # The context gate scores offline only (the engine keeps no previous-token state yet): text rows only.
    offline = {**predictors, "lookahead-context": LookaheadGatePredictor(gates["lookahead-context"], CAPTURE_WINDOW)}
    recall.extend(text_recall(offline, text_h, args.depth, f"{name}: held-out text, teacher-forced"))
    del text_h
    recall.extend(affinity_recall(DEFAULT_TRACE, args.depth))
    table = pd.DataFrame(recall, columns=RECALL_COLUMNS)
    # The trained gates' own size and cost on their rows; the other predictors have no parameters.
    table["gate_parameters"] = table["predictor"].map(lambda k: gates[k].num_parameters if k in gates else 0)
    table["gate_flops_per_token"] = table["predictor"].map(lambda k: gates[k].flops_per_token() if k in gates else 0)
    table["gate_train_s"] = table["predictor"].map(lambda k: gate_s.get(k, 0.0))
    atomic_write(out / "gate_recall.csv", lambda f: table.to_csv(f, index=False))
    print(table.to_string(index=False), flush=True)
    gate.save(work / f"{name}-gate", extra={"train_tokens": args.gate_train_tokens, "steps": args.gate_steps,
                                            "train_s": gate_s["lookahead"], "recall": recall})
    save_trace(tracked, out / f"{name}-trace.npz")
    return (lambda depth: shallow if depth == 1 else predictors), tracked


def _hf_parity(model_dir: str, resident: MoEModel, prompt: list[int], generated: list[int], out: Path) -> None:
    """Our resident model's logits at every position against HF's full-sequence forward (bf16)."""
    from transformers import AutoModelForCausalLM
    device = resident.device
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resident.dtype).to(device).eval()
    ids = prompt + generated[:-1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device=device)).logits[0].float()
        resident.reset()
        ours = torch.cat([resident.decode_step(t, i) for i, t in enumerate(ids)]).float()
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    report = {"positions": len(ids), "max_abs_diff": diff, "max_abs_logit": scale,
              "relative": diff / scale, "argmax_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()}
    atomic_write(out / "hf_parity.json", lambda f: json.dump(report, f, indent=1))
    print("hf parity", report, flush=True)
    del hf


def _accelerate(model_dir, name, prompts, new_tokens, gpu_GiB, results: Results) -> None:
    """What a user without this tool would do: accelerate's device_map offload to the CPU."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="auto",
                                              max_memory={0: f"{gpu_GiB}GiB", "cpu": "100GiB"})
    torch.cuda.reset_peak_memory_stats()
    prompt = torch.tensor([prompts[0]], device="cuda")
    hf.generate(prompt, max_new_tokens=2, do_sample=False)
    start = time.perf_counter()
    new_tokens = min(new_tokens, 16)      # seconds per token: a few tokens measure it
    hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    wall = time.perf_counter() - start
    results.add({"model": name, "mode": f"hf-accelerate-offload-{gpu_GiB}GiB", "policy": "device_map",
                 "cache_slots": -1, "tokens_per_s": new_tokens / wall, "tpot_ms_mean": 1e3 * wall / new_tokens,
                 "gpu_mem_GB": torch.cuda.max_memory_allocated() / 1e9})


def _write_profile(hardware: str, out: Path, measured: dict) -> None:
    latency, table = measure_copies(torch.device("cuda"))
    profile = hardware_to_dict(load_hardware(hardware))
    profile.update(name=f"{hardware}-measured", copy_latency_us=latency, h2d_GBps_by_MiB=table,
                   description=f"{torch.cuda.get_device_name()}, measured by experiments.engine_bench",
                   source="measured by python -m experiments.engine_bench on this GPU: pinned H2D copies one "
                          "at a time (CUDA events, median); compute per model from the engine's kernels")
    profile.pop("pcie_GBps", None)
    profile["measured_compute"] = {model: {c.pop("precision"): c} for model, c in measured.items()}
    atomic_write(out / f"{hardware}-measured.yaml", lambda f: yaml.safe_dump(profile, f, sort_keys=False))
    print("profile", profile, flush=True)
    return profile


def replay(args) -> None:
    out = Path(args.out)
    results = Results(out)
    shape = load_shape(args.shape)
    trace = load_trace(args.trace)
    if trace.model.num_experts != shape.num_experts or trace.model.num_layers != shape.num_layers:
        raise SystemExit(f"error: trace {args.trace} is for {trace.model.name}, not {shape.name}")
    _, trace = trace.split(0.25)
    trace = trace.head_tokens(args.max_tokens)
    longest = int(max(b - a for a, b in zip(trace.request_starts[:-1], trace.request_starts[1:])))
    model = random_model(shape, "cuda", torch.bfloat16, max_len=longest + 1)
    for policy in args.policies.split(","):
        for slots in [int(s) for s in args.slots.split(",")]:
            r = _engine(model, shape, policy, slots, future=trace).replay(trace, args.max_tokens)
            results.add(_row(shape.name, "shape-replay", policy, slots, r.metrics))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("live")
    p.add_argument("--model", required=True)
    p.add_argument("--name")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS_DIR), help="held-out prompts come from here")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--policies", default="lru,lfu,belady,oracle,mixtral-offloading,speculating-experts,"
                                         "speculating-experts-lossy,lookahead")
    p.add_argument("--slots", default="2,3,4,6")
    p.add_argument("--depth", type=int, default=3, help="predictors look this many layers ahead")
    p.add_argument("--gate-train-tokens", type=int, default=131072, help="training-split tokens for the gate")
    p.add_argument("--recall-tokens", type=int, default=8192,
                   help="held-out-split tokens, teacher-forced, every predictor's recall is scored on")
    p.add_argument("--vector-tokens", type=int, default=4096, help="of those, tokens for the default vectors")
    p.add_argument("--gate-val-tokens", type=int, default=VAL_TOKENS,
                   help="more training-split tokens, not trained on, that pick the gate's best step")
    p.add_argument("--gate-steps", type=int, default=4000)
    p.add_argument("--gate-rank", type=int, default=64)
    p.add_argument("--gate-lr", type=float, default=1e-3)
    p.add_argument("--gate-batch", type=int, default=1024)
    p.add_argument("--score-seqs", type=int, default=4, help="held-out windows for lossy policies' accuracy")
    p.add_argument("--score-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timed-policy", default="lru",
                   help="its run at the smallest --slots also records layer timings and copy start/end: "
                        "OUT/<model>-<policy>-<slots>-timed.npz")
    p.add_argument("--work", help="where the trained gate goes (default: --out)")
    p.add_argument("--hardware", default="h100-pcie5")
    p.add_argument("--accelerate-gpu-GiB", type=float, default=2.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, or float32 for CPU checks")
    p.add_argument("--out", required=True)
    p.set_defaults(func=live)
    r = sub.add_parser("replay")
    r.add_argument("--shape", default="gpt-oss-20b")
    r.add_argument("--trace", default=str(DEFAULT_TRACE))
    r.add_argument("--max-tokens", type=int, default=48)
    r.add_argument("--policies", default="lru,lfu,belady,oracle")
    r.add_argument("--slots", default="4,8,16")
    r.add_argument("--out", required=True)
    r.set_defaults(func=replay)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
