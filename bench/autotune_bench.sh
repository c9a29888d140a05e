#!/usr/bin/env bash
# The plan cache: time to the end of the first step with a cold cache (tuning first), a warm
# one and autotuning off, and steady-state tokens/s of the tuned plan against the library's
# defaults. One process on all cores, 8 x 256 tokens a step, 12 steps; warm and off runs
# alternate ROUNDS times (default 3); medians of steps 3..12. Products in what
# train.precision=auto picks (bf16 where the CPU has bf16 products, else fp32); the first line
# says which.
#
#   bash bench/autotune_bench.sh [tiny small]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
detect_precision
rounds="${ROUNDS:-3}"
models=("${@:-tiny small}")
first_step() { /usr/bin/python3 -c "import json,sys; print(round(json.loads(open(sys.argv[1]).readline())['elapsed_s'], 2))" "$1/metrics.jsonl"; }
median() { /usr/bin/python3 -c "import statistics,sys; print(round(statistics.median(float(x) for x in sys.argv[1:]), 2))" "$@"; }
echo "$PRECISION products"
echo
echo "| model | tuning | first step cold (s) | warm (s) | off (s) | tokens/s tuned (warm runs) | off | tuned / off |"
echo "|---|---|---|---|---|---|---|---|"
for model in ${models[@]}; do
    train() {  # NAME AUTOTUNE
        "$KILN" train --set model.preset="$model" --set train.steps=12 --set train.log_every=1 \
            --set train.checkpoint_every=0 --set train.autotune="$2" \
            --set train.plan_cache="$work/plans" --set run.dir="$work/$model-$1" \
            > "$work/$model-$1.log" 2>&1
    }
    train cold true
    tuning=$(grep -o 'tuned [0-9]* products ([0-9]* on this rank) in [0-9]* passes, [0-9.]* s' \
        "$work/$model-cold.log" | sed 's/ ([0-9]* on this rank)//')
    warm_first=() off_first=() warm_tps=() off_tps=()
    for r in $(seq "$rounds"); do
        train "warm$r" true
        train "off$r" false
        warm_first+=("$(first_step "$work/$model-warm$r")")
        off_first+=("$(first_step "$work/$model-off$r")")
        warm_tps+=("$(median_tps "$work/$model-warm$r")")
        off_tps+=("$(median_tps "$work/$model-off$r")")
    done
    grep -q "plan cache hit" "$work/$model-warm1.log"
    tuned=$(median "${warm_tps[@]}") off=$(median "${off_tps[@]}")
    echo "| $model | $tuning | $(first_step "$work/$model-cold") | $(median "${warm_first[@]}") |" \
        "$(median "${off_first[@]}") | $tuned (${warm_tps[*]}) | $off (${off_tps[*]}) |" \
        "$(/usr/bin/python3 -c "print(f'{$tuned/$off:.3f}')") |"
done
