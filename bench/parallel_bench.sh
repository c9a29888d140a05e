#!/usr/bin/env bash
# Pipeline and sequence parallelism on this machine, one rank per core.
#
# 1. The pipeline bubble: PP=2 (2 ranks) over m = 1, 2, 4, 8 micro-batches a step, against the
#    1F1B schedule's (p-1)/(m+p-1). Two measures, medians over the steps after the first two:
#    - "waited": the share of rank 0's forward-and-backward time (compute_s) its stage spent
#      waiting for the other (stage_wait_s: the bubble plus the transfers);
#    - "vs ideal": 1 - (m x one micro-batch of the whole model on one core / 2) / compute_s, with
#      the micro-batch time from a one-rank run on one core.
# 2. Activation memory with and without SP: TP=2 on a model whose activations dominate, the
#    measured peak resident memory of each rank (ranks/rank-N.json) against the memory plan the
#    trainer logs. Selective recompute, so that the (B, H, T, T) attention probabilities (split
#    by heads already, SP or not) do not hide the rest.
#
#   bash bench/parallel_bench.sh        STEPS=6 by default
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
detect_precision
STEPS="${STEPS:-6}"
[[ "$STEPS" =~ ^[1-9][0-9]*$ && "$STEPS" -ge 3 ]] || { echo "parallel_bench.sh: STEPS=$STEPS must be an integer >= 3" >&2; exit 2; }
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; products: $PRECISION; $(date -u +%FT%RZ)"

pipe="--set model.dim=256 --set model.n_layers=8 --set model.n_heads=8 --set model.n_kv_heads=8
      --set model.vocab_size=512 --set train.seq_len=256 --set train.micro_batch=2
      --set train.steps=$STEPS --set train.warmup_steps=1 --set train.log_every=100
      --set train.peak_gflops=1000 --set train.checkpoint_every=0"
echo
echo "## pipeline bubble, PP=2, dim 256, 8 layers, 2 x 256 tokens a micro-batch"
echo
echo "| micro-batches m | (p-1)/(m+p-1) | waited | vs ideal | step compute s | one micro-batch, 1 core, s |"
echo "|---:|---:|---:|---:|---:|---:|"
for m in 1 2 4 8; do
    OMP_NUM_THREADS=1 "$KILN" train $pipe --set train.grad_accum=$m --set run.dir="$work/one-$m" \
        > "$work/one-$m.log" 2>&1
    OMP_NUM_THREADS=1 "$KILN" launch -n 2 -- "$KILN" train $pipe --set parallel.pp=2 \
        --set train.grad_accum=$m --set run.dir="$work/pp-$m" > "$work/pp-$m.log" 2>&1
    /usr/bin/python3 - "$work/one-$m" "$work/pp-$m" "$m" <<'PY'
import json, statistics, sys
one, pp, m = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = lambda d: [json.loads(l) for l in open(d + "/metrics.jsonl")][2:]
mb = statistics.median(r["compute_s"] for r in rows(one)) / m
compute = statistics.median(r["compute_s"] for r in rows(pp))
waited = statistics.median(r["stage_wait_s"] / r["compute_s"] for r in rows(pp))
ideal = 1 - m * mb / 2 / compute
print(f"| {m} | {1 / (m + 1):.3f} | {waited:.3f} | {ideal:.3f} | {compute:.3f} | {mb:.3f} |")
PY
done

sp="--set model.dim=256 --set model.n_layers=4 --set model.n_heads=8 --set model.n_kv_heads=8
    --set model.vocab_size=512 --set train.seq_len=1024 --set train.micro_batch=8
    --set train.recompute=selective --set parallel.tp=2 --set train.steps=3 --set train.warmup_steps=1
    --set train.peak_gflops=1000 --set train.checkpoint_every=0"
echo
echo "## activation memory per rank, TP=2, dim 256, 4 layers, 8 x 1024 tokens, selective recompute"
echo
echo "| SP | planned activations MiB | planned total MiB | measured peak RSS MiB (max over ranks) |"
echo "|---|---:|---:|---:|"
for flag in false true; do
    OMP_NUM_THREADS=1 "$KILN" launch -n 2 -- "$KILN" train $sp --set parallel.sp=$flag \
        --set run.dir="$work/sp-$flag" > "$work/sp-$flag.log" 2>&1
    /usr/bin/python3 - "$work/sp-$flag" "$work/sp-$flag.log" "$flag" <<'PY'
import glob, json, re, sys
run, log, flag = sys.argv[1:]
text = open(log).read()
total = re.search(r"memory plan per rank: (\d+) MiB", text).group(1)
acts = re.search(r"activations ([\d.]+), checkpoint", text).group(1)
peak = max(json.load(open(f))["peak_rss_bytes"] for f in glob.glob(run + "/ranks/rank-*.json"))
print(f"| {flag} | {acts} | {total} | {peak / 2**20:.0f} |")
PY
done
