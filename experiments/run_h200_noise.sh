#!/usr/bin/env bash
# Issue 11's measurements on the H200, in ONE device call of at most ~8 minutes:
#   experiments/run_h200_noise.sh OUT
#   (a) the host's steadiness beside nothing, and the GPU's clocks          ~30 s
#   (b) moe-lm shape replay, lru/belady/oracle x 2/4/6 slots, 5 repeats:
#       'before' (no warm-up, the same order every round, as until now)    ~90-120 s
#       'after' (warm-up until steady, interleaved rounds, order rotated)   ~110-150 s
#   (c) the decode thread on a core of its own, A/B interleaved (lru:2, oracle:6)  ~60-80 s
#   (d) gpt-oss-20b shape replay, lru/oracle x 4/8/16 slots, as far as the time left allows
# Each part has a hard time limit (and stops starting rounds before it), so a slow part cannot take the
# others' results with it; every part appends to the same files, written after every run. OUT gets
# 7 files: machine.txt, run.log, host_probe.csv, noise_runs.csv, noise_floor.csv, noise_sessions.json,
# summary.txt (printed last).
# SMOKE=1: the same flow on the CPU with a tiny synthetic trace, in about a minute.
set -u -o pipefail
OUT=${1:?usage: experiments/run_h200_noise.sh OUT}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
: > "$LOG"
BUDGET=${NOISE_BUDGET_S:-450}        # the parts' total; the summary and start-up fit in the rest of 8 min

if [ "${SMOKE:-0}" = 1 ]; then
    SCRATCH=$(mktemp -d)
    trap 'rm -rf "$SCRATCH"' EXIT
    python -c "from traces import save_trace, synthetic_trace
save_trace(synthetic_trace(num_tokens=96, num_layers=3, num_experts=8, top_k=2, num_requests=4, seed=0), '$SCRATCH/tiny.npz')"
    MOE_LM="--trace $SCRATCH/tiny.npz --max-tokens 8 --warmup-tokens 4"
    GPT_OSS="--trace $SCRATCH/tiny.npz --max-tokens 6"
    GPT_OSS_SLOTS=2,4,8
    REPEATS=2
    PROBE="--host-probe 2 --probe-per-core 0.2"
    BUDGET=${NOISE_BUDGET_S:-150}
    T_PROBE=20 T_BEFORE=30 T_AFTER=40 T_AB=30
else
    # warm-up passes of one request (48 tokens); measured runs of all three replayed requests
    MOE_LM="--trace traces/moe-lm-h100.npz --max-tokens 144 --warmup-tokens 48"
    # 24 tokens: the first replayed request's start; warm-up passes of 8 tokens (38 GB pinned: ~30-60 s to build)
    GPT_OSS="--shape gpt-oss-20b --trace traces/samples/gpt-oss-20b-sample.npz --max-tokens 24 --warmup-tokens 8"
    GPT_OSS_SLOTS=4,8,16
    REPEATS=5
    PROBE="--host-probe 20 --probe-per-core 0.5"
    T_PROBE=45 T_BEFORE=120 T_AFTER=150 T_AB=80
fi

START=$SECONDS
left() { echo $(( BUDGET - (SECONDS - START) )); }

# part NAME LIMIT_S ARGS...: python -m experiments.noise ARGS with at most LIMIT_S (or what is left),
# told to start no round that would end past LIMIT_S - 10
part() {
    local name=$1 limit=$2
    shift 2
    local remain
    remain=$(left)
    [ "$limit" -gt "$remain" ] && limit=$remain
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped, $remain s left" | tee -a "$LOG"
        return 0
    fi
    echo "== $name: up to $limit s: $*" | tee -a "$LOG"
    local begun=$SECONDS
    timeout -k 10 "$limit" python -m experiments.noise --out "$OUT" --deadline-s $(( limit - 10 )) "$@" >> "$LOG" 2>&1
    echo "== $name: exit $? after $(( SECONDS - begun )) s" | tee -a "$LOG"
}

{
    date -u
    nproc
    lscpu 2>/dev/null | head -20
    python -c "import sys, torch; print(sys.version); print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
    nvidia-smi -q -d CLOCK,PERFORMANCE,POWER,TEMPERATURE 2>&1 | head -120     # read only
} > "$OUT/machine.txt" 2>&1

part host-probe "$T_PROBE" $PROBE
# the A/B's core: the probe's fastest, else the last one
CORE=$(python -c "import json; print(json.load(open('$OUT/noise_sessions.json'))['host-probe']['fastest_core'])" 2>/dev/null)
case "$CORE" in ''|None|*[!0-9]*) CORE=$(( $(nproc) - 1 )) ;; esac

part before "$T_BEFORE" $MOE_LM --session before --policies lru,belady,oracle --slots 2,4,6 --repeats $REPEATS \
    --no-warmup --no-rotate
part after "$T_AFTER" $MOE_LM --session after --policies lru,belady,oracle --slots 2,4,6 --repeats $REPEATS
part decode-core "$T_AB" $MOE_LM --session decode-core --configs lru:2,oracle:6 --repeats $REPEATS \
    --ab decode-core --decode-core "$CORE"
part gpt-oss-20b "$(left)" $GPT_OSS --session gpt-oss-20b --policies lru,oracle --slots $GPT_OSS_SLOTS \
    --repeats $REPEATS

echo "== total $(( SECONDS - START )) s" | tee -a "$LOG"
python -m experiments.noise --report "$OUT" 2>&1 | tee "$OUT/summary.txt"
