"""Calibrate this machine's hardware profile for a checkpoint, the one the simulator reads, exactly as
``experiments.validate`` and ``engine_bench live`` calibrate it (``validation.profile_fit.calibrate_and_fit``):
the copy table (pinned host-to-device copy time against size), the checkpoint's kernels alone (attention
against context, router, one expert, per-token work), the engine decoding synthetic ``hits`` and ``misses``
routings (per-layer overhead, a copy's wait), and a live all-resident decode (a live model's own
per-layer overhead). Per-policy host costs need the policies' predictors: ``engine_bench live`` and
``validate`` calibrate those too.

    python -m experiments.profile --model DIR --out OUT [--hardware h100-pcie5] [--profile-name NAME]
        [--dtype bfloat16] [--device cuda|cpu]

Writes OUT/<NAME>.yaml, OUT/calibration.json, OUT/profile_fit_notes.json and OUT/resolved_config-profile.yaml.
NAME is the GPU's model from ``torch.cuda.get_device_name()`` plus ``-measured`` (an H200 writes
``h200-measured``; a CPU ``cpu-measured``), or ``--profile-name``. What is not measured (the analytic
model's HBM bandwidth and launch costs, copy engines) comes from ``--hardware``, a profile in
``hardware/profiles`` or a YAML file. On a CPU the engine copies synchronously, which the simulator does
not model: that profile checks the path, its numbers describe nothing a user runs.
"""
from __future__ import annotations

import argparse
import json

import torch

from hardware.profile import load_hardware
from offload.session import RunSettings
from real.bench.args import add_model_args, load_model_checkpoint, check_model_args, file_name, hardware_profile, resolved
from real.bench.recording import record_run
from real.bench.table import write_resolved_config
from real.model import MoEModel
from real.profile_hw import profile_name, write_profile
from traces.io import atomic_write
from validation.profile_fit import calibrate_and_fit

LIVE_PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8]]     # the live decode routes itself: any tokens will do
LIVE_TOKENS = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--hardware", type=hardware_profile, default="h100-pcie5",
                   help="the profile whose unmeasured constants (the analytic model's) the calibrated one keeps")
    p.add_argument("--profile-name", type=file_name,
                   help="the calibrated profile's name (default: <gpu>-measured, or cpu-measured on a CPU)")
    args = p.parse_args(argv)
    check_model_args(p, args)
    args.profile_name = args.profile_name or (profile_name(torch.cuda.get_device_name()) if args.device == "cuda"
                                              else "cpu-measured")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(args.out, "profile", resolved(args))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config, tensors = load_model_checkpoint(args, dtype)
    shape = config.to_model_shape(args.name)
    host = MoEModel(config, tensors, device=device, dtype=dtype, experts_device="cpu")
    del tensors
    # a short live decode: the training slice LRU's own host work per layer is timed on
    train, _ = record_run(host, shape, LIVE_PROMPTS, LIVE_TOKENS, source="experiments.profile", hidden=False,
                          description="a short greedy decode: the calibration's training slice")
    data, calibration, notes = calibrate_and_fit(
        host, shape, load_hardware(args.hardware), args.profile_name, args.precision, device, [],
        lambda slots, policy=None: RunSettings(cache_slots=slots, precision=args.precision), shape.top_k, train, 1,
        train_prompts=LIVE_PROMPTS, new_tokens=LIVE_TOKENS, command="python -m experiments.profile")
    atomic_write(args.out / "calibration.json", lambda f: json.dump(calibration, f, default=str))
    atomic_write(args.out / "profile_fit_notes.json", lambda f: json.dump(notes, f, indent=1, default=str))
    path = args.out / f"{args.profile_name}.yaml"
    hardware = write_profile(path, data)
    print(f"-> {path}", flush=True)
    return hardware


if __name__ == "__main__":
    main()
