# Sourced by the bench scripts: ROOT, KILN (the binary, overridable), a work folder removed at
# exit, and medians of a run folder's metrics.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KILN="${KILN:-$ROOT/build/kiln}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Medians over a run's metrics.jsonl, skipping its first SKIP steps (the plan's and caches'
# warm-up): `medians RUN_DIR SKIP FORMAT KEY...` prints each key's median with FORMAT (a Python
# format spec), joined by " / ".
medians() {
    /usr/bin/python3 - "$@" <<'PY'
import json, statistics, sys
path, skip, fmt, *keys = sys.argv[1:]
rows = [json.loads(l) for l in open(path + "/metrics.jsonl")][int(skip):]
print(" / ".join(format(statistics.median(r.get(k, 0) for r in rows), fmt) for k in keys))
PY
}

median_tps() {  # RUN_DIR [SKIP]: median tokens/s of the steps after the first SKIP (default 2)
    medians "$1" "${2:-2}" .0f tokens_per_s
}

median_parts() {  # RUN_DIR: rank 0's median seconds per step in compute / wait / reduce / update
    medians "$1" 2 .3f compute_s wait_s reduce_s update_s
}

# The precision of kiln's matrix products on this CPU, as train.precision=auto (the default)
# resolves it: bf16 where oneDNN has native bf16 products (avx512_bf16 or AMX), else fp32.
# ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN, and so this, to fp32. Sets PRECISION (bf16 or fp32) and
# PRECISION_WHY (kiln's sentence when bf16 is refused, else empty). Exits when kiln won't run.
detect_precision() {
    if PRECISION_WHY="$("$KILN" train --set train.precision=bf16 --check 2>&1 >/dev/null)"; then
        PRECISION=bf16 PRECISION_WHY=""
    elif "$KILN" train --set train.precision=fp32 --check >/dev/null 2>&1; then
        PRECISION=fp32 PRECISION_WHY="${PRECISION_WHY#*train.precision=bf16: }"
        PRECISION_WHY="${PRECISION_WHY%; use train.precision=*}"
    else
        echo "$(basename "$0"): '$KILN train --check' fails; build kiln first" >&2
        exit 1
    fi
}

# bench_gemm_starts BIN: whether the gemm micro-benchmark starts here. Before any benchmark it
# checks kiln's products against OpenBLAS; builds before 16c42d0 checked bf16 too and aborted
# on a CPU without bf16 products. When it does not start, BENCH_GEMM_WHY holds the first line
# of its error.
bench_gemm_starts() {
    BENCH_GEMM_WHY="not built (needs Google Benchmark + OpenBLAS)"
    [[ -x "$1" ]] || return 1
    if ( "$1" --benchmark_filter='^$' >/dev/null; exit $? ) 2>"$work/bench_gemm.err"; then
        BENCH_GEMM_WHY=""
    else
        BENCH_GEMM_WHY="does not start here: $(head -1 "$work/bench_gemm.err" |
            sed -E 's/^kiln: internal error at [^ ]*: check .* failed: //; s/ \(.*\)//' | cut -c1-160)"
        return 1
    fi
}
