# session 8 call c: validate slices moe-lm-replay,moe-lm-random (store in runs/val, resumed across calls)
cd .carry/head && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p ../../runs && ln -sfn ../../runs runs
T0=$(date +%s)
timeout 575 python3 -m experiments.validate --scenario validate-h200 --slices moe-lm-replay,moe-lm-random --corpus ../corpus --out runs/val --deadline-s ${DL:-530} > $OUT/validate_c.log 2>&1; echo "validate rc=$?"
tail -30 $OUT/validate_c.log
echo "t=$(( $(date +%s) - T0 ))"
tar czf $OUT/val_c.tgz -C runs val
