#!/usr/bin/env bash
# kiln plan's forecast for this machine against measured runs: tiny on 2 ranks (one core each),
# 8 x 256 tokens a micro-batch, DP 2 and TP 2; median tokens/s of steps 3..8. Both the forecast
# and the runs use train.precision=auto (bf16 where the CPU has bf16 products, else fp32); the
# first line says which.
#
#   bash bench/plan_bench.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
detect_precision
echo "tiny, $PRECISION products"
echo
echo "| layout | predicted tokens/s | measured tokens/s | error |"
echo "|---|---|---|---|"
for layout in "DP 2:1" "TP 2:2"; do
    name="${layout%%:*}" tp="${layout##*:}"
    predicted=$("$KILN" plan --model tiny --cluster this --seq-len 256 --global-batch $((16 / tp)) \
        --fixed --set parallel.tp="$tp" --set train.micro_batch=8 --set train.grad_accum=1 |
        awk '$1 == "'"$tp"'" && $3 == "8" {print $9}')
    "$KILN" launch -n 2 -- kiln train --set model.preset=tiny --set parallel.tp="$tp" \
        --set train.micro_batch=8 --set train.seq_len=256 --set train.steps=8 \
        --set train.log_every=1 --set train.checkpoint_every=0 --set train.peak_gflops=1000 \
        --set run.dir="$work/$tp" > "$work/$tp.log" 2>&1
    measured=$(median_tps "$work/$tp")
    echo "| $name | $predicted | $measured | $(/usr/bin/python3 -c "print(f'{100*($predicted/$measured-1):+.1f}%')") |"
done
