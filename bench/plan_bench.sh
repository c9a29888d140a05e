#!/usr/bin/env bash
# kiln plan's forecast for this machine against measured runs: tiny on 2 ranks (one core each),
# 8 x 256 tokens a micro-batch, DP 2, TP 2, TP 2 with sequence parallelism, and 2 pipeline stages
# over 4 micro-batches; median tokens/s of steps 3..8. Both the forecast and the runs use
# train.precision=auto (bf16 where the CPU has bf16 products, else fp32); the first line says
# which.
#
#   bash bench/plan_bench.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
detect_precision
echo "tiny, $PRECISION products"
echo
echo "| layout | predicted tokens/s | measured tokens/s | error |"
echo "|---|---|---|---|"
# name:tp:pp:sp:grad_accum
for layout in "DP 2:1:1:false:1" "TP 2:2:1:false:1" "TP 2 + SP:2:1:true:1" "PP 2, 4 micro-batches:1:2:false:4"; do
    IFS=: read -r name tp pp sp accum <<< "$layout"
    sets="--set parallel.tp=$tp --set parallel.pp=$pp --set parallel.sp=$sp --set train.micro_batch=8 --set train.grad_accum=$accum"
    # --fixed prints one layout: the row under the header, tokens/s next to last.
    # shellcheck disable=SC2086
    predicted=$("$KILN" plan --model tiny --cluster this --seq-len 256 \
        --global-batch $((16 * accum / (tp * pp))) --fixed $sets |
        awk '$1 == "TP" {getline; print $(NF-1)}')
    # shellcheck disable=SC2086
    "$KILN" launch -n 2 -- kiln train --set model.preset=tiny $sets --set train.seq_len=256 \
        --set train.steps=8 --set train.log_every=1 --set train.checkpoint_every=0 \
        --set train.peak_gflops=1000 --set run.dir="$work/$tp-$pp-$sp" > "$work/$tp-$pp-$sp.log" 2>&1
    measured=$(median_tps "$work/$tp-$pp-$sp")
    echo "| $name | $predicted | $measured | $(/usr/bin/python3 -c "print(f'{100*($predicted/$measured-1):+.1f}%')") |"
done
