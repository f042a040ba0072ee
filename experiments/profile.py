"""Measure this GPU's hardware profile, the one the simulator reads: pinned host-to-device copy time
against size, and a checkpoint's compute (attention against context, router, one expert, per-token
and per-layer host overhead).

    python -m experiments.profile --model DIR --out OUT [--hardware h100-pcie5] [--profile-name NAME]
        [--dtype bfloat16]

Writes OUT/<NAME>.yaml and OUT/resolved_config-profile.yaml. NAME is the GPU's model from
``torch.cuda.get_device_name()`` plus ``-measured`` (an H200 writes ``h200-measured``), or
``--profile-name``. What is not measured (HBM bandwidth, launch costs, copy engines) comes from
``--hardware``, a profile in ``hardware/profiles`` or a YAML file. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse

import torch

from hardware.profile import load_hardware
from real.bench.args import add_model_args, check_model_args, file_name, hardware_profile, resolved
from real.bench.profiling import measure_checkpoint_compute
from real.bench.table import write_resolved_config
from real.checkpoint import load_checkpoint
from real.profile_hw import measure_copies, measured_profile, profile_name, write_profile


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--hardware", type=hardware_profile, default="h100-pcie5",
                   help="the profile whose unmeasured constants the measured one keeps")
    p.add_argument("--profile-name", type=file_name, help="the measured profile's name (default: <gpu>-measured)")
    args = p.parse_args(argv)
    check_model_args(p, args)
    if args.device != "cuda":
        p.error("the hardware profile times CUDA copies and kernels: it needs a CUDA GPU (--device cuda)")
    args.profile_name = args.profile_name or profile_name(torch.cuda.get_device_name())
    return args


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(args.out, "profile", resolved(args))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config, tensors = load_checkpoint(args.model, dtype)
    compute = measure_checkpoint_compute(config, tensors, config.to_model_shape(args.name), device, dtype,
                                         args.precision)
    latency, table = measure_copies(device)
    profile = measured_profile(load_hardware(args.hardware), args.profile_name, torch.cuda.get_device_name(),
                               latency, table, {args.name: compute})
    path = args.out / f"{args.profile_name}.yaml"
    hardware = write_profile(path, profile)
    print(f"-> {path}", profile, flush=True)
    return hardware


if __name__ == "__main__":
    main()
