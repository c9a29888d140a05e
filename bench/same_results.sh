#!/usr/bin/env bash
# Do two kiln binaries train to the same bits? Runs the same short trainings with each (tiny on
# the built-in stories, 6 steps: fp32; bf16 where this CPU has bf16 products, also with selective
# recompute; grad_accum 2 with full recompute; TP 2, and TP 2 + SP; PP 2; DP 2; the reference
# backend) and compares every checkpoint file's sha256 and every step's loss. For a change that
# must leave CPU results as they were: build the commit before it beside this one (git worktree
# add /tmp/before REV; build there).
#
# usage: bench/same_results.sh BEFORE_BIN AFTER_BIN [WORK_DIR]
# Exits 0 when every run is the same, 1 when one differs or fails. EXTRA_AFTER="--set k=v ..."
# adds flags to the second binary's runs (a way to see the comparison catch a difference).
set -uo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
before=$1 after=$2 work=${3:-$(mktemp -d)}
mkdir -p "$work"
"$after" data --corpus builtin:stories:800 --train-tokenizer 512 --out "$work/data" \
    --set data.seq_len=64 >"$work/data.log" 2>&1 || { echo "same_results: kiln data failed"; exit 1; }
base=(--set model.preset=tiny --set model.vocab_size=512 --set data.source="$work/data"
      --set train.seq_len=64 --set train.micro_batch=4 --set train.steps=6 --set train.log_every=1
      --set train.checkpoint_every=0 --set train.autotune=false --set run.log_level=warn)
bf16=(--set train.precision=bf16)
"$after" train --check "${bf16[@]}" >/dev/null 2>&1 || bf16=()  # no bf16 products here: skip it
runs=(fp32 accum_full tp tpsp pp dp ref)
[ ${#bf16[@]} -gt 0 ] && runs+=(bf16 bf16_selective)
train() {  # train BIN TAG NAME EXTRA...: the run's own flags after the common ones
    local bin=$1 tag=$2 name=$3; shift 3
    local flags=("${base[@]}" --set run.dir="$work/$tag/$name")
    case $name in
        fp32) "$bin" train "${flags[@]}" --set train.precision=fp32 "$@" ;;
        bf16) "$bin" train "${flags[@]}" "${bf16[@]}" "$@" ;;
        bf16_selective) "$bin" train "${flags[@]}" "${bf16[@]}" --set train.recompute=selective \
                            "$@" ;;
        accum_full) "$bin" train "${flags[@]}" --set train.grad_accum=2 \
                        --set train.recompute=full "$@" ;;
        tp) "$bin" launch -n 2 -- "$bin" train "${flags[@]}" --set parallel.tp=2 \
                --set train.grad_accum=2 "$@" ;;
        tpsp) "$bin" launch -n 2 -- "$bin" train "${flags[@]}" --set parallel.tp=2 \
                  --set parallel.sp=true --set train.grad_accum=2 "$@" ;;
        pp) "$bin" launch -n 2 -- "$bin" train "${flags[@]}" --set parallel.pp=2 \
                --set train.grad_accum=4 "$@" ;;
        dp) "$bin" launch -n 2 -- "$bin" train "${flags[@]}" --set train.grad_accum=2 "$@" ;;
        ref) "$bin" train "${flags[@]}" --set train.backend=reference --set train.steps=2 "$@" ;;
    esac >"$work/$tag/$name.log" 2>&1
}
fingerprint() {  # the checkpoint files' hashes, then the losses
    (cd "$1/checkpoints" 2>/dev/null && find . -name '*.safetensors' | sort | xargs -r sha256sum)
    python3 -c "import json, sys; print([json.loads(l)['loss'] for l in open(sys.argv[1])])" \
        "$1/metrics.jsonl" 2>/dev/null
}
status=0
for name in "${runs[@]}"; do
    mkdir -p "$work/before" "$work/after"
    train "$before" before "$name" || { echo "$name: the first binary failed ($work/before/$name.log)"; status=1; continue; }
    # shellcheck disable=SC2086
    train "$after" after "$name" ${EXTRA_AFTER:-} || { echo "$name: the second binary failed ($work/after/$name.log)"; status=1; continue; }
    if [ "$(fingerprint "$work/before/$name")" = "$(fingerprint "$work/after/$name")" ]; then
        echo "$name: same checkpoint files and losses"
    else
        echo "$name: DIFFERENT"; diff <(fingerprint "$work/before/$name") \
            <(fingerprint "$work/after/$name") | head -6
        status=1
    fi
done
exit $status
