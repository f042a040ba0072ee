"""Record a checkpoint's live decode with every expert resident: the trace the simulator and the
policy measurements replay, with hidden states, and the training slice both clocks learn from.

    python -m experiments.record --model DIR --out OUT [--corpus DIR] [--prompts 4 --prompt-len 32
        --new-tokens 64 --train-prompts 4] [--device cuda|cpu --dtype bfloat16|float32]

Writes OUT/<name>-trace.npz (greedy decode of the start of ``--prompts`` corpus domains' held-out text,
prompt steps included, hidden states at every step; the prompts and the fully-on-GPU model's tokens in
its ``extra``), OUT/<name>-train-trace.npz (the same for ``--train-prompts`` domains' training-split
text: the slice ``static`` and ``affinity`` learn from, in the engine and in the simulator),
OUT/correctness.csv (the all-resident engine's tokens against the model fully on the device) and
OUT/resolved_config-record.yaml.
"""
from __future__ import annotations

import argparse

import torch

from real.bench.args import (add_model_args, load_model_checkpoint, add_prompt_args, check_model_args, check_text, positive_int,
                             resolved)
from real.bench.recording import record_slices
from real.bench.references import fully_resident
from real.bench.table import write_resolved_config
from real.bench.text import held_out_prompts, train_prompts
from real.model import MoEModel
from traces import save_trace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--train-prompts", type=positive_int, default=4,
                   help="training-split prompts recorded as the slice static and affinity learn from")
    args = p.parse_args(argv)
    check_model_args(p, args)
    check_text(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tok, domains = args.text
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config, tensors = load_model_checkpoint(args, dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(args.out, "record", resolved(args))
    prompts = held_out_prompts(tok, domains, args.prompts, args.prompt_len)
    train_text = train_prompts(tok, domains, args.train_prompts, args.prompt_len)
    shape = config.to_model_shape(args.name)
    resident = MoEModel(config, tensors, device=device, dtype=dtype)
    reference_tokens, _ = fully_resident(resident, prompts, args.new_tokens)
    del resident
    host = MoEModel(config, tensors, device=device, dtype=dtype, experts_device="cpu")
    del tensors
    recorded, train = record_slices(host, shape, args.name, prompts, train_text, args.new_tokens, reference_tokens,
                                    args.out)
    save_trace(recorded, args.out / f"{args.name}-trace.npz")
    print(f"-> {args.out}: {recorded.num_tokens} recorded steps, {train.num_tokens} training-slice steps", flush=True)
    return {"recorded": recorded, "train": train}


if __name__ == "__main__":
    main()
