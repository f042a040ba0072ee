# session 5 call E: CUDA tests after the prefetch_latency stamps, then the calibration step alone (with decide_us)
cd .carry/head && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p ../../runs && ln -sfn ../../runs runs
R=$OUT/res; mkdir -p $R
T0=$(date +%s)
python3 -m pytest -q -k cuda tests/test_engine.py tests/test_real_model.py tests/test_predictors.py tests/test_prefetch_latency.py tests/test_miss_latency.py > $R/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $R/pytest_gpu.log
grep -v DEBUG $R/pytest_gpu.log | tail -3; echo "t=$(( $(date +%s) - T0 ))"
LEFT=$(( 215 - ($(date +%s) - T0) ))
timeout $((LEFT + 40)) python3 ../calls/recalibrate.py runs/cal $LEFT moe-lm-replay moe-lm-random gpt-oss-20b > $R/recalibrate.log 2>&1; echo "recal rc=$?"
tail -5 $R/recalibrate.log
python3 - <<'PY'
import json, glob, numpy as np
for f in sorted(glob.glob("runs/cal/calibration/*.json")):
    d = json.load(open(f)); p = d.get("patterns", {})
    if not p: continue
    L = d["shape"]["num_layers"]
    dec = np.asarray(p["hits"].get("decide_us", []))[L:]; mi = np.asarray(p["misses"].get("miss_issue_us", []))[L:]
    print(f, "decide_us median %.1f p10 %.1f p90 %.1f n=%d" % (np.median(dec), np.percentile(dec,10), np.percentile(dec,90), len(dec)) if len(dec) else "no decide", "| miss_issue median %.1f" % np.median(mi) if len(mi) else "")
PY
tar czf $OUT/cal_e.tgz -C runs cal
echo "t=$(( $(date +%s) - T0 ))"
