# Layer-steps per CPU second of the reference path (sim.simulator.simulate(path="reference")) for four
# cases of the default sample trace, and their hits (which must not change).
import time

from traces import load_trace
from sim.simulator import simulate
from policies.registry import resolve_policy
from hardware.profile import load_hardware
from offload.session import RunSettings
t = load_trace("traces/samples/gpt-oss-20b-sample.npz")
hw = load_hardware("h100-pcie5")
for pol, slots in [("lru", 4), ("lru", 8), ("oracle", 8), ("affinity", 8)]:
    train, run = t.split(0.25) if pol == "affinity" else (None, t)
    start = time.process_time()
    result = simulate(run, resolve_policy(pol), hw, RunSettings(slots, "per_layer"), train_trace=train, path="reference")
    seconds = time.process_time() - start
    print(f"{pol}:{slots} hits {result.stats.hits} {run.num_tokens * run.model.num_layers / seconds:,.0f}/s")
