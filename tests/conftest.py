import os

# The tests' models are tiny: torch's intra-op threads only contend for the cores (on a loaded 2-core
# machine a 16-element softmax took 11 ms with two threads, 5 us with one). Set before torch is imported;
# subprocesses (the sweep's workers, the commands' CLI tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
