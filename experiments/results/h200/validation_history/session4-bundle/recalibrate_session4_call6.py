"""Re-run only the calibration of some validation slices (session 4, call 6): the event-free pattern timing."""
import sys, time
from pathlib import Path
import torch
from experiments.validate import Inputs
from validation.engine_side import SliceMeasurement
from validation.scenario import load_scenario
from validation.store import Store

scenario = load_scenario("validate-h200")
store = Store(Path(sys.argv[1]))
deadline = float(sys.argv[2])
start = time.monotonic()
for name in sys.argv[3:]:
    if time.monotonic() - start > deadline:
        print(f"{name}: skipped, past the deadline", flush=True)
        continue
    sl = scenario.select([name])[0]
    t0 = time.monotonic()
    m = SliceMeasurement(sl, store, scenario.repeats, torch.device("cuda"), torch.bfloat16)
    Inputs(store, sl.name).save(m.prepare())
    m.calibrate(48)
    print(f"{name}: calibrated in {time.monotonic() - t0:.1f} s", flush=True)
    del m
    torch.cuda.empty_cache()
