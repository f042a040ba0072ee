#!/usr/bin/env bash
# Every GPU measurement of experiments/results/h200 (and, before, h100), in one device call
# of under 10 minutes, written under OUT (copy what is kept to experiments/results/h200/ afterwards):
#   experiments/run_h200.sh OUT CORPUS_DIR model   the CUDA tests (~1 min with compiling), then train the
#                                                  model (~2.5 min), then engine_bench live: the references,
#                                                  the recording, the predictors' recall, the calibrated
#                                                  profile (OUT/h200-measured.yaml) and every policy in the
#                                                  engine (5 interleaved repeats) and the simulator (~5 min)
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
    timeout 150 python -m pytest -q tests/test_real_model.py tests/test_engine.py tests/test_predictors.py tests/test_miss_latency.py tests/test_prefetch_latency.py -k cuda \
        > "$OUT/pytest_gpu.log" 2>&1 || export MOE_LAB_EXPERT_GRAPHS=0
    timeout 170 python -m experiments.train_lm --out runs/moe-lm --corpus "$CORPUS" --minutes 2.5 > "$OUT/train.log" 2>&1
    cp runs/moe-lm/train_report.json runs/moe-lm/routing_stats.json "$OUT/" 2>/dev/null
    # every figure the median of 5 interleaved repeats; the deadline keeps the call under 10 minutes
    timeout 300 python -m experiments.engine_bench live --model runs/moe-lm --corpus "$CORPUS" --out "$OUT" \
        --work runs --prompts 2 --prompt-len 16 --new-tokens 32 --slots 2,4,6 --gate-steps 1000 \
        --accelerate-gpu-GiB 0 --deadline-s 280 \
        --policies lru,lookahead,mixtral-offloading,oracle,belady,lfu,speculating-experts,speculating-experts-lossy \
        >> "$LOG" 2>&1
fi
if [ "$PART" = shape ] || [ "$PART" = all ]; then
    timeout 140 python -m experiments.engine_bench replay --trace traces/samples/gpt-oss-20b-sample.npz \
        --policies lru,oracle --slots 4,8,16 --max-tokens 24 --warmup-tokens 8 --deadline-s 125 \
        --out "$OUT/replay" >> "$OUT/replay.log" 2>&1
fi
# Then, where ../shared/data/routing is (not needed on the GPU machine):
#   python -m experiments.routing_compare --model-stats OUT/train_report.json --out OUT/routing_comparison.csv
