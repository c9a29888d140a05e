#!/usr/bin/env bash
# Builds what the GPU check runs (kiln, test_cuda, test_nccl) with CUDA for sm_90 (H100/H200),
# for any x86-64 host CPU (KILN_NATIVE=OFF), and gathers the binaries with the shared libraries
# they link that a GPU machine lacks (Debian's oneDNN, gloo, sentencepiece, ...) into
# bench/gpu/bundle/ (ignored by git). The CUDA libraries (cudart, cuBLAS, cuDNN, NCCL) are left
# out: the GPU machine has its own (bench/gpu/check.sh finds them). Then:
#   run (carry bench/gpu/bundle):  bash bench/gpu/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench/gpu/bundle
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DKILN_CUDA=ON -DKILN_NATIVE=OFF \
      -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
cmake --build build-gpu -j "$(nproc)" --target kiln test_cuda test_nccl
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
cp build-gpu/kiln build-gpu/tests/test_cuda build-gpu/tests/test_nccl "$out/bin/"
# Every library the binaries resolve here, but glibc's and CUDA's own.
cuda='lib(cuda|cudart|cublas|cublasLt|cudnn[a-z_]*|nccl|nvrtc|nvJitLink)\.so'
for b in "$out"/bin/*; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
    if [[ "$name" =~ ^(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so ]]; then continue; fi
    if [[ "$name" =~ ^$cuda ]]; then echo "$name" >>"$out/cuda-libs.txt"; continue; fi
    cp -L "$path" "$out/lib/$name"
done
sort -u -o "$out/cuda-libs.txt" "$out/cuda-libs.txt"
strip --strip-unneeded "$out"/bin/* "$out"/lib/* 2>/dev/null || true
# Libraries over 16 MiB travel gzipped (oneDNN: ~40 MiB, ~11 gzipped); check.sh unpacks them.
find "$out/lib" -type f -size +16M -exec gzip -9 {} +
git rev-parse --short HEAD >"$out/commit.txt"
echo "bundle: $(du -sh "$out" | cut -f1) in $out (the carry limit is 64 MiB); CUDA libraries the GPU machine must provide:"
sed 's/^/  /' "$out/cuda-libs.txt"
