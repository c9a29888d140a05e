#!/usr/bin/env bash
# Distributed training throughput on this machine: `small` (batch 8 x 512 per step) at DP=1 on
# one core, DP=2 on two cores (one rank per core), and TP=2 (one rank per core) against TP=1
# (one process, two cores); with the collective payload per step.
#
#   bash bench/dist_bench.sh          STEPS=6 by default
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
STEPS="${STEPS:-6}"
common="--set model.preset=small --set train.seq_len=512 --set train.micro_batch=4
        --set train.steps=$STEPS --set train.warmup_steps=1 --set train.log_every=1
        --set train.peak_gflops=1000 --set train.checkpoint_every=0"

payload() { grep -ho "collective payload per step on this rank: .*" "$1" | head -1 | cut -d: -f2; }

run() {  # name ranks threads args...
    local name=$1 ranks=$2 threads=$3
    shift 3
    if [ "$ranks" = 1 ]; then
        OMP_NUM_THREADS=$threads "$KILN" train $common --set run.dir="$work/$name" "$@" \
            > "$work/$name.log" 2>&1
    else
        OMP_NUM_THREADS=$threads "$KILN" launch -n "$ranks" -- kiln train $common \
            --set run.dir="$work/$name" "$@" > "$work/$name.log" 2>&1
    fi
    printf '| %s | %s | %s | %s |%s |\n' "$name" "$ranks" "$threads" \
        "$(median_tps "$work/$name")" "$(payload "$work/$name.log")"
}

echo "small, 8 sequences x 512 tokens per step, bf16, median of steps 3..$STEPS"
echo
echo "| layout | ranks | threads/rank | tokens/s | collective payload per step per rank |"
echo "|---|---:|---:|---:|---|"
run dp1-1core 1 1 --set train.grad_accum=2
run dp2 2 1 --set train.micro_batch=4
run tp1-2cores 1 2 --set train.grad_accum=2
run tp2 2 1 --set parallel.tp=2 --set train.grad_accum=2
