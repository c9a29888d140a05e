#!/usr/bin/env bash
# The data-parallel gradient sum overlapped with the backward (parallel.dp_bucket_mb, 25 MiB by
# default) against the whole sum after it (0): DP=2 on `small`, one rank per core, through
# gloo's shared-memory transport and over TCP loopback. The layouts run in turn, ROUNDS times,
# so that the shared cores' drift falls on all of them alike; each row is rank 0's medians of
# steps 3..STEPS, and the summary gives the overlapped/after ratio of tokens/s per round.
#
#   bash bench/overlap_bench.sh        STEPS=6 ROUNDS=3 by default
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
detect_precision
STEPS="${STEPS:-6}"
ROUNDS="${ROUNDS:-3}"
for v in STEPS ROUNDS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "overlap_bench.sh: $v=${!v} must be a positive integer" >&2; exit 2; }
done
common="--set model.preset=small --set train.seq_len=512 --set train.micro_batch=4
        --set train.steps=$STEPS --set train.warmup_steps=1 --set train.log_every=1
        --set train.peak_gflops=1000 --set train.checkpoint_every=0"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; products: $PRECISION; $(date -u +%FT%RZ)"
echo
echo "| round | transport | dp_bucket_mb | tokens/s | s per step: compute / wait / reduce / update |"
echo "|---:|---|---:|---:|---|"
ratios=()
for round in $(seq 0 "$ROUNDS"); do  # round 0 fills the plan cache and is not reported
    line=""
    for transport in shm tcp; do
        for mb in 25 0; do
            name="$transport-$mb"
            rm -rf "$work/$name"
            OMP_NUM_THREADS=1 "$KILN" launch -n 2 -- "$KILN" train $common \
                --set parallel.transport=$transport --set parallel.dp_bucket_mb=$mb \
                --set run.dir="$work/$name" > "$work/$name.log" 2>&1
            tps=$(median_tps "$work/$name")
            line+=" $tps"
            [ "$round" = 0 ] || printf '| %s | %s | %s | %s | %s |\n' "$round" "$transport" "$mb" \
                "$tps" "$(median_parts "$work/$name")"
        done
    done
    [ "$round" = 0 ] || ratios+=("$line")
done
echo
printf '%s\n' "${ratios[@]}" | /usr/bin/python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
for name, a, b in (("shm", 0, 1), ("tcp", 2, 3)):
    r = [x[a] / x[b] for x in rows]
    print(f"{name}: overlapped / after per round " + ", ".join(f"{v:.3f}" for v in r) + f"; median {statistics.median(r):.3f}")
'
