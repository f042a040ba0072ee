"""The references an offloaded engine is read against, for one checkpoint: the model fully resident, every
expert on the compute device (the GPU, or the CPU with --device cpu; the speed upper bound), its logits
against Hugging Face's forward, and Hugging Face accelerate's CPU offload (what a user without this tool
would run; CUDA only).

    python -m experiments.references --model DIR --out OUT [--corpus DIR] [--prompts 4 --prompt-len 32
        --new-tokens 64] [--accelerate-gpu-GiB 2] [--device cuda|cpu --dtype bfloat16|float32] \
        [--repeats 5] [--deadline-s S]

The fully-resident figure is the median of --repeats runs (default 5; 1: one cold run, for smoke use) after
untimed warm-up passes, with the discipline of ``real.measurement``; accelerate's is one run (seconds per
token). Adds rows to OUT/engine.csv (modes ``fully-resident``, with its spread, runs, outliers and their
causes, and ``hf-accelerate-offload-<GiB>GiB``), the session ``references-<name>`` to OUT/noise_runs.csv,
OUT/noise_floor.csv and OUT/noise_sessions.json, and writes OUT/hf_parity.json and
OUT/resolved_config-references.yaml. A run that fails, or one whose tokens differ from the first run's,
ends the command with exit code 1, after every file is written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from real.bench.args import (add_measurement_args, load_model_checkpoint, add_model_args, add_prompt_args, check_model_args, check_text,
                             resolved)
from experiments.interrupts import sigterm_as_interrupt
from real.bench.engine_runs import exit_message, interrupt_exits
from real.bench.references import accelerate_offload, hf_parity, measure_fully_resident
from real.bench.table import engine_table, write_resolved_config
from real.bench.text import held_out_prompts
from real.model import MoEModel
from traces.io import atomic_write


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--accelerate-gpu-GiB", type=float, default=2.0,
                   help="GPU memory accelerate may use (0: skip that reference); CUDA only")
    add_measurement_args(p)
    args = p.parse_args(argv)
    check_model_args(p, args)
    if args.accelerate_gpu_GiB < 0:
        p.error(f"--accelerate-gpu-GiB {args.accelerate_gpu_GiB}: must be at least 0")
    check_text(p, args)
    return args


def main(argv=None) -> dict:
    started = time.monotonic()
    args = parse_args(argv)
    with interrupt_exits(args.out), sigterm_as_interrupt():
        return _measure(args, started)


def _measure(args, started: float) -> dict:
    tok, domains = args.text
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config, tensors = load_model_checkpoint(args, dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = resolved(args)
    write_resolved_config(args.out, "references", settings)
    prompts = held_out_prompts(tok, domains, args.prompts, args.prompt_len)
    resident = MoEModel(config, tensors, device=device, dtype=dtype)
    del tensors
    tokens, _, problems = measure_fully_resident(resident, args.name, prompts, args.new_tokens, args.out, args.repeats,
                                                 args.deadline_s, started, settings)
    if tokens is None:
        raise SystemExit(f"error: the fully-resident reference failed: {'; '.join(problems)}")
    parity = hf_parity(args.model, resident, prompts[0], tokens[0])
    atomic_write(args.out / "hf_parity.json", lambda f: json.dump(parity, f, indent=1))
    print("hf parity", parity, flush=True)
    del resident
    if device.type == "cuda" and args.accelerate_gpu_GiB:
        torch.cuda.empty_cache()
        engine_table(args.out).add({
            "model": args.name, "mode": f"hf-accelerate-offload-{args.accelerate_gpu_GiB}GiB", "policy": "device_map",
            "cache_slots": -1, "runs": 1,
            **accelerate_offload(args.model, prompts[0], args.new_tokens, args.accelerate_gpu_GiB)})
    elif args.accelerate_gpu_GiB:
        print("note: accelerate's offload reference needs a CUDA device (it offloads to the GPU's memory): skipped "
              "on the CPU", file=sys.stderr, flush=True)
    if problems:
        raise SystemExit(exit_message(problems, args.out))
    return parity


if __name__ == "__main__":
    main()
