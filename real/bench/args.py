"""Typed values for the engine commands' arguments (argparse ``type=`` functions) and the checks that
need the model: every value is checked where it enters, before anything is measured. A bad value
raises ``argparse.ArgumentTypeError`` naming it and the fix; argparse turns that into one line and
exit code 2. The sweep reads its ``key=value`` tokens' values with ``scalar_value``, which --policy-param
shares."""
from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hardware.profile import HardwareProfileError, load_hardware
from offload.policy import check_params
from offload.predictors import predictor_name
from offload.session import RunSettings, SettingsError
from policies.registry import resolve_policy

if TYPE_CHECKING:
    from real.checkpoint import MoEConfig
    from traces import ModelShape, Trace


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


def _once(values: tuple) -> None:
    """A list option's values, each given once: a repeat would be the same configuration twice."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once; give each once")


def slot_list(text: str) -> tuple[int, ...]:
    """"2,4,6": expert slots per layer, each a valid ``RunSettings.cache_slots`` (the model's range is
    checked later, by ``check_slots``)."""
    slots = tuple(_int(s) for s in text.split(","))
    _once(slots)
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
    _once(names)
    for name in names:
        try:
            resolve_policy(name)
        except ValueError as e:       # the registry's error: names the policy and the fix
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def config_list(text: str) -> tuple[tuple[str, int], ...]:
    """"lru:2,oracle:6,my.py:Mine:4": (policy, slots) pairs, each split on its last colon, the policy resolved
    (``policy_list``) and the size a valid ``RunSettings.cache_slots`` (``slot_list``; the model's range is checked
    later, by ``check_slots``), each pair once."""
    pairs = []
    for spec in text.split(","):
        policy, colon, slots = spec.rpartition(":")
        if not colon or not policy:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected POLICY:SLOTS (e.g. lru:4), comma-separated")
        pairs.append((policy_list(policy)[0], slot_list(slots)[0]))
    _once(tuple(f"{p}:{s}" for p, s in pairs))
    return tuple(pairs)


def scalar_value(text: str) -> Any:
    """A value as the sweep reads one (``experiments.overrides``, for its ``key=value`` tokens) and --policy-param
    too: YAML-like, null, booleans, ints, floats (``1e9`` included), else the string itself; a quoted value
    (``"1"``) is the string, as in a YAML scenario."""
    stripped = text.strip()
    try:
        value = yaml.safe_load(stripped) if stripped else ""
    except yaml.YAMLError:
        return stripped
    if isinstance(value, str):
        if value != stripped:            # quoted: the text between the quotes, never a number
            return value
        try:
            return float(value)          # YAML 1.1 reads 1e9 as a string
        except ValueError:
            return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return stripped                     # a YAML list/mapping inside a token is kept as text


def policy_param(text: str) -> str:
    """--policy-param "oracle.cross_tokens=false": checked (``parse_policy_param``) and kept as written, for the
    resolved config; ``check_policy_params`` groups them once the command's --policies are known."""
    parse_policy_param(text)
    return text


def parse_policy_param(text: str) -> tuple[str, str, Any]:
    """"NAME.KEY=VALUE" as (policy, parameter, value): NAME one of the command's --policies (a file's
    ``my.py:Mine`` too, its last dot taken as the separator), KEY a name, VALUE read as the sweep reads a
    ``policy.KEY=VALUE`` override (``scalar_value``); one value, since an engine command runs each policy at one
    setting (a list sweeps in the sweep)."""
    spec, equals, value = text.partition("=")
    policy, dot, key = spec.strip().rpartition(".")
    if not equals or not dot or not policy or not key.isidentifier() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME.KEY=VALUE, a policy of --policies, its parameter "
                                         f"and the value (e.g. oracle.cross_tokens=false)")
    if "," in value:
        raise argparse.ArgumentTypeError(f"{text}: one value per parameter (an engine command runs each policy at "
                                         f"one setting; sweep a list with python -m experiments.sweep "
                                         f"policy.{key}=a,b)")
    return policy, key, scalar_value(value)


