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
import sys
from pathlib import Path

import torch

from real.bench.args import add_model_args, add_prompt_args, check_model_args, positive_int, resolved
from real.bench.recording import record_slices
from real.bench.references import fully_resident
from real.bench.table import write_resolved_config
from real.bench.text import held_out_prompts, load_text, train_prompts
from real.checkpoint import (CONFIG_NAME, CheckpointError, MoEConfig, load_checkpoint, read_config,
                             weight_quantization)
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
    check_out(p, args.out)
    check_checkpoint(p, args)
    return args


def check_out(p: argparse.ArgumentParser, out: Path) -> None:
    """``p.error`` when --out ``out``, or the first of its parents that exists, is a file, not a folder."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                p.error(f"--out {out}: {path} is a file, not a folder; give a folder (a new one is created)")
            return


def check_checkpoint(p: argparse.ArgumentParser, args: argparse.Namespace) -> MoEConfig:
    """The checkpoint's config.json, its tokenizer and the corpus, before anything loads or is written:
    ``p.error`` naming the argument and the fix. Returns the config; sets ``args.text`` (tokenizer, domains)."""
    try:
        config, config_dict = read_config(args.model)
        weight_quantization(config_dict, args.model / CONFIG_NAME)
    except CheckpointError as err:
        p.error(f"--model {' '.join(str(err).split())}")
    try:
        args.text = load_text(args.model, args.corpus)
    except FileNotFoundError as err:        # load_corpus: the files the folder lacks, and --corpus
        p.error(" ".join(str(err).split()))
    except (OSError, ValueError) as err:    # transformers: no tokenizer files in the checkpoint folder
        p.error(f"--model {args.model}: no tokenizer loads from it ({type(err).__name__}); save the model's "
                f"tokenizer into the folder (tokenizer.save_pretrained)")
    return config


def main(argv=None) -> dict:
    args = parse_args(argv)
    tok, domains = args.text
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    try:
        config, tensors = load_checkpoint(args.model, dtype)
    except CheckpointError as err:          # the weights (config.json was checked with the arguments)
        print(f"error: --model {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(args.out, "record", {k: v for k, v in resolved(args).items() if k != "text"})
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
