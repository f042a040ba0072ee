#!/usr/bin/env bash
# Every GPU measurement of experiments/results/h100, in two device calls of under 10 minutes each:
#   experiments/run_h100.sh OUT CORPUS_DIR model   train the model (~3 min), then measure every policy in
#                                                  the engine and the simulator, the predictors' recall,
#                                                  the profile and the references (~4 min)
#   experiments/run_h100.sh OUT CORPUS_DIR shape   the CUDA tests and gpt-oss-20b's shape replay (no
#                                                  trained model needed; ~3 min)
#   experiments/run_h100.sh OUT CORPUS_DIR         both
# Each step is time-limited so a slow one cannot take the others' results with it.
set -u
OUT=${1:?usage: experiments/run_h100.sh OUT [CORPUS_DIR] [model|shape|all]}
CORPUS=${2:-../shared/data/corpus}
PART=${3:-all}
mkdir -p "$OUT"
LOG="$OUT/run.log"
if [ "$PART" = model ] || [ "$PART" = all ]; then
    python -m real.train_lm --out runs/moe-lm --corpus "$CORPUS" --minutes 4 > "$OUT/train.log" 2>&1
    cp runs/moe-lm/train_report.json runs/moe-lm/routing_stats.json "$OUT/" 2>/dev/null
    timeout 360 python -m experiments.engine_bench live --model runs/moe-lm --corpus "$CORPUS" --out "$OUT" \
        --work runs --prompts 4 --prompt-len 16 --new-tokens 32 --slots 2,4,6 \
        --policies lru,lookahead,mixtral-offloading,oracle,belady,lfu,speculating-experts,speculating-experts-lossy \
        >> "$LOG" 2>&1
fi
if [ "$PART" = shape ] || [ "$PART" = all ]; then
    timeout 120 python -m pytest -q tests/test_real_model.py tests/test_engine.py -k cuda > "$OUT/pytest_gpu.log" 2>&1
    timeout 200 python -m experiments.engine_bench replay --shape gpt-oss-20b --out "$OUT/replay" --max-tokens 48 \
        >> "$OUT/replay.log" 2>&1
fi
# Then, where ../shared/data/routing is (not needed on the GPU machine):
#   python -m experiments.routing_compare --model-stats OUT/train_report.json --out OUT/routing_comparison.csv
