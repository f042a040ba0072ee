#!/usr/bin/env bash
# Every GPU measurement of experiments/results/h200 (and, before, h100), in one device call
# of under 10 minutes, written under OUT (copy what is kept to experiments/results/h200/ afterwards):
#   experiments/run_h200.sh OUT CORPUS_DIR model   the CUDA tests (~40 s), then train the model (~3 min),
#                                                  then engine_bench live: the references, the recording,
#                                                  the profile (OUT/h200-measured.yaml), the predictors'
#                                                  recall and every policy in the engine and the
#                                                  simulator (~3 min)
#   experiments/run_h200.sh OUT CORPUS_DIR shape   gpt-oss-20b's shape replay (no trained model needed)
#   experiments/run_h200.sh OUT CORPUS_DIR         both
# Each step is time-limited so a slow one cannot take the others' results with it. If the CUDA tests
# fail, the measurements still run, with experts launched op by op (MOE_LAB_EXPERT_GRAPHS=0), and
# pytest_gpu.log says why.
set -u
OUT=${1:?usage: experiments/run_h200.sh OUT [CORPUS_DIR] [model|shape|all]}
CORPUS=${2:-../shared/data/corpus}
PART=${3:-all}
mkdir -p "$OUT"
LOG="$OUT/run.log"
if [ "$PART" = model ] || [ "$PART" = all ]; then
    timeout 100 python -m pytest -q tests/test_real_model.py tests/test_engine.py -k cuda > "$OUT/pytest_gpu.log" 2>&1 \
        || export MOE_LAB_EXPERT_GRAPHS=0
    python -m experiments.train_lm --out runs/moe-lm --corpus "$CORPUS" --minutes 4 > "$OUT/train.log" 2>&1
    cp runs/moe-lm/train_report.json runs/moe-lm/routing_stats.json "$OUT/" 2>/dev/null
    timeout 330 python -m experiments.engine_bench live --model runs/moe-lm --corpus "$CORPUS" --out "$OUT" \
        --work runs --prompts 4 --prompt-len 16 --new-tokens 32 --slots 2,4,6 \
        --policies lru,lookahead,mixtral-offloading,oracle,belady,lfu,speculating-experts,speculating-experts-lossy \
        >> "$LOG" 2>&1
fi
if [ "$PART" = shape ] || [ "$PART" = all ]; then
    timeout 150 python -m experiments.engine_bench replay --shape gpt-oss-20b --out "$OUT/replay" --max-tokens 48 \
        >> "$OUT/replay.log" 2>&1
fi
# Then, where ../shared/data/routing is (not needed on the GPU machine):
#   python -m experiments.routing_compare --model-stats OUT/train_report.json --out OUT/routing_comparison.csv
