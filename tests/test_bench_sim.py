"""experiments.bench_sim's profile summary: where a reference run's time goes, by file and package."""
import cProfile
import pstats

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
