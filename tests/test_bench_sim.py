"""experiments.bench_sim's profile summary: where a reference run's time goes, by file and package."""
import cProfile
import pstats

import pytest

from experiments.bench_sim import OUTSIDE, time_by_file
from hardware.profile import load_hardware
from offload.session import RunSettings
from policies.registry import resolve_policy
from sim.simulator import simulate
from traces import synthetic_trace


def test_time_by_file_names_the_clock_the_core_and_the_policy_and_sums_to_the_whole():
    trace = synthetic_trace(num_tokens=40, num_layers=3, num_experts=8, top_k=2, num_requests=2, seed=3)
    profiler = cProfile.Profile()
    profiler.enable()
    simulate(trace, resolve_policy("lru"), load_hardware("h100-pcie5"), RunSettings(cache_slots=3),
             path="reference")
    profiler.disable()
    steps = trace.num_tokens * trace.num_layers
    lines = time_by_file(pstats.Stats(profiler), steps).splitlines()
    assert f"({steps} layer-steps)" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:]}
    for name in ("sim/", "  sim/simulator.py", "offload/", "  offload/controller.py", "policies/", "  policies/lru.py"):
        assert name.strip() in rows, lines
    assert any(line.startswith(OUTSIDE) for line in lines)
    # the packages' shares and the outside line make the whole profile; files are listed under their package
    shares = [float(line[44:].split()[0].rstrip("%")) for line in lines[1:] if not line.startswith(" ")]
    assert abs(sum(shares) - 100.0) < 0.5, lines
    assert all(line.startswith("  ") == ("/" in line.split()[0] and not line.split()[0].endswith("/"))
               for line in lines[1:] if not line.startswith(OUTSIDE))


def test_a_trace_of_fewer_experts_runs_the_cases_its_layers_can_hold(capsys, monkeypatch):
    """The cases are sized for the default trace (32 experts): on a 6-expert trace the larger ones are
    skipped with a line saying why, instead of a SettingsError traceback before anything ran."""
    import experiments.bench_sim as bench
    monkeypatch.setattr(bench, "_MIN_TIMED_S", 0.01)
    monkeypatch.setattr(bench, "PREDICTIVE_CASES", [])
    from pathlib import Path
    bench.main(["--trace", str(Path(__file__).parent / "data" / "tiny-moe-trace.npz"), "--repeat", "1"])
    out = capsys.readouterr().out
    assert "lru     8     1  skipped: tiny-moe routes to 2 of 6 experts per layer" in out
    assert "lru     4     1" in out and out.count("reference") >= 1


def test_a_policy_of_ones_own_has_its_own_group_not_other(tmp_path):
    policy_file = tmp_path / "my_policy.py"
    policy_file.write_text("from policies.lru import LRU\n\n\nclass MyPolicy(LRU):\n"
                           "    def choose_victim(self, *args, **kwargs):\n"
                           "        sum(range(200))\n        return super().choose_victim(*args, **kwargs)\n")
    trace = synthetic_trace(num_tokens=40, num_layers=3, num_experts=8, top_k=2, num_requests=2, seed=3)
    profiler = cProfile.Profile()
    profiler.enable()
    simulate(trace, resolve_policy(f"{policy_file}:MyPolicy"), load_hardware("h100-pcie5"), RunSettings(cache_slots=3),
             path="reference")
    profiler.disable()
    lines = time_by_file(pstats.Stats(profiler), trace.num_tokens * trace.num_layers).splitlines()
    assert any(line.startswith("your code/") for line in lines), lines
    assert any(line.strip().startswith(str(policy_file.resolve())) for line in lines), lines


def test_compile_counts_count_the_replay_kernels_first_call():
    """bench_sim's cold start reads them (once through the kernel's private dispatcher)."""
    import numpy as np
    from sim import kernels
    from traces import synthetic_trace
    trace = synthetic_trace(num_tokens=10, num_layers=2, num_experts=4, top_k=2, num_requests=1, seed=1)
    kernels.replay(trace.experts, 4, 2, False, kernels.LRU, np.empty(0, np.int64), np.empty(0, bool), None)
    assert sum(kernels.compile_counts()) >= 1


_TINY = str(__import__("pathlib").Path(__file__).parent / "data" / "tiny-moe-trace.npz")    # 6 experts, top-2
_RAISES = "    def choose_victim(self, scope, cache, job):\n        raise RuntimeError('boom')\n"
_OUT_OF_RANGE = "    def choose_victim(self, scope, cache, job):\n        return 10_000\n"


def _policy_file(tmp_path, body: str):
    path = tmp_path / "my_policy.py"
    path.write_text(f"from policies.lru import LRU\n\n\nclass MyPolicy(LRU):\n{body}")
    return path


def _profile_only(monkeypatch, profile: str):
    """bench_sim's main with ``--profile``, its benchmark replaced by a failure: the profiled case must run first."""
    import experiments.bench_sim as bench

    def benchmark(*args):
        raise AssertionError("the benchmark ran before the profiled case")
    monkeypatch.setattr(bench, "_fast_cold_start", benchmark)
    monkeypatch.setattr(bench, "python_loop_ns", lambda: 1.0)
    bench.main(["--trace", _TINY, "--repeat", "1", "--profile", profile])


@pytest.mark.parametrize("body, said, line", [
    (_RAISES, "policy MyPolicy.choose_victim raised RuntimeError: boom", 6),        # the line that raised
    (_OUT_OF_RANGE, "PolicyError: policy MyPolicy.choose_victim returned 10000", 5)])   # the hook that returned it
def test_a_failing_policy_of_ones_own_is_one_line_before_the_benchmark(tmp_path, monkeypatch, capsys, body, said,
                                                                       line):
    path = _policy_file(tmp_path, body)
    with pytest.raises(SystemExit) as exit_:
        _profile_only(monkeypatch, f"{path}:MyPolicy:3")
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --profile {path}:MyPolicy:3: {said}") and "Traceback" not in err, err
    assert err.rstrip().endswith(f" at {path}:{line} in choose_victim"), err     # file:line, as the sweep's report


def test_a_failing_policy_is_one_line_on_the_command_line(tmp_path):
    import subprocess
    import sys
    path = _policy_file(tmp_path, _RAISES)
    done = subprocess.run([sys.executable, "-m", "experiments.bench_sim", "--trace", _TINY, "--repeat", "1",
                           "--profile", f"{path}:MyPolicy:3"], capture_output=True, text=True, timeout=120,
                          cwd=__import__("pathlib").Path(__file__).parents[1])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (f"error: --profile {path}:MyPolicy:3: policy MyPolicy.choose_victim raised "
                                   f"RuntimeError: boom at {path}:6 in choose_victim")
    assert "layer-steps/s" not in done.stdout       # the benchmark's table never started


def test_an_error_of_the_toolkit_keeps_its_traceback(tmp_path, monkeypatch):
    """Only a policy of one's own is reported in one line: the toolkit's own error (here in the simulator, with
    a working policy of one's own) is raised as it is."""
    import experiments.bench_sim as bench

    def simulate(*args, **kwargs):
        raise ZeroDivisionError("a bug of the toolkit")
    monkeypatch.setattr(bench, "simulate", simulate)
    path = _policy_file(tmp_path, "    pass\n")
    with pytest.raises(ZeroDivisionError, match="a bug of the toolkit"):
        _profile_only(monkeypatch, f"{path}:MyPolicy:3")
    with pytest.raises(ZeroDivisionError):      # a built-in policy's run: the toolkit's too
        _profile_only(monkeypatch, "lru:3")
