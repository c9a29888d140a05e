#!/usr/bin/env bash
# The prepared device check, run on the GPU machine from the repository root with the folder
# that bench/gpu/bundle.sh made carried along (bench/gpu/bundle). Finds the CUDA libraries the
# binaries need among that machine's CUDA toolkit and PyTorch's pip packages (nvidia-*), says
# which it used, then runs the CUDA op tests, the NCCL test and a short CPU training of the
# bundled kiln; each step has a time limit, and the whole stays under ~8 minutes.
# Figures go to $OUT (when set) and to stdout.
set -uo pipefail
cd "$(dirname "$0")/../.."
b=bench/gpu/bundle
out=${OUT:-/tmp/kiln-gpu-check}
mkdir -p "$out"
[ -x "$b/bin/kiln" ] || { echo "check: no $b/bin/kiln; run bench/gpu/bundle.sh first and carry $b"; exit 2; }
dirs=("$PWD/$b/lib")
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
} | tee "$out/machine.txt"
missing=0
for bin in "$b"/bin/*; do
    if ldd "$bin" | grep -q "not found"; then
        echo "check: $bin lacks:"; ldd "$bin" | grep "not found"; missing=1
    fi
done
[ "$missing" = 0 ] || exit 3
status=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc, $((SECONDS - t0)) s"
    tail -5 "$out/$name.log"
    [ "$rc" = 0 ] || status=1
}
step cuda_ops 120 "$b/bin/test_cuda"
step nccl 120 "$b/bin/test_nccl"
step train_cpu 180 "$b/bin/kiln" train --set train.steps=5 --set train.micro_batch=2 \
    --set run.dir="$out/run"
exit $status
