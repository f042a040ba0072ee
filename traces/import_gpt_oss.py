"""Convert the gpt-oss-20b routing arrays of the project's shared data into a trace file.

    python -m traces.import_gpt_oss --sample-tokens 6000 --out traces/samples/gpt-oss-20b-sample.npz

Values are copied unchanged: experts -> experts, probs -> weights, gen_start -> request_starts (one
generation is one request), token_bytes/token_offsets -> text.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np

from traces.io import output_problem, save_trace
from traces.model_shape import load_shape
from traces.trace import SCHEMA_VERSION, Trace, TraceMeta

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO_ROOT.parent / "shared/data/routing/gpt-oss-20b-dev.npz"
SOURCE = (
    "github.com/AmanPriyanshu/GPT-OSS-MoE-ExpertFingerprinting commit 72b368f6 "
    "via ../shared/data/routing/gpt-oss-20b-dev.npz"
)
_REQUIRED = ("experts", "probs", "gen_start", "gen_dataset", "gen_category")


def evenly_spaced_generations(gen_start: np.ndarray, min_tokens: int) -> np.ndarray:
    """The fewest generations, evenly spaced over the whole file, that hold at least min_tokens tokens."""
    lengths = np.diff(gen_start)
    for count in range(1, len(lengths) + 1):
        chosen = np.unique(np.linspace(0, len(lengths) - 1, count).round().astype(np.int64))
        if lengths[chosen].sum() >= min_tokens:
            return chosen
    return np.arange(len(lengths))


def import_gpt_oss(src: Path, generations: np.ndarray | None = None, with_text: bool = True) -> Trace:
    """Generations (all when None) of the source file as one trace, each generation a request."""
    try:
        with np.load(src, allow_pickle=False) as npz:
            data = {name: npz[name] for name in npz.files}
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise ValueError(f"{src}: cannot read the source npz ({e}): check --src") from None
    missing = [k for k in _REQUIRED + (("token_bytes", "token_offsets") if with_text else ()) if k not in data]
    if missing:
        raise ValueError(f"{src}: missing array(s) {missing}: expected the layout of shared/data/README.md"
                         + (" (or pass --no-text)" if "token_bytes" in missing else ""))
    gen_start = data["gen_start"].astype(np.int64)
    num_generations = len(gen_start) - 1
    if generations is None:
        generations = np.arange(num_generations)
    if len(generations) == 0 or generations.min() < 0 or generations.max() >= num_generations:
        raise ValueError(f"{src}: generations must be indices in [0, {num_generations}), got {generations.tolist()}")

    token_index = np.concatenate([np.arange(gen_start[g], gen_start[g + 1]) for g in generations])
    lengths = gen_start[generations + 1] - gen_start[generations]
    text_bytes = text_offsets = None
    if with_text:
        offsets = data["token_offsets"]
        text_bytes = np.concatenate([data["token_bytes"][offsets[gen_start[g]] : offsets[gen_start[g + 1]]]
                                     for g in generations])
        token_lengths = offsets[token_index + 1] - offsets[token_index]
        text_offsets = np.concatenate([[0], np.cumsum(token_lengths)]).astype(np.int64)

    meta = TraceMeta(
        schema_version=SCHEMA_VERSION,
        model=load_shape("gpt-oss-20b"),
        source=SOURCE,
        licence="Apache-2.0",
        recorded_on="unknown (the source's recording)",
        description=(
            f"gpt-oss-20b decode-step routing, {len(generations)} generations "
            "(prompts from MMLU and GPQA); prefill tokens not included"
        ),
        extra={
            "generations": generations.tolist(),
            "datasets": data["gen_dataset"][generations].tolist(),
            "categories": data["gen_category"][generations].tolist(),
        },
    )
    return Trace(
        meta=meta,
        experts=data["experts"][token_index],
        weights=data["probs"][token_index],
        request_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        text_bytes=text_bytes,
        text_offsets=text_offsets,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m traces.import_gpt_oss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="source npz (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="trace file to write")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--generations", default="all",
                       help="'all' or comma-separated generation indices, e.g. 0,17,40 (default: all)")
    which.add_argument("--sample-tokens", type=int, metavar="N",
                       help="evenly spaced generations over the whole file until at least N tokens")
    parser.add_argument("--no-text", action="store_true", help="leave out the token text")
    args = parser.parse_args(argv)
    if (problem := output_problem(args.out, "file")) is not None:
        parser.error(f"--out {args.out}: {problem}")
    if args.out.suffix != ".npz":       # a trace is an .npz file: the loaders look for one (a .txt held one silently)
        parser.error(f"--out {args.out}: a trace is written as an .npz file; give a path ending in .npz")
    if not args.src.is_file():
        parser.error(f"{args.src}: no such file: the importer reads gpt-oss-20b-dev.npz, the project's shared "
                     f"routing data (../shared/data/routing/ beside the checkout); give its path with --src")

    generations = None
    if args.sample_tokens is not None:
        if args.sample_tokens <= 0:
            parser.error("--sample-tokens must be positive")
        try:
            with np.load(args.src, allow_pickle=False) as npz:
                generations = evenly_spaced_generations(npz["gen_start"], args.sample_tokens)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            parser.error(f"{args.src}: cannot read gen_start from the source npz ({type(e).__name__}: {e}): the file "
                         f"is not the whole gpt-oss-20b-dev.npz (truncated or another file?): copy it again, check --src")
    elif args.generations != "all":
        try:
            generations = np.array([int(g) for g in args.generations.split(",")], dtype=np.int64)
        except ValueError:
            parser.error(f"--generations must be 'all' or comma-separated integers, got {args.generations!r}")
        repeated = sorted({int(g) for g in generations if (generations == g).sum() > 1})
        if repeated:
            parser.error(f"--generations {args.generations}: {', '.join(map(str, repeated))} given more than once "
                         f"(the trace would hold the same generation twice); give each index once")
    try:
        trace = import_gpt_oss(args.src, generations, with_text=not args.no_text)
    except ValueError as e:         # names the file and the fix
        parser.error(" ".join(str(e).split()))
    except (OSError, KeyError, zipfile.BadZipFile, EOFError) as e:     # a damaged archive, found while reading it
        parser.error(f"{args.src}: cannot read the source npz ({type(e).__name__}: {e}): the file is damaged or "
                     f"truncated: copy gpt-oss-20b-dev.npz again, check --src")
    save_trace(trace, args.out)
    print(f"wrote {args.out}: {trace.num_tokens} tokens, {trace.num_requests} requests, "
          f"datasets {sorted(set(trace.meta.extra['datasets']))}, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
