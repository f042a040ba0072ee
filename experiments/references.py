"""The references an offloaded engine is read against, for one checkpoint: the model fully on the GPU
(speed upper bound), its logits against Hugging Face's forward, and Hugging Face accelerate's CPU
offload (what a user without this tool would run; CUDA only).

    python -m experiments.references --model DIR --out OUT [--corpus DIR] [--prompts 4 --prompt-len 32
        --new-tokens 64] [--accelerate-gpu-GiB 2] [--device cuda|cpu --dtype bfloat16|float32]

Adds rows to OUT/engine.csv (modes ``fully-on-gpu`` and ``hf-accelerate-offload-<GiB>GiB``) and writes
OUT/hf_parity.json and OUT/resolved_config-references.yaml.
"""
from __future__ import annotations

import argparse
import json

import torch

from real.bench.args import add_model_args, add_prompt_args, check_model_args, resolved
from real.bench.references import accelerate_offload, fully_on_gpu, hf_parity
from real.bench.table import engine_table, write_resolved_config
from real.bench.text import held_out_prompts, load_text
from real.checkpoint import load_checkpoint
from real.model import MoEModel
from traces.io import atomic_write


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--accelerate-gpu-GiB", type=float, default=2.0,
                   help="GPU memory accelerate may use (0: skip that reference); CUDA only")
    args = p.parse_args(argv)
    check_model_args(p, args)
    if args.accelerate_gpu_GiB < 0:
        p.error(f"--accelerate-gpu-GiB {args.accelerate_gpu_GiB}: must be at least 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(args.out, "references", resolved(args))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tok, domains = load_text(args.model, args.corpus)
    prompts = held_out_prompts(tok, domains, args.prompts, args.prompt_len)
    config, tensors = load_checkpoint(args.model, dtype)
    table = engine_table(args.out)
    resident = MoEModel(config, tensors, device=device, dtype=dtype)
    del tensors
    tokens, metrics = fully_on_gpu(resident, prompts, args.new_tokens)
    table.add({"model": args.name, "mode": "fully-on-gpu", "policy": "none", "cache_slots": config.num_experts,
               **metrics})
    parity = hf_parity(args.model, resident, prompts[0], tokens[0])
    atomic_write(args.out / "hf_parity.json", lambda f: json.dump(parity, f, indent=1))
    print("hf parity", parity, flush=True)
    del resident
    if device.type == "cuda" and args.accelerate_gpu_GiB:
        torch.cuda.empty_cache()
        table.add({"model": args.name, "mode": f"hf-accelerate-offload-{args.accelerate_gpu_GiB}GiB",
                   "policy": "device_map", "cache_slots": -1,
                   **accelerate_offload(args.model, prompts[0], args.new_tokens, args.accelerate_gpu_GiB)})
    return parity


if __name__ == "__main__":
    main()