def add_policy_param_arg(p: argparse.ArgumentParser) -> None:
    """--policy-param NAME.KEY=VALUE, repeatable: a parameter a policy of --policies declares (checked by
    ``check_policy_params`` once the arguments are parsed)."""
    p.add_argument("--policy-param", type=policy_param, action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a parameter for the policy NAME of --policies (as the sweep's policy.KEY=VALUE: "
                        "e.g. oracle.cross_tokens=false); repeat it for more; the tables name the policy with its "
                        "parameters")


@dataclass(frozen=True)
class PolicyParams:
    """The parameters --policy-param gives each policy of a command's --policies, as policy -> ((name, value), ...)
    sorted by name, and the label each such policy goes by in every table and configuration (the sweep's:
    ``oracle policy.cross_tokens=false``); a policy given none runs at its defaults under its plain name."""
    given: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def of(self, policy: str | None) -> dict[str, Any]:
        """``policy``'s parameters (``RunSettings.policy_params``); none for None or a policy given none."""
        return dict(dict(self.given).get(policy, ()))

    def label(self, policy: str) -> str:
        """``policy`` as the tables name it: with its parameters, or its name alone when it is given none."""
        return dict(self.labels).get(policy, policy)

    def policy(self, label: str) -> str:
        """The policy ``label`` (``PolicyParams.label``) names."""
        return {lab: p for p, lab in self.labels}.get(label, label)

    def predictor(self, policy: str) -> str | None:
        """The live predictor ``policy`` consults with its parameters (``offload.predictors.predictor_name``: a
        ``predictor`` parameter names another), or None."""
        return predictor_name(resolve_policy(policy), self.of(policy))

    def consulted(self, policies: Iterable[str]) -> set[str]:
        """The live predictors ``policies`` consult with their parameters (``predictor``): those an engine command
        builds; empty when none is predictive (LRU, Belady, ...)."""
        return {n for n in map(self.predictor, policies) if n is not None}


# How a policy given parameters is named: ``experiments.config.policy_label`` (policy, sorted (name, value) pairs)
# -> label, passed in by the commands, as the sweep's table names it (real/ never imports experiments/).
Label = Callable[[str, list], str]


def policy_params(texts: Iterable[str], policies: Iterable[str], label: Label) -> PolicyParams:
    """--policy-param ``texts`` grouped per policy, each policy given some named by ``label``. Raises ValueError,
    one line naming the --policy-param and the fix, for a NAME not among ``policies``, a parameter given twice, or
    one its policy does not declare (``offload.policy.check_params``'s words, as the sweep and
    ``experiments.validate`` say it)."""
    policies = list(policies)
    grouped: dict[str, dict[str, Any]] = {}
    for text in texts:
        policy, key, value = parse_policy_param(text)
        if policy not in policies:
            raise ValueError(f"--policy-param {text}: {policy} is not among the policies this command runs "
                             f"({', '.join(policies)}); add it to --policies, or name one of them")
        if key in grouped.setdefault(policy, {}):
            raise ValueError(f"--policy-param {text}: {policy}.{key} is given twice; give it once")
        try:
            check_params(resolve_policy(policy), {key: value})
        except ValueError as err:
            raise ValueError(f"--policy-param {text}: {err}") from None
        grouped[policy][key] = value
    given = tuple((p, tuple(sorted(grouped[p].items()))) for p in policies if p in grouped)
    return PolicyParams(given, tuple((p, label(p, list(items))) for p, items in given))


def policy_build_error(params: PolicyParams, shape: ModelShape, slots: int, prefetch_depth: int,
                       trace: Trace | None = None, train: Trace | None = None) -> str | None:
    """Why a policy given parameters refuses them (a value of the wrong type or out of its range), or None: each
    such policy's run assembled once (``offload.session.open_session``) at ``slots`` per layer, as the sweep builds
    every policy before its runs, on ``trace`` and the training slice ``train`` (where the command has them before
    it runs; else two steps of ``shape``'s routing, ``traces.synthetic.pattern_trace``); a policy that consults a
    predictor reads one of that name that predicts nothing, and must name one of the engine's live predictors.
    The message is the policy's refusal in its own words, with its file and line."""
    import dataclasses

    import numpy as np

    from offload.predictors import policy_depth, predictor_for
    from offload.session import open_session
    from policies.registry import crash_site
    from real.bench.predictor_suite import LIVE_PREDICTORS
    from traces.synthetic import pattern_trace
    for policy, given in params.given:
        cls = resolve_policy(policy)
        what = f"--policy-param for {params.label(policy)}"
        name = params.predictor(policy)
        if name is not None and name not in LIVE_PREDICTORS:
            return (f"{what}: {policy} would consult the predictor {name!r}; the engine's live predictors are "
                    f"{', '.join(LIVE_PREDICTORS)}")
        run, learn = trace, train
        if run is None or name is not None:     # the engine's predictors exist only once the model runs
            run = pattern_trace(shape, 2, "hits")
            learn = run
        if name is not None:
            depth = policy_depth(cls, prefetch_depth)
            silent = np.zeros((run.num_tokens, shape.num_layers, depth, shape.num_experts), dtype=np.float32)
            run = dataclasses.replace(run, predictions={name: silent})
        settings = RunSettings(cache_slots=slots, prefetch_depth=prefetch_depth, policy_params=dict(given))
        try:
            open_session(shape, cls, settings, expert_bytes=1, trace=run, train_trace=learn,
                         predictor=predictor_for(cls, settings.policy_params, prefetch_depth, trace=run))
        except (Exception, SystemExit) as err:  # noqa: BLE001  (whatever building raises would fail every run)
            site = crash_site(cls, err)
            if isinstance(err, ValueError):     # the policy refuses its inputs, in its own words with the fix
                return f"{what}: {' '.join(str(err).split())} (at {site})"
            return (f"{what}: building the policy raised {type(err).__name__}: {' '.join(str(err).split())} at "
                    f"{site}; fix its __init__")
    return None


TIMED_POLICY = "lru"     # the default --timed-policy (engine_bench live, measure_policies)


def timed_policy_error(timed: str | None, policies: Iterable[str]) -> str | None:
    """Why --timed-policy ``timed`` names no run of the command's ``policies`` (the timed run would silently not
    happen), or None. The default (``TIMED_POLICY``) among none of them is no timed run, as before; a name given
    must be one of them."""
    policies = list(policies)
    if timed is None or timed in policies or timed == TIMED_POLICY:
        return None
    try:
        resolve_policy(timed)
    except ValueError as err:
        return f"--timed-policy {timed}: {' '.join(str(err).split())}"
    return (f"--timed-policy {timed}: not among the policies this command runs ({', '.join(policies)}); name one of "
            f"them, or add it to --policies")


def check_policy_params(p: argparse.ArgumentParser, args: argparse.Namespace, policies: Iterable[str], label: Label,
                        shape: ModelShape, slots: int, prefetch_depth: int, trace: Trace | None = None,
                        train: Trace | None = None) -> None:
    """Sets ``args.policy_params`` (``policy_params``: ``args.policy_param`` for the command's ``policies``, named
    by ``label``), each policy given some built once (``policy_build_error``), and ``args.timed_policy`` (where the
    command has one) one of ``policies`` (``timed_policy_error``); ``p.error`` naming the option and the fix, before
    anything is measured."""
    policies = list(policies)
    try:
        args.policy_params = policy_params(args.policy_param, policies, label)
    except ValueError as err:
        p.error(str(err))
    error = timed_policy_error(getattr(args, "timed_policy", None), policies)
    if error:
        p.error(error)
    error = policy_build_error(args.policy_params, shape, slots, prefetch_depth, trace, train)
    if error:
        p.error(error)


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


def result_name(text: str) -> str:
    """--name: the model's name in the tables and in the files named after it (OUT/<name>-trace.npz): not empty,
    no folder (no '/', no '\\'), not '.' or '..'."""
    if not text.strip() or text.strip() in (".", "..") or any(c in text for c in "/\\\0"):
        raise argparse.ArgumentTypeError(f"{text!r}: the name goes into file names (OUT/<name>-trace.npz); give a plain "
                                         f"name, without '/' or '\\', not '.' or '..' (e.g. my-model)")
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


def _kernel_switch_names() -> tuple[str, str, str]:
    from real.graphs import DISABLE_ENV
    from real.layer_ops import COMPILE_ENV, REDUCTIONS_ENV
    return COMPILE_ENV, REDUCTIONS_ENV, DISABLE_ENV


def kernel_path(device_type: str) -> dict[str, bool]:
    """The kernels an engine model on ``device_type`` ('cuda' or 'cpu') runs, as the environment's switches
    choose them: ``compile`` (``MOE_LAB_COMPILE``, ``real.layer_ops.compile_default``: the layer's functions
    compiled by Inductor; default on CUDA), ``reductions`` (``MOE_LAB_REDUCTIONS``,
    ``real.layer_ops.reductions_default``: compiled batch-1 products as reductions; default when compiling)
    and ``expert_graphs`` (``MOE_LAB_EXPERT_GRAPHS=0`` turns them off, ``real.graphs``; CUDA only). A
    measurement records it in its settings, so that runs of one kernel path are never reused for another."""
    import os
    import torch
    from real.layer_ops import compile_default, reductions_default
    compile_ = compile_default(torch.device(device_type))
    return {"compile": compile_, "reductions": reductions_default(compile_),
            "expert_graphs": device_type == "cuda" and os.environ.get(_kernel_switch_names()[2]) != "0"}


def switched_kernel_path(device_type: str) -> dict[str, bool] | None:
    """``kernel_path`` when any of its switches is set in the environment, else None (the defaults): for keys
    that results measured before the path was recorded must still reproduce."""
    import os
    return kernel_path(device_type) if any(n in os.environ for n in _kernel_switch_names()) else None


def kernel_switch_error(device_type: str) -> str | None:
    """Why the engine's kernels cannot be built on ``device_type`` as the environment's switches ask, or None:
    a switch (``kernel_path``'s three) set to other than 0 or 1, which would silently mean the default, or
    compiling asked for (``MOE_LAB_COMPILE=1``, or the CUDA default) where Inductor cannot build kernels (no
    C++ compiler for the CPU, no triton for CUDA). The line names the variable and the fix."""
    import os
    import torch
    from real.layer_ops import COMPILE_ENV, can_compile
    for name in _kernel_switch_names():
        if name in os.environ and os.environ[name] not in ("0", "1"):
            return f"{name}={os.environ[name]!r}: set it to 0 or 1, or unset it for the default"
    if kernel_path(device_type)["compile"]:
        why = can_compile(torch.device(device_type))
        if why is not None:
            asked = f"{COMPILE_ENV}=1 asks" if device_type == "cpu" else "on CUDA the engine compiles by default and needs"
            return (f"{asked} to compile the layer's kernels, which cannot run here: {why}; set {COMPILE_ENV}=0 "
                    f"for PyTorch's eager kernels")
    return None


def check_kernel_switches(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``p.error`` for ``kernel_switch_error`` on ``args.device``; sets ``args.kernel_path`` (``kernel_path``: in
    the command's settings and resolved config, so a configuration measured on another path is measured again)."""
    error = kernel_switch_error(args.device)
    if error:
        p.error(error)
    args.kernel_path = kernel_path(args.device)


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
    p.add_argument("--name", type=result_name, help="the model's name in results (default: the folder's name)")
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


DEADLINE_HELP = ("seconds after the command started; checked before every configuration's warm-up (none starts that "
                 "would end past it at the previous warm-up's pace; configurations not warmed up are not measured), "
                 "before the first round (none once it has passed), before every later round (none that would end past "
                 "it at the last round's pace) and, in live, before the calibration (past it: no calibration, no policy "
                 "runs); a warm-up or round under way, the recording and predictor training are not cut short; one "
                 "line says what was skipped, what finished is kept")


def add_measurement_args(p: argparse.ArgumentParser) -> None:
    """--repeats, --deadline-s: how the engine figures are measured (``real.measurement``)."""
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="measured runs per configuration, interleaved; each figure is their median (1: one cold run "
                        "each, no warm-up, for smoke use)")
    p.add_argument("--deadline-s", type=positive_float,
                   help=DEADLINE_HELP)


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
    check_kernel_switches(p, args)
    args.name = args.name or args.model.resolve().name     # (`--model .` names the folder it is)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.precision = PRECISION_OF_DTYPE[args.dtype]
    cpu_threads(args.device)
    check_out(p, args.out)
    args.config = checked_config(p, args.model)
    error = sequence_length_error(args, args.config)
    if error:
        p.error(error)


def sequence_length_error(args: argparse.Namespace, config: MoEConfig) -> str | None:
    """Why the decodes ``args`` asks for do not fit the engine's KV cache, or None: a prompt (``--prompt-len``)
    plus its ``--new-tokens``, or a scored window (``--score-len``), past the positions a ``real.model.MoEModel``
    of ``config`` holds (its ``max_position_embeddings``, at most ``real.model.DEFAULT_MAX_LEN``)."""
    from real.model import DEFAULT_MAX_LEN
    limit = min(config.max_position_embeddings, DEFAULT_MAX_LEN)
    where = (f"the model holds {limit} positions (config.json's max_position_embeddings "
             f"{config.max_position_embeddings}" + (f", the engine's cap {DEFAULT_MAX_LEN}"
                                                     if limit < config.max_position_embeddings else "") + ")")
    prompt_len, new_tokens = getattr(args, "prompt_len", None), getattr(args, "new_tokens", None)
    if prompt_len is not None and new_tokens is not None and prompt_len + new_tokens > limit:
        return (f"--prompt-len {prompt_len} + --new-tokens {new_tokens} = {prompt_len + new_tokens} positions: "
                f"{where}; lower them to {limit} in all")
    score_len = getattr(args, "score_len", None)
    if score_len is not None and score_len > limit:
        return f"--score-len {score_len}: {where}; use --score-len {limit} or less"
    return None


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
    # not arguments: the subcommand's function, and what the checks derived (the checkpoint's config, its text, the
    # --policy-param grouped per policy: the texts are there)
    return {k: plain(v) for k, v in vars(args).items() if k not in ("func", "config", "text", "policy_params")}


# What the engine commands write into --out under fixed names (``real.bench.table``, ``real.bench.engine_runs``, the
# commands), files and folders: one of the wrong kind already there would fail the first write after measuring.
RESULT_FILES = ("engine.csv", "policies.csv", "correctness.csv", "noise_runs.csv", "noise_floor.csv",
                "noise_sessions.json", "host_probe.csv", "hf_parity.json", "calibration.json",
                "profile_fit_notes.json", "gate_recall.csv")
RESULT_FOLDERS = ("errors",)        # a failed run's traceback: OUT/errors/<hash>.txt


def results_in_the_way(out: Path) -> str | None:
    """Why a command could not write its results into the folder ``out``, or None: a folder where one of the
    ``RESULT_FILES`` (or a ``resolved_config-*.yaml``) goes, or a file where one of the ``RESULT_FOLDERS`` goes."""
    out = Path(out)
    if not out.is_dir():
        return None
    folders = [out / n for n in RESULT_FILES if (out / n).is_dir()] + sorted(
        f for f in out.glob("resolved_config-*.yaml") if f.is_dir())
    if folders:
        return f"{folders[0]} is a folder where the command writes a file; move it away, or give another --out"
    files = [out / n for n in RESULT_FOLDERS if (out / n).exists() and not (out / n).is_dir()]
    if files:
        return (f"{files[0]} is a file where the command keeps a folder (failed runs' tracebacks); move it away, or "
                f"give another --out")
    return None


def check_out(p: argparse.ArgumentParser, out: Path) -> None:
    """``p.error`` when no results folder can be made at --out ``out`` (``traces.io.output_problem``: a file in
    the way, or a nearest existing folder nothing can be created in), or one of its results could not be written
    there (``results_in_the_way``)."""
    from traces.io import output_problem
    problem = output_problem(out) or results_in_the_way(out)
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
    ``args.text`` (tokenizer, domains); ``p.error`` naming the argument and the fix, also for prompts the corpus
    cannot give (``real.bench.text.prompt_problem``: more than its domains, or an empty split)."""
    from real.bench.text import load_text
    try:
        args.text = load_text(args.model, args.corpus)
    except FileNotFoundError as err:        # load_corpus: the files the folder lacks, and --corpus
        p.error(" ".join(str(err).split()))
    except (OSError, ValueError) as err:    # transformers: no tokenizer files in the checkpoint folder
        p.error(f"--model {args.model}: no tokenizer loads from it ({type(err).__name__}); save the model's "
                f"tokenizer into the folder (tokenizer.save_pretrained)")
    if getattr(args, "prompts", None) is not None:
        from real.bench.text import prompt_problem
        problem = prompt_problem(*args.text, args.prompts, getattr(args, "train_prompts", 0), args.prompt_len)
        if problem:
            p.error(problem if problem.startswith("--") else f"--corpus {args.corpus}: {problem}")


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
