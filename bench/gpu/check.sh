#!/usr/bin/env bash
# The prepared device check, run on the GPU machine from the repository root with the folder
# that bench/gpu/bundle.sh made carried along (bench/gpu/bundle). Finds the CUDA libraries the
# binaries need among that machine's CUDA toolkit and PyTorch's pip packages (nvidia-*), says
# which it used, then runs the CUDA op tests, the NCCL test, and the bundled kiln training `tiny`
# for 30 steps in fp32 on the GPU and on the CPUs, comparing their loss curves, then a 1.1B Llama
# in bf16 (its micro-batches replayed from CUDA graphs, with cuDNN's attention, then launched
# one by one) against PyTorch, where its step's device time goes, and its attention against
# PyTorch's attention kernels; each step has a time limit, and the whole stays within
# CHECK_BUDGET_S (480 s, 8 minutes; a step that would pass it is cut or skipped, and says so).
# Figures go to $OUT (when set) and to stdout, ending with summary.md: the block for
# bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
b=bench/gpu/bundle
out=${OUT:-/tmp/kiln-gpu-check}
mkdir -p "$out"
[ -x "$b/bin/kiln" ] || { echo "check: no $b/bin/kiln; run bench/gpu/bundle.sh first and carry $b"; exit 2; }
libs="$PWD/$b/lib"
if compgen -G "$libs/*.gz" >/dev/null; then  # bundle.sh gzips the largest libraries
    unpacked=$(mktemp -d)
    cp -a "$libs/." "$unpacked/" && gunzip "$unpacked"/*.gz
    libs=$unpacked
fi
dirs=("$libs")
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && dirs+=("$d")
done
# PyTorch's wheels bring cuDNN, NCCL and cuBLAS as nvidia-* packages, each with a lib/ folder.
while read -r d; do dirs+=("$d"); done < <(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
for r in roots:
    for lib in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        print(lib)
PY
)
export LD_LIBRARY_PATH="$(IFS=:; echo "${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    echo "commit $(cat "$b/commit.txt" 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
    echo "library path: $LD_LIBRARY_PATH"
    # Loaded only for KILN_CUDA_ATTENTION=cudnn, so ldd below does not look for it.
    echo "cuDNN: $(for d in "${dirs[@]}"; do ls "$d"/libcudnn.so.9* 2>/dev/null; done | head -1)"
} | tee "$out/machine.txt"
missing=0
for bin in "$b"/bin/*; do
    if ldd "$bin" | grep -q "not found"; then
        echo "check: $bin lacks:"; ldd "$bin" | grep "not found"; missing=1
    fi
done
[ "$missing" = 0 ] || exit 3
status=0
# The whole check stays within CHECK_BUDGET_S (default 480 s, well under the device tool's 600 s
# for one command), so that the summary at the end is always written: a step gets at most the
# time left, and none starts with less than 20 s left.
budget=${CHECK_BUDGET_S:-480}
SECONDS=0  # the budget counts from here: library search and ldd take seconds at most
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped, ${SECONDS} s of the ${budget} s budget used" | tee "$out/$name.log"
        last=124 status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc, $((SECONDS - t0)) s"
    tail -5 "$out/$name.log"
    last=$rc
    [ "$rc" = 0 ] || status=1
}
k="$b/bin/kiln"
step cuda_ops 90 "$b/bin/test_cuda" --gtest_filter=-Cuda.CudnnAttentionMatchesReference
# Under a driver older than the binary's CUDA the runtime sees no device and every device test
# skips: here that is a failure, with the runtime's reason.
if grep -m1 "no CUDA device here" "$out/cuda_ops.log"; then
    echo "check: the CUDA tests saw no device"; status=1
fi
# cuDNN's attention in its own process: a fault there cannot take the other cases with it.
step cudnn_ops 60 "$b/bin/test_cuda" --gtest_filter=Cuda.CudnnAttentionMatchesReference
step nccl 60 "$b/bin/test_nccl"
# A small real data set: the built-in stories, a 512-piece tokenizer trained on them.
data="$out/data"
step data 60 "$k" data --corpus builtin:stories:2000 --train-tokenizer 512 --out "$data" \
    --set data.seq_len=256
# tiny, 30 steps in fp32 on the GPU and on this machine's CPUs from the same seed: the curves
# must agree (relative difference <= 1e-4 at every step).
tiny=(--set model.vocab_size=512 --set data.source="$data" --set data.tokenizer="$data/tokenizer.model"
      --set train.steps=30 --set train.precision=fp32 --set train.autotune=false
      --set train.log_every=10 --set train.checkpoint_every=0)
step train_cuda 90 "$k" train "${tiny[@]}" --set train.backend=cuda --set run.dir="$out/tiny-cuda"
step train_cpu 120 "$k" train "${tiny[@]}" --set run.dir="$out/tiny-cpu"
step curves 20 python3 bench/gpu/curves.py "$out/tiny-cpu/metrics.jsonl" \
    "$out/tiny-cuda/metrics.jsonl" 30 1e-4
if [ "$status" != 0 ]; then  # the same run with every launch waited for names the op at fault
    KILN_CUDA_SYNC=1 step train_cuda_sync 120 "$k" train "${tiny[@]}" --set train.backend=cuda \
        --set run.dir="$out/tiny-cuda-sync"
fi
# tiny in bf16 with kiln's fused attention and with cuDNN's (KILN_CUDA_ATTENTION=cudnn): the same
# curve within what bf16's roundings move it (2% at each step).
bf16=(--set train.precision=bf16 --set train.backend=cuda)
step train_cuda_bf16 60 "$k" train "${tiny[@]}" "${bf16[@]}" --set run.dir="$out/tiny-cuda-bf16"
KILN_CUDA_ATTENTION=cudnn step train_cuda_cudnn 60 "$k" train "${tiny[@]}" "${bf16[@]}" \
    --set run.dir="$out/tiny-cuda-cudnn"
step curves_cudnn 20 python3 bench/gpu/curves.py "$out/tiny-cuda-bf16/metrics.jsonl" \
    "$out/tiny-cuda-cudnn/metrics.jsonl" 30 2e-2
# With two GPUs or more: data and tensor parallelism over NCCL against one GPU running the same
# global batch as two micro-batches.
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
    step train_cuda_accum 90 "$k" train "${tiny[@]}" --set train.backend=cuda \
        --set train.grad_accum=2 --set run.dir="$out/tiny-cuda-accum"
    step train_cuda_dp2 120 "$k" launch -n 2 -- "$k" train "${tiny[@]}" --set train.backend=cuda \
        --set run.dir="$out/tiny-cuda-dp2"
    step train_cuda_tp2 120 "$k" launch -n 2 -- "$k" train "${tiny[@]}" --set train.backend=cuda \
        --set parallel.tp=2 --set train.grad_accum=2 --set run.dir="$out/tiny-cuda-tp2"
    # Sequence parallel: the backward's gathers and sums run beside its products.
    step train_cuda_tp2sp 120 "$k" launch -n 2 -- "$k" train "${tiny[@]}" \
        --set train.backend=cuda --set parallel.tp=2 --set parallel.sp=true \
        --set train.grad_accum=2 --set run.dir="$out/tiny-cuda-tp2sp"
    for layout in dp2 tp2 tp2sp; do
        step "curves_$layout" 20 python3 bench/gpu/curves.py "$out/tiny-cuda-accum/metrics.jsonl" \
            "$out/tiny-cuda-$layout/metrics.jsonl" 30 1e-4
    done
fi
# The GPU run's Hugging Face export read by this machine's transformers, against `kiln eval`.
step export 60 "$k" export --checkpoint "$out/tiny-cuda" --format hf --out "$out/hf" \
    --tokenizer "$data/tokenizer.model" --force  # $out may hold a previous check's export
step eval 60 bash -c "'$k' eval --checkpoint '$out/tiny-cuda' --data '$data' --max-rows 8 \
    --precision fp32 >'$out/eval.json'"
# The same checkpoint read by eval and sample on the GPU: eval's loss within 1e-5 of the CPU's.
step eval_cuda 60 bash -c "'$k' eval --checkpoint '$out/tiny-cuda' --data '$data' --max-rows 8 \
    --precision fp32 --backend cuda >'$out/eval-cuda.json'"
step eval_agree 10 python3 -c "import json, sys
a, b = (json.load(open(f))['loss'] for f in sys.argv[1:])
print('eval loss: cpu', a, 'cuda', b); sys.exit(abs(a - b) > 1e-5 * abs(a))" \
    "$out/eval.json" "$out/eval-cuda.json"
step sample_cuda 60 "$k" sample --checkpoint "$out/tiny-cuda" --backend cuda --precision fp32 \
    --tokenizer "$data/tokenizer.model" --prompt "Once upon a time" --tokens 24 --temperature 0
text="Once upon a time there was a little fox who loved the sea."
{ echo "$text"; echo "$text" | "$k" tokenizer encode --tokenizer "$data/tokenizer.model"; } \
    >"$out/ids.txt"
step hf 120 python3 bench/gpu/hf_check.py "$out/hf" "$data/shard-00000.bin" 8 "$out/eval.json" \
    "$out/ids.txt"
# The 1.1B Llama at sequence 4096 in bf16: kiln, then PyTorch in the same run.
b11=(--set model.dim=2048 --set model.n_layers=22 --set model.n_heads=32 --set model.n_kv_heads=4
     --set model.vocab_size=32000 --set model.multiple_of=256 --set train.seq_len=4096
     --set train.micro_batch=2 --set train.precision=bf16 --set train.recompute=none
     --set train.steps=12 --set train.log_every=1 --set train.checkpoint_every=-1
     --set train.peak_gflops=989000 --set train.backend=cuda)
# Its products tuned among cuBLASLt's algorithms first; should that fail, the run again untuned,
# so the figure is had either way.
step kiln_1b 200 "$k" train "${b11[@]}" --set run.dir="$out/kiln-1b"
[ "$last" = 0 ] || step kiln_1b_untuned 200 "$k" train "${b11[@]}" --set train.autotune=false \
    --set run.dir="$out/kiln-1b-untuned"
# The same run with cuDNN's fused attention in place of kiln's own kernels (the tuned plan from
# the cache the first run left).
KILN_CUDA_ATTENTION=cudnn step kiln_1b_cudnn 150 "$k" train "${b11[@]}" --set train.steps=6 \
    --set run.dir="$out/kiln-1b-cudnn"
step torch_1b 240 python3 bench/gpu/torch_llama.py --batch 2 --seq 4096
# Where the 1.1B step's device time goes: 3 steps with each op marked by events, summed per op
# (the products per shape) into profile-1b.txt.
KILN_CUDA_PROFILE="$out/profile-1b.txt" step kiln_1b_profile 120 "$k" train "${b11[@]}" \
    --set train.steps=3 --set train.autotune=false --set run.dir="$out/kiln-1b-profile"
head -30 "$out/profile-1b.txt" 2>/dev/null
# Attention alone at one layer's shape: PyTorch's flash, cuDNN and memory-efficient kernels
# against kiln's (the profile's attention rows), forward and backward.
step attention 90 python3 bench/gpu/torch_attention.py --batch 2 --seq 4096 --heads 32 \
    --kv-heads 4 --head-dim 64 --profile "$out/profile-1b.txt"
# Last, as the least needed: the 1.1B run with every kernel launched from the host
# (train.graphs=false), for what replaying each micro-batch's CUDA graph saves; the tuned plan
# comes from the cache the first run left.
step kiln_1b_eager 120 "$k" train "${b11[@]}" --set train.steps=6 --set train.graphs=false \
    --set run.dir="$out/kiln-1b-eager"
# The figures as one block for bench/RESULTS.md ($out/summary.md).
echo; python3 bench/gpu/summary.py "$out"
exit $status
