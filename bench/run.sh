#!/usr/bin/env bash
# The whole benchmark: machine info, build, GEMM micro-benchmarks (kiln fp32/bf16, OpenBLAS
# with its kernel as the environment selects it and forced to SkylakeX), then the end-to-end
# training comparison (train_bench.sh). On a CPU without bf16 matrix products (or with oneDNN
# capped by ONEDNN_MAX_CPU_ISA=AVX2) the bf16 parts are skipped and fp32 leads. Meant to be run
# by hand on a quiet machine:
#
#   bash bench/run.sh | tee /tmp/bench.txt
#
# Environment:
#   THREADS    threads for every backend (default 2): OMP_NUM_THREADS, OPENBLAS_NUM_THREADS,
#              kiln train.threads, torch set_num_threads
#   STEPS      training steps per run (default 8; see train_bench.sh)
#   PRESETS    presets for train_bench.sh (default tiny,small)
#   GEMM_ARGS  extra bench_gemm flags (e.g. --benchmark_min_time=2 --benchmark_repetitions=3)
#   OUT_DIR    where the raw results go (default bench/last_run/): machine.txt, gemm_*.json,
#              train.json
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

export THREADS="${THREADS:-2}"
export OMP_NUM_THREADS="$THREADS"
export OPENBLAS_NUM_THREADS="$THREADS"
PRESETS="${PRESETS:-tiny,small}"
GEMM_ARGS="${GEMM_ARGS:-}"
OUT_DIR="${OUT_DIR:-bench/last_run}"
PYTHON="${PYTHON:-/usr/bin/python3}"
mkdir -p "$OUT_DIR"

section() { printf '\n## %s\n\n' "$*"; }

pkg_version() {  # first installed package of the given names: "name version"
    local p
    for p in "$@"; do
        if v="$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null)" && [[ -n "$v" ]]; then
            echo "$p $v"; return
        fi
    done
    echo "not found"
}

# --- machine --------------------------------------------------------------------------------
section "Machine"
{
    echo "date:          $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "cpu:           $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
    flags="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512_bf16|amx_bf16|amx_tile|amx_int8|avx512_fp16' | tr '\n' ' ' || true)"
    echo "cpu flags:     ${flags:-none of avx2/avx512f/avx512_bf16/amx}"
    echo "nproc:         $(nproc)"
    echo "threads used:  $THREADS"
    echo "load average:  $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "kernel:        $(uname -r)"
    echo "compiler:      $(c++ --version | head -1)"
    echo "oneDNN:        $(pkg_version libdnnl-dev libdnnl3 libdnnl2)"
    echo "OpenBLAS:      $(pkg_version libopenblas0-pthread libopenblas0-openmp libopenblas0-serial libopenblas-dev)"
    echo "benchmark:     $(pkg_version libbenchmark-dev)"
    echo "torch:         $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')"
    echo "OPENBLAS_CORETYPE (env): ${OPENBLAS_CORETYPE:-unset}"
    echo "ONEDNN_MAX_CPU_ISA (env): ${ONEDNN_MAX_CPU_ISA:-unset}"
} | tee "$OUT_DIR/machine.txt"

# --- build ------------------------------------------------------------------------------------
section "Build"
if [[ ! -f build/build.ninja && ! -f build/Makefile ]]; then
    cmake -S . -B build -G Ninja
fi
cmake --build build
detect_precision
echo "kiln products (train.precision=auto): $PRECISION${PRECISION_WHY:+ ($PRECISION_WHY)}" |
    tee -a "$OUT_DIR/machine.txt"

# --- gemm -------------------------------------------------------------------------------------
BENCH_GEMM=build/bench/bench_gemm
if bench_gemm_starts "$BENCH_GEMM"; then
    if [[ "$PRECISION" == bf16 ]]; then
        section "GEMM: kiln fp32 and bf16 ($THREADS OpenMP threads)"
        kiln_filter='^kiln_'
    else
        section "GEMM: kiln fp32 ($THREADS OpenMP threads; kiln_bf16 skipped, no bf16 products)"
        kiln_filter='^kiln_fp32'
    fi
    # shellcheck disable=SC2086
    "$BENCH_GEMM" --benchmark_filter="$kiln_filter" $GEMM_ARGS \
        --benchmark_out="$OUT_DIR/gemm_kiln.json" --benchmark_out_format=json

    section "GEMM: OpenBLAS fp32, OPENBLAS_CORETYPE as in the environment (${OPENBLAS_CORETYPE:-unset}), $THREADS threads"
    # shellcheck disable=SC2086
    "$BENCH_GEMM" --benchmark_filter='^openblas_' $GEMM_ARGS \
        --benchmark_out="$OUT_DIR/gemm_openblas_env.json" --benchmark_out_format=json

    if [[ "${OPENBLAS_CORETYPE:-}" == "SkylakeX" ]]; then
        echo "(the environment already sets OPENBLAS_CORETYPE=SkylakeX; no second OpenBLAS run)"
    else
        section "GEMM: OpenBLAS fp32, OPENBLAS_CORETYPE=SkylakeX, $THREADS threads"
        # shellcheck disable=SC2086
        OPENBLAS_CORETYPE=SkylakeX "$BENCH_GEMM" --benchmark_filter='^openblas_' $GEMM_ARGS \
            --benchmark_out="$OUT_DIR/gemm_openblas_skylakex.json" --benchmark_out_format=json
    fi
else
    section "GEMM"
    echo "bench_gemm $BENCH_GEMM_WHY"
fi

# --- training ---------------------------------------------------------------------------------
section "Training (STEPS=${STEPS:-8})"
bash bench/train_bench.sh --presets "$PRESETS" --out "$OUT_DIR/train.json" 2>&1

echo
echo "raw results in $OUT_DIR/"
