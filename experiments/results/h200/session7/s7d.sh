# session 7 call d: validate slices gpt-oss-20b,mixtral-8x7b (store in runs/val, resumed across calls)
cd .carry/head && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p ../../runs && ln -sfn ../../runs runs
T0=$(date +%s)
timeout 575 python3 -m experiments.validate --scenario validate-h200 --slices gpt-oss-20b,mixtral-8x7b --corpus ../corpus --out runs/val --deadline-s ${DL:-530} > $OUT/validate_d.log 2>&1; echo "validate rc=$?"
tail -30 $OUT/validate_d.log
echo "t=$(( $(date +%s) - T0 ))"
tar czf $OUT/val_d.tgz -C runs val
