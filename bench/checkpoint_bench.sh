#!/usr/bin/env bash
# Checkpoint cost for `small` (batch 4 x 512, products in what train.precision=auto picks:
# bf16 where the CPU has bf16 products, else fp32; the first line says which): bytes, the time staged on the training
# thread, the background write time, the load time, and the share of training time at the
# default interval (train.checkpoint_every=100), measured as the extra wall time of a run that
# checkpoints every 4 steps (long enough for the background write to finish) against one that does not.
#
#   bash bench/checkpoint_bench.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
detect_precision
STEPS="${STEPS:-13}"
common="--set model.preset=small --set train.seq_len=512 --set train.micro_batch=4
        --set train.warmup_steps=1 --set train.log_every=1 --set train.peak_gflops=1000"
# A first short run tunes the products into the plan cache, so no timed run includes tuning.
"$KILN" train $common --set train.steps=1 --set train.checkpoint_every=0 \
    --set run.dir=$work/tune > "$work/tune.log" 2>&1
"$KILN" train $common --set train.steps=$STEPS --set train.checkpoint_every=0 \
    --set run.dir=$work/none > "$work/none.log" 2>&1
"$KILN" train $common --set train.steps=$STEPS --set train.checkpoint_every=4 \
    --set run.dir=$work/every4 > "$work/every4.log" 2>&1
"$KILN" train $common --set train.steps=$((STEPS + 2)) --set train.checkpoint_every=4 \
    --set run.dir=$work/every4 > "$work/resume.log" 2>&1
/usr/bin/python3 - "$work" "$STEPS" "$PRECISION" <<'PY'
import json, re, statistics, sys
work, steps, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = open(f"{work}/every4.log").read()
staged = [float(s) for s in re.findall(r"MiB staged in ([\d.]+) s", log)]
written = [float(s) for s in re.findall(r"written in ([\d.]+) s", log)]
mib = float(re.search(r"([\d.]+) MiB staged", log).group(1))
load = float(re.search(r"loaded in ([\d.]+) s", open(f"{work}/resume.log").read()).group(1))
def elapsed(run):
    rows = [json.loads(l) for l in open(f"{work}/{run}/metrics.jsonl")]
    return rows[steps - 1]["elapsed_s"], statistics.median(r["elapsed_s"] - p["elapsed_s"] for p, r in zip(rows[1:], rows[2:steps]))
t_none, step_s = elapsed("none")
t_every, _ = elapsed("every4")
ckpts = (steps - 1) // 4  # checkpoints taken before the last step's metrics line
cost = max(0.0, (t_every - t_none) / ckpts)
print(f"small, {precision} products: checkpoint {mib:.0f} MiB (fp32 weights + AdamW m and v)")
print(f"staged on the training thread: median {statistics.median(staged):.2f} s; written in the "
      f"background: median {statistics.median(written):.2f} s; load: {load:.2f} s")
print(f"step: median {step_s:.2f} s; extra wall time per checkpoint: {cost:.2f} s "
      f"({ckpts} checkpoints, {t_every:.1f} s vs {t_none:.1f} s)")
print(f"at train.checkpoint_every=100: {100 * cost / (100 * step_s):.2f}% of training time")
PY
