# session 8 call d2: validate slice mixtral-8x7b alone (store in runs/val, resumed across calls)
cd .carry/head && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p ../../runs && ln -sfn ../../runs runs
T0=$(date +%s)
timeout 585 python3 -m experiments.validate --scenario validate-h200 --slices mixtral-8x7b --corpus ../corpus --out runs/val --deadline-s ${DL:-530} > $OUT/validate_d2.log 2>&1; echo "validate rc=$?"
tail -30 $OUT/validate_d2.log
echo "t=$(( $(date +%s) - T0 ))"
tar czf $OUT/val_d2.tgz -C runs val
