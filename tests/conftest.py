import os

from hypothesis import HealthCheck, settings

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
