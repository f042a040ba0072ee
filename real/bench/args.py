"""Typed values for the engine commands' arguments (argparse ``type=`` functions) and the checks that
need the model: every value is checked where it enters, before anything is measured. A bad value
raises ``argparse.ArgumentTypeError`` naming it and the fix; argparse turns that into one line and
exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from hardware.profile import HardwareProfileError, load_hardware
from offload.session import RunSettings, SettingsError
from policies.registry import resolve_policy

if TYPE_CHECKING:
    from real.checkpoint import MoEConfig


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 0")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be positive")
    return value


def slot_list(text: str) -> tuple[int, ...]:
    """"2,4,6": expert slots per layer, each a valid ``RunSettings.cache_slots`` (the model's range is
    checked later, by ``check_slots``)."""
    slots = tuple(_int(s) for s in text.split(","))
    for s in slots:
        try:
            RunSettings(cache_slots=s)
        except SettingsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return slots


def policy_list(text: str) -> tuple[str, ...]:
    """"lru,belady,my.py:Mine": each resolved now, so a misspelt name fails before minutes of measuring."""
    names = tuple(p for p in text.split(",") if p)
    if not names:
        raise argparse.ArgumentTypeError("no policy given")
    for name in names:
        try:
            resolve_policy(name)
        except ValueError as e:       # the registry's error: names the policy and the fix
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def hardware_profile(text: str) -> str:
    """A profile name in ``hardware/profiles`` or a YAML path, loaded once to check it."""
    try:
        load_hardware(text)
    except HardwareProfileError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def file_name(text: str) -> str:
    """A name that becomes a file name (a profile's): letters, digits, ``.``, ``_`` and ``-``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '.', '_' and '-' only")
    return text


def check_slots(slots, top_k: int, num_experts: int, model: str) -> str | None:
    """None if every cache size fits ``model`` (top_k <= slots <= num_experts), else the message."""
    bad = [s for s in slots if not top_k <= s <= num_experts]
    if bad:
        return (f"--slots {','.join(map(str, bad))}: {model} routes to {top_k} of {num_experts} experts per "
                f"layer; use cache sizes in {top_k}..{num_experts}")
    return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


DTYPES = ("bfloat16", "float16", "float32")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device: cuda where a GPU is visible, else cpu, with a one-line notice when it falls back
    (``device_default``)."""
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda where a GPU is visible, else cpu (with a notice)")


def device_default(args: argparse.Namespace) -> None:
    """Fills ``args.device`` left unset: cuda where a GPU is visible, else cpu, saying so on stderr."""
    import sys
    import torch
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print("note: no CUDA device is visible: running on the CPU (--device cpu; copies are synchronous "
                  "there, so engine figures check the path, not a GPU's speed)", file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --name, --device, --dtype, --out: the checkpoint and where results go."""
    p.add_argument("--model", required=True, type=existing_dir, help="a checkpoint folder (HF Mixtral/Qwen-MoE/OLMoE)")
    p.add_argument("--name", help="the model's name in results (default: the folder's name)")
    add_device_arg(p)
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on a CPU")
    p.add_argument("--out", required=True, type=Path)


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """--corpus, --prompts, --prompt-len, --new-tokens: the decode that is measured."""
    from real.corpus import DEFAULT_CORPUS_DIR
    p.add_argument("--corpus", type=existing_dir, default=str(DEFAULT_CORPUS_DIR),
                   help="prompts come from its held-out split, the training slice from its training split")
    p.add_argument("--prompts", type=positive_int, default=4)
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--new-tokens", type=positive_int, default=64)


def add_measurement_args(p: argparse.ArgumentParser) -> None:
    """--repeats, --deadline-s: how the engine figures are measured (``real.measurement``)."""
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="measured runs per configuration, interleaved; each figure is their median (1: one cold run "
                        "each, no warm-up, for smoke use)")
    p.add_argument("--deadline-s", type=positive_float,
                   help="start no measurement round that would end later than this many seconds after the command "
                        "started (the rounds done are the figures)")


