#!/usr/bin/env bash
# Every GPU measurement of experiments/results/h100 in one go (about 8 minutes on an H100):
# train the model, run the CUDA tests, measure every policy in the engine and the simulator, replay
# gpt-oss-20b's shape. Usage: experiments/run_h100.sh OUT [CORPUS_DIR]
# Each step is time-limited so a slow one cannot take the others' results with it.
set -u
OUT=${1:?usage: experiments/run_h100.sh OUT [CORPUS_DIR]}
CORPUS=${2:-../shared/data/corpus}
mkdir -p "$OUT"
LOG="$OUT/run.log"
python -m real.train_lm --out runs/moe-lm --corpus "$CORPUS" --minutes 4 > "$OUT/train.log" 2>&1
cp runs/moe-lm/train_report.json runs/moe-lm/routing_stats.json "$OUT/" 2>/dev/null
timeout 90 python -m pytest -q tests/test_real_model.py tests/test_engine.py -k cuda > "$OUT/pytest_gpu.log" 2>&1
timeout 240 python -m experiments.engine_bench live --model runs/moe-lm --corpus "$CORPUS" --out "$OUT" --work runs \
    --prompts 4 --prompt-len 16 --new-tokens 32 --slots 2,4,6 \
    --policies lookahead,mixtral-offloading,speculating-experts,speculating-experts-lossy,lru,lfu,oracle,belady >> "$LOG" 2>&1
timeout 100 python -m experiments.engine_bench replay --shape gpt-oss-20b --out "$OUT/replay" --max-tokens 48 >> "$LOG" 2>&1
# Then, where ../shared/data/routing is (not needed on the GPU machine):
#   python -m experiments.routing_compare --model-stats OUT/train_report.json --out OUT/routing_comparison.csv
