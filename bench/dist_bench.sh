#!/usr/bin/env bash
# Distributed training throughput on this machine: `small` (batch 8 x 512 per step) at DP=1 on
# one core, DP=2 on two cores (one rank per core), and TP=2 (one rank per core) against TP=1
# (one process, two cores); with the collective payload per step. DP=2 and TP=2 run twice: through
# gloo's shared-memory transport (what parallel.transport=auto picks on one host) and over TCP
# loopback (parallel.transport=tcp, as between hosts).
#
# Each row also splits rank 0's step (medians from metrics.jsonl): forward and backward
# (compute, TP collectives included), waiting for the slower DP rank (wait), the gradient
# reduce-scatter and norm (reduce), AdamW and the weight all-gather (update).
#
# Products run in what train.precision=auto picks (bf16 where the CPU has bf16 products, else
# fp32); the header says which.
#
# The shared cores drift by 10-15% over minutes, so the layouts run in turn, ROUNDS times, and
# each ratio is taken within a round; the summary gives the medians.
#
#   bash bench/dist_bench.sh          STEPS=6 ROUNDS=3 ACCUM=1 by default
#
# ACCUM scales the global batch: 8 x ACCUM sequences per step (DP=2 accumulates ACCUM micro-
# batches of 4 per rank, the one-rank layouts 2 x ACCUM). The collectives' bytes per step do not
# depend on it, so a larger batch spreads them over more computation.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
detect_precision
STEPS="${STEPS:-6}"
ROUNDS="${ROUNDS:-3}"
ACCUM="${ACCUM:-1}"
for v in STEPS ROUNDS ACCUM; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "dist_bench.sh: $v=${!v} must be a positive integer" >&2; exit 2; }
done
common="--set model.preset=small --set train.seq_len=512 --set train.micro_batch=4
        --set train.steps=$STEPS --set train.warmup_steps=1 --set train.log_every=1
        --set train.peak_gflops=1000 --set train.checkpoint_every=0"

payload() { grep -ho "collective payload per step on this rank: .*" "$1" | head -1 | cut -d: -f2; }

run() {  # name ranks threads args...: prints a table row, leaves the tokens/s in $tps
    local name=$1 ranks=$2 threads=$3
    shift 3
    rm -rf "$work/$name"
    if [ "$ranks" = 1 ]; then
        OMP_NUM_THREADS=$threads "$KILN" train $common --set run.dir="$work/$name" "$@" \
            > "$work/$name.log" 2>&1
    else
        OMP_NUM_THREADS=$threads "$KILN" launch -n "$ranks" -- "$KILN" train $common \
            --set run.dir="$work/$name" "$@" > "$work/$name.log" 2>&1
    fi
    tps=$(median_tps "$work/$name")
    printf '| %s | %s | %s | %s | %s | %s |%s |\n' "$round" "$name" "$ranks" "$threads" "$tps" \
        "$(median_parts "$work/$name")" "$(payload "$work/$name.log")"
}

layouts() {  # the layouts, each as: name ranks threads args...
    run dp1-1core 1 1 --set train.grad_accum=$((2 * ACCUM))
    dp1=$tps
    run dp2 2 1 --set train.grad_accum=$ACCUM --set parallel.transport=shm
    dp2=$tps
    run dp2-tcp 2 1 --set train.grad_accum=$ACCUM --set parallel.transport=tcp
    dp2tcp=$tps
    run tp1-2cores 1 2 --set train.grad_accum=$((2 * ACCUM))
    tp1=$tps
    run tp2 2 1 --set parallel.tp=2 --set train.grad_accum=$((2 * ACCUM)) \
        --set parallel.transport=shm
    tp2=$tps
    run tp2-tcp 2 1 --set parallel.tp=2 --set train.grad_accum=$((2 * ACCUM)) \
        --set parallel.transport=tcp
    tp2tcp=$tps
}

# Round 0, not reported, fills the plan cache, so that no timed run includes tuning.
round=0
layouts > /dev/null

echo "small, $((8 * ACCUM)) sequences x 512 tokens per step, $PRECISION, median of steps 3..$STEPS, $ROUNDS rounds"
echo
echo "| round | layout | ranks | threads/rank | tokens/s | s per step: compute / wait / reduce / update | collective payload per step per rank |"
echo "|---:|---|---:|---:|---:|---|---|"
ratios=()
for round in $(seq 1 "$ROUNDS"); do
    layouts
    ratios+=("$dp1 $dp2 $tp1 $tp2 $dp2tcp $tp2tcp")
done
echo
printf '%s\n' "${ratios[@]}" | /usr/bin/python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
dp = [r[1] / r[0] for r in rows]
tp = [r[3] / r[2] for r in rows]
print("DP=2 / DP=1 per round: " + ", ".join(f"{x:.2f}" for x in dp) + f"; median {statistics.median(dp):.2f}x")
print("TP=2 / TP=1 per round: " + ", ".join(f"{x:.2f}" for x in tp) + f"; median {statistics.median(tp):.2f}x")
dpt = [r[4] / r[0] for r in rows]
tpt = [r[5] / r[2] for r in rows]
print("over TCP loopback instead (parallel.transport=tcp):")
print("  DP=2 / DP=1 per round: " + ", ".join(f"{x:.2f}" for x in dpt) + f"; median {statistics.median(dpt):.2f}x")
print("  TP=2 / TP=1 per round: " + ", ".join(f"{x:.2f}" for x in tpt) + f"; median {statistics.median(tpt):.2f}x")
'
