# session 9 call C: CUDA tests at the final real/ code, the trained model, its recording and lookahead gate
cd .carry/head && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p ../../runs && ln -sfn ../../runs runs
R=$OUT/res; mkdir -p $R
T0=$(date +%s); t() { echo "t=$(( $(date +%s) - T0 )) $*"; }
git_head=$(cat ../calls/HEAD_COMMIT 2>/dev/null); echo "code: $git_head"
python3 -m pytest -q -k cuda tests/test_engine.py tests/test_real_model.py tests/test_predictors.py tests/test_miss_latency.py tests/test_prefetch_latency.py tests/test_layer_ops.py > $R/pytest_gpu.log 2>&1; echo "pytest rc=$?" >> $R/pytest_gpu.log
grep -v DEBUG $R/pytest_gpu.log | tail -4; t pytest
timeout 240 python3 -m experiments.train_lm --out runs/moe-lm --corpus ../corpus --minutes 2.5 > $R/train_lm.log 2>&1; echo "train rc=$?"; tail -3 $R/train_lm.log; t train
timeout 90 python3 -m experiments.record --model runs/moe-lm --out runs/rec --corpus ../corpus --prompts 4 --prompt-len 16 --new-tokens 32 --train-prompts 4 > $R/record.log 2>&1; echo "record rc=$?"; tail -3 $R/record.log; t record
timeout 150 python3 -m experiments.train_gate --trace runs/rec/moe-lm-trace.npz --model runs/moe-lm --depth 3 --out runs/moe-lm-gate --train-tokens 131072 --corpus ../corpus --steps 1000 --device cuda > $R/train_gate.log 2>&1; echo "gate rc=$?"; tail -4 $R/train_gate.log; t gate
cp runs/moe-lm/*.json runs/rec/*.json runs/moe-lm-gate/*.json $R/ 2>/dev/null
t end
