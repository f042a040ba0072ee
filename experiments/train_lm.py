"""Train the project's own small MoE language model (``real.train_lm``) in a fixed wall-time budget
and save it as a Hugging Face Mixtral checkpoint with its tokenizer, ``train_report.json`` and
``routing_stats.json`` (the routing statistics of its held-out text, ``traces.stats``).

    python -m experiments.train_lm --out runs/moe-lm [--corpus DIR] [--minutes 7] [--seed 0]
                                   [--size h100|tiny] [--device cuda|cpu] [--max-steps N] [--no-compile]

The output folder is built beside ``--out`` and replaces it as a whole at the end; a folder that holds
anything but an earlier output of this command (a file it did not write) is refused, naming the files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from experiments.interrupts import sigterm_as_interrupt
from real.corpus import DEFAULT_CORPUS_DIR
from real.train_lm import SIZES, TrainSettings, replace_problem, train_and_save
from traces.io import output_problem


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.train_lm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (replaced as a whole at the end; refused when it holds files this "
                         "command did not write)")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR, help="folder holding the corpus text files")
    ap.add_argument("--minutes", type=float, default=7.0,
                    help="wall-time budget from start to the last training step (evaluation and saving follow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="h100")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="train exactly this many steps (reproduces a run); default: as many as fit the budget")
    ap.add_argument("--max-epochs", type=float, default=6.0,
                    help="cap on passes over the train tokens when the step count comes from the budget: the "
                         "h100 model memorises the 2.2 M-token corpus, and its held-out loss rises after about "
                         "6 epochs (0 = no cap)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the training step's model (default: on CUDA only; it costs about a minute "
                         "once and then runs the h100 step 1.75x faster; a failed compile falls back to eager)")
    ap.add_argument("--experts-implementation", default=None,
                    help="transformers experts kernel (grouped_mm, batched_mm, eager); default: the library's")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not 0 < args.minutes < float("inf"):        # NaN too: it failed after the data's preparation
        ap.error(f"--minutes {args.minutes}: must be a positive number of minutes")
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max-steps must be at least 1")
    if not args.max_epochs >= 0:       # NaN too
        ap.error("--max-epochs must be at least 0 (0 = no cap)")
    if args.compile is None:
        args.compile = args.device == "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (use --device cpu)")
    if not args.corpus.is_dir():
        ap.error(f"--corpus {args.corpus}: no such folder (the corpus is ../shared/data/corpus)")
    if (problem := output_problem(args.out.parent, "folder")) is not None:   # the model is written beside --out
        ap.error(f"--out {args.out}: {problem}")
    if (problem := replace_problem(args.out)) is not None:
        ap.error(f"--out {args.out} {problem}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = TrainSettings(corpus=args.corpus, size=args.size, device=args.device, minutes=args.minutes,
                             seed=args.seed, max_steps=args.max_steps, max_epochs=args.max_epochs,
                             compile=args.compile, experts_implementation=args.experts_implementation)
    try:
        with sigterm_as_interrupt():
            return train_and_save(settings, args.out, [sys.executable, "-m", "experiments.train_lm", *args.argv])
    except KeyboardInterrupt:
        # --out is written whole at the end (replaced as a whole): an interrupted run leaves it as it was
        print(f"interrupted: nothing was written; {args.out} is as it was (the model is saved only when training "
              f"ends): run the command again", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
