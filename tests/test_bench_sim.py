"""experiments.bench_sim's profile summary: where a reference run's time goes, by file and package."""
import cProfile
import pstats

from experiments.bench_sim import _OUTSIDE, time_by_file
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
    assert any(line.startswith(_OUTSIDE) for line in lines)
    # the packages' shares and the outside line make the whole profile; files are listed under their package
    shares = [float(line[44:].split()[0].rstrip("%")) for line in lines[1:] if not line.startswith(" ")]
    assert abs(sum(shares) - 100.0) < 0.5, lines
    assert all(line.startswith("  ") == ("/" in line.split()[0] and not line.split()[0].endswith("/"))
               for line in lines[1:] if not line.startswith(_OUTSIDE))
