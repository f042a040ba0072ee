import os

# The tests' models are tiny: torch's intra-op threads only contend for the cores (on a loaded 2-core
# machine a 16-element softmax took 11 ms with two threads, 5 us with one). Set before torch is imported;
# subprocesses (the sweep's workers, the commands' CLI tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# transformers' logging binds its handler to whatever sys.stderr is when it first logs: inside a test using
# capsys that is a stream closed when the test ends, and every later warning then prints a "Logging error"
# traceback into another test's output. Bind it now, to the session's stream.
from transformers.utils import logging as _transformers_logging  # noqa: E402

_transformers_logging.get_logger("transformers")

# CI has 2 cores and a time cap: a moderate number of examples, no deadline (shared machines jitter).
settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def sweep_cli(*args, timeout=120):
    """``python -m experiments.sweep ARGS`` in a fresh process from the repository root."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run([sys.executable, "-m", "experiments.sweep", *map(str, args)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout)


def calibration_timed_by_the_simulator(host_costs: dict, misses_extra=None, decisions: dict | None = None,
                                       hits_extra=None):
    """A calibration whose ``hits`` and ``misses`` patterns are timed by the simulator itself on the tiny
    shape, with known kernels and the host costs ``host_costs`` (``layer_overhead_us``, ``copy_wait_us``,
    ``miss_latency_us``, ...), as the engine would time them; fitted by ``validation.profile_fit``.
    ``misses_extra(shape)``: more fields of the misses pattern (its ``miss_issue_us``); ``hits_extra(shape)``:
    of the hits pattern (its ``decide_us``); ``decisions``: the
    policies' host work. Returns (the fitted entry, the fit's notes for the shape, the fitted profile data)."""
    from pathlib import Path

    import numpy as np

    from hardware import load_hardware
    from hardware.profile import hardware_from_dict
    from offload.session import RunSettings
    from policies.lru import LRU
    from sim.simulator import simulate
    from traces import load_shape
    from traces.synthetic import pattern_trace
    from validation.profile_fit import fit_profile
    shape = load_shape(str(Path(__file__).resolve().parent / "data" / "tiny-moe.yaml"))
    base = load_hardware("h100-pcie5")
    copies = {"copy_latency_us": 10.0, "h2d_GBps_by_MiB": {"1": 20.0, "16": 40.0}}
    compute = {"attention_us_by_ctx": {"0": 30.0, "1024": 60.0}, "router_us": 5.0, "expert_us": 12.0,
               "token_overhead_us": 40.0}
    truth = {**compute, "attention_us_by_ctx": {0: 30.0, 1024: 60.0}, **host_costs}
    made, _ = fit_profile(base, "truth", "test", copies, [])
    made["measured_compute"] = {shape.name: {"bf16": truth}}
    timing = hardware_from_dict(made, "truth")
    patterns = {}
    for pattern in ("hits", "misses"):
        run = simulate(pattern_trace(shape, 24, pattern), LRU, timing, RunSettings(cache_slots=shape.top_k))
        patterns[pattern] = {"step_ms": (np.asarray(run.token_ns) / 1e6).tolist()}
    if misses_extra is not None:
        patterns["misses"].update(misses_extra(shape))
    if hits_extra is not None:
        patterns["hits"].update(hits_extra(shape))
    calibration = {"shape": shape.to_dict(), "precision": "bf16", "compute": compute, "patterns": patterns}
    if decisions is not None:
        calibration["decisions"] = decisions
    fitted, notes = fit_profile(base, "fitted", "test", copies, [calibration])
    return fitted["measured_compute"][shape.name]["bf16"], notes[shape.name], fitted


def lru_engine_counting_copies(device: str):
    """A tiny random-weight model on ``device`` (bf16 on CUDA, fp32 on the CPU) and an LRU engine at 3 slots that
    has generated two short requests, counting per layer turn whether the layer had a copy to wait for. Returns
    (model, shape, engine, [had a copy, per layer turn in order])."""
    import torch

    from offload.session import RunSettings
    from policies.lru import LRU
    from real.engine import OffloadEngine
    from real.shape_model import random_model
    from traces import ModelShape
    shape = ModelShape("tiny-moe", num_layers=3, num_experts=6, top_k=2, hidden_size=32, expert_intermediate_size=64,
                       num_attention_heads=4, num_kv_heads=2, head_dim=8, vocab_size=64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(shape, device, dtype, seed=1, max_len=64)
    engine = OffloadEngine(model, shape, LRU, RunSettings(cache_slots=3), record_host_stamps=True)
    layers_with_a_copy = []
    begin = engine.ctrl.begin_layer

    def counting(*args):
        needs = begin(*args)
        layers_with_a_copy.append(any(job is not None for _, job in needs))
        return needs
    engine.ctrl.begin_layer = counting
    engine.generate([[1, 2, 3], [7, 8]], 8)
    return model, shape, engine, layers_with_a_copy


def mixtral_config(shape, **more) -> dict:
    """A Hugging Face Mixtral config.json for a tiny ``traces.ModelShape`` (the CLI tests' checkpoints)."""
    return {"model_type": "mixtral", "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
            "intermediate_size": shape.expert_intermediate_size, "num_hidden_layers": shape.num_layers,
            "num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim, "num_local_experts": shape.num_experts,
            "num_experts_per_tok": shape.top_k, **more}


def refused(capsys, run, *words: str) -> str:
    """``run()`` exits with code 2 and one error line, the last, that holds every one of ``words``; anything else
    on stderr is argparse's usage block (or a note, such as the CPU fallback's); no traceback. Returns the line."""
    import pytest
    with pytest.raises(SystemExit) as exit_:
        run()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    assert [line for line in lines if "error: " in line] == lines[-1:], err
    assert all(line.startswith(("usage: ", " ", "note: ")) for line in lines[:-1]), err
    assert all(w in lines[-1] for w in words), (words, lines[-1])
    return lines[-1]


@pytest.fixture
def tiny_replay_trace(tmp_path):
    """A 32-token synthetic trace (2 layers, 4 experts, top-2, 4 requests) saved in tmp_path, for engine replays."""
    from traces import save_trace, synthetic_trace
    path = tmp_path / "tiny.npz"
    save_trace(synthetic_trace(num_tokens=32, num_layers=2, num_experts=4, top_k=2, num_requests=4, seed=2), path)
    return path


def cpu_replay(trace, out, *more):
    """``engine_bench replay`` of ``trace`` on the CPU, 4 tokens, 1 repeat, into ``out`` (one intra-op thread)."""
    import torch
    from experiments.engine_bench import main as bench
    torch.set_num_threads(1)
    bench(["replay", "--trace", str(trace), "--device", "cpu", "--max-tokens", "4", "--repeats", "1",
           "--out", str(out), *more])