def host_memory_error(shape, dtype_bytes: int, device: str) -> str | None:
    """Why a random-weight model of ``shape`` would not fit in this machine's available host memory (its
    experts live on the host; on a CPU every weight does), or None; None too where the available memory
    cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    experts = shape.num_layers * shape.num_experts * shape.expert_params
    others = shape.num_layers * (shape.attention_params + shape.num_experts * shape.hidden_size) \
        + 2 * shape.vocab_size * shape.hidden_size
    need = dtype_bytes * (experts + (others if device == "cpu" else 0))
    if need <= 0.9 * available:
        return None
    return (f"shape {shape.name}: its weights need {need / 1e9:.1f} GB of host memory in {8 * dtype_bytes}-bit "
            f"(the experts{' and every other weight' if device == 'cpu' else ''}) and this machine has "
            f"{available / 1e9:.1f} GB available; replay a smaller shape (--shape, or a trace of one), or use a "
            f"machine with more memory")


PRECISION_OF_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def check_model_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fills ``args.name``, ``args.dtype`` (default: bfloat16 on CUDA, float32 on a CPU) and ``args.precision``
    (the simulator's expert format for ``args.dtype``: bf16, fp16 or fp32); ``p.error`` for a CUDA device that
    is not there, an ``--out`` that is (or lies below) a file, and a checkpoint whose config.json is missing,
    malformed or of an unsupported quantization; ``cpu_threads`` on a CPU. Sets ``args.config`` (its
    ``MoEConfig``), before anything loads or is written."""
    import torch
    device_default(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu)")
    args.name = args.name or args.model.name
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.precision = PRECISION_OF_DTYPE[args.dtype]
    cpu_threads(args.device)
    check_out(p, args.out)
    args.config = checked_config(p, args.model)


def cpu_threads(device: str) -> None:
    """On a CPU, one intra-op thread for everything the command times. A batch-1 decode's operations are too
    small to gain from torch's intra-op threads, and each parallel region waits for its slowest thread: with
    as many threads as cores, any other process on the machine deschedules one and the region waits a
    scheduler slice (a 2-core machine under load measured 8 ms per attention call instead of 0.09 ms, the
    calibration's patterns 104 ms a step instead of 1 ms). One thread times the same work the same way in
    the calibration and in the runs it predicts. Nothing on CUDA."""
    import torch
    if str(device) == "cpu":
        torch.set_num_threads(1)


def resolved(args: argparse.Namespace) -> dict:
    """``args`` as plain YAML values (paths as strings, tuples as lists), for the resolved config."""
    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    # not arguments: the subcommand's function, and what the checks derived (the checkpoint's config, its text)
    return {k: plain(v) for k, v in vars(args).items() if k not in ("func", "config", "text")}


def check_out(p: argparse.ArgumentParser, out: Path) -> None:
    """``p.error`` when no results folder can be made at --out ``out`` (``traces.io.output_problem``: a file in
    the way, or a nearest existing folder nothing can be created in)."""
    from traces.io import output_problem
    problem = output_problem(out)
    if problem is not None:
        p.error(f"--out {out}: {problem}")


def checked_config(p: argparse.ArgumentParser, model: Path) -> MoEConfig:
    """The checkpoint's config, read and checked as loading it will (``p.error`` naming --model and the fix)."""
    from real.checkpoint import CONFIG_NAME, CheckpointError, read_config, weight_quantization
    try:
        config, config_dict = read_config(model)
        weight_quantization(config_dict, model / CONFIG_NAME)
    except CheckpointError as err:
        p.error(f"--model {' '.join(str(err).split())}")
    return config


def check_text(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checkpoint's tokenizer and the corpus (``args.corpus``), before anything loads or is written: sets
    ``args.text`` (tokenizer, domains); ``p.error`` naming the argument and the fix."""
    from real.bench.text import load_text
    try:
        args.text = load_text(args.model, args.corpus)
    except FileNotFoundError as err:        # load_corpus: the files the folder lacks, and --corpus
        p.error(" ".join(str(err).split()))
    except (OSError, ValueError) as err:    # transformers: no tokenizer files in the checkpoint folder
        p.error(f"--model {args.model}: no tokenizer loads from it ({type(err).__name__}); save the model's "
                f"tokenizer into the folder (tokenizer.save_pretrained)")


@contextlib.contextmanager
def checkpoint_errors_exit():
    """Around loading a checkpoint whose config.json was checked with the arguments (``check_model_args``):
    damaged or missing weights (a ``CheckpointError``) are one ``error: --model ...`` line and exit code 2, not
    a traceback."""
    import sys
    from real.checkpoint import CheckpointError
    try:
        yield
    except CheckpointError as err:
        print(f"error: --model {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def load_model_checkpoint(args: argparse.Namespace, dtype):
    """``real.checkpoint.load_checkpoint(args.model, dtype)`` under ``checkpoint_errors_exit``: (config, tensors)."""
    from real.checkpoint import load_checkpoint
    with checkpoint_errors_exit():
        return load_checkpoint(args.model, dtype)
