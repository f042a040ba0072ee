"""A checkpoint's compute measured for the hardware profile (``real.profile_hw``): attention, router and
one expert on the model with every expert on the GPU, then the engine's per-layer host overhead."""
from __future__ import annotations

import torch

from real.bench.recording import record_run, warm_engine
from real.model import MoEModel
from real.profile_hw import measure_compute, measure_layer_overhead
from traces import ModelShape

WARM_STEPS = 16     # a short decode whose routing trains the warm engine's (all-resident) static placement


def measure_checkpoint_compute(config, tensors, shape: ModelShape, device: torch.device, dtype: torch.dtype,
                               precision: str) -> dict:
    """``measure_compute`` of the checkpoint (``config``, ``tensors``) with every expert on ``device`` and
    its CUDA graphs captured, plus ``layer_overhead_us`` from an all-resident engine and ``precision``:
    one model's entry of ``real.profile_hw.measured_profile``. CUDA only. ``tensors`` may be freed after."""
    resident = MoEModel(config, tensors, device=device, dtype=dtype)
    resident.capture_graphs()
    compute = measure_compute(resident)
    del resident
    torch.cuda.empty_cache()
    host = MoEModel(config, tensors, device=device, dtype=dtype, experts_device="cpu")
    train, _ = record_run(host, shape, [[1]], WARM_STEPS, source="real.bench.profiling", hidden=False,
                          description="a short greedy decode that places the warm engine's experts")
    compute["layer_overhead_us"] = measure_layer_overhead(warm_engine(host, shape, train), compute)
    compute["precision"] = precision
    return compute
