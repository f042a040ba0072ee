"""Re-key the validation bundle's engine results to the engine-code key of `validation.store.engine_code` (the
modules the engine side imports, transitively), which replaced the digest of the whole engine packages in
session 7. Safe only where the runs' code is unchanged by that definition; checked before this ran:

    git worktree add /tmp/wt ffd1dd8 && cp validation/store.py /tmp/wt/validation/store.py
    (cd /tmp/wt && PYTHONPATH=/tmp/wt python -c "import validation.store as s; print(s.engine_code())")
    python -c "import validation.store as s; print(s.engine_code())"         # the same digest: 24c04212...

(ffd1dd8 measured the bundle; since then only real/calibration.py changed among the engine packages, which no
engine run executes). Each slice must hold exactly one result per configuration (no ambiguity), else it stops.

    python experiments/results/h200/session7/rekey.py experiments/results/h200/validation
"""
import json
import sys
from pathlib import Path

from experiments.validate import slice_inputs
from validation.engine_side import engine_key
from validation.scenario import load_scenario
from validation.store import Store

out = Path(sys.argv[1])
store = Store(out)
scenario = load_scenario((out / "scenario.txt").read_text().strip())
moved = 0
for sl in scenario.slices:
    inputs = slice_inputs(sl, store)
    files = sorted((out / "engine" / sl.name).glob("*.json"))
    by_config = {}
    for f in files:

        r = json.loads(f.read_text())
        by_config.setdefault((r["policy"], r["cache_slots"]), []).append(f)
    assert all(len(v) == 1 for v in by_config.values()), f"{sl.name}: more than one result for a configuration"
    for (policy, slots), (f,) in by_config.items():
        new = engine_key(sl, inputs, policy, slots)
        if f.stem == new:
            continue
        r = store.read(f)
        r["key"] = new
        store.write(store.path("engine", sl.name, new), r)
        timed = f.with_name(f"{f.stem}-timed.npz")
        if timed.is_file():
            timed.rename(store.path("engine", sl.name, new, "-timed.npz"))
        f.unlink()
        moved += 1
print(f"re-keyed {moved} engine results in {out}")
