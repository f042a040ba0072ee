"""What-if: the session-5 bundle with the hits pattern's decide_us of another H200 instance (session 5 call E),
as measured ('raw') or scaled by the two machines' miss_issue ratio ('scaled').

    python experiments/results/h200/validation_whatif_prefetch_latency/whatif.py raw|scaled OUT   (from the repository root)"""
import json, shutil, subprocess, sys
import numpy as np
from pathlib import Path
mode, out = sys.argv[1], Path(sys.argv[2])
src = Path("experiments/results/h200/validation_history/session5-bundle")   # the bundle it was run on
shutil.rmtree(out, ignore_errors=True); shutil.copytree(src, out)
for s in ["moe-lm-replay", "moe-lm-random"]:
    new = json.load(open(f"experiments/results/h200/validation_whatif_prefetch_latency/calibration_callE/{s}.json"))
    f = out / "calibration" / f"{s}.json"; d = json.load(open(f))
    L = d["shape"]["num_layers"]
    dec = np.asarray(new["patterns"]["hits"]["decide_us"])
    if mode == "scaled":
        ratio = np.median(d["patterns"]["misses"]["miss_issue_us"][L:]) / np.median(new["patterns"]["misses"]["miss_issue_us"][L:])
        dec = dec * ratio
    d["patterns"]["hits"]["decide_us"] = dec.tolist()
    json.dump(d, open(f, "w"))
subprocess.run([sys.executable, "-m", "experiments.validate", "--scenario", "validate-h200", "--out", str(out), "--predict-only"],
               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
