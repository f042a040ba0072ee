# session 9 call D: the trained model's validation slice (calibration + 6 policies x 3 cache sizes, engine and simulator) at the issue-13 engine
cd .carry/head && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p ../../runs && ln -sfn ../../runs runs
T0=$(date +%s)
timeout 575 python3 -m experiments.validate --scenario validate-h200 --slices ${SLICES:-moe-lm} --corpus ../corpus --out runs/val --deadline-s ${DL:-400} > $OUT/validate_d.log 2>&1; echo "validate rc=$?"
tail -30 $OUT/validate_d.log
echo "t=$(( $(date +%s) - T0 ))"
tar czf $OUT/val_d.tgz -C runs val
