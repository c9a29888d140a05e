#!/usr/bin/env bash
# End-to-end training throughput: kiln (bf16, fp32) against the PyTorch peer
# (bench/torch_train.py, fp32 and bf16 autocast) on the tiny and small presets.
#
# On a CPU without bf16 matrix products (no avx512_bf16 or AMX; or oneDNN capped with
# ONEDNN_MAX_CPU_ISA=AVX2) both bf16 columns are skipped ("n/a (no bf16 products)": PyTorch's
# autocast would run its bf16 products emulated), the ratio is kiln fp32 / torch fp32 and the
# ceiling is the fp32 gemm. The line under the title says which precision led.
#
#   bash bench/train_bench.sh [--presets tiny,small] [--out bench/last_run.json]
#
# Environment:
#   STEPS     steps per run (default 8, at least 3). Both implementations run STEPS steps and
#             report the median tokens/s of the steps after the first 2 (kiln: steps 3..STEPS
#             of its metrics.jsonl; torch: --warmup 2 --steps STEPS-2).
#   ROUNDS    rounds (default 3). Each round runs the gemm ceiling and every configuration in
#             turn; the shared cores drift by 10-30% over minutes, so every ratio is taken within
#             a round and the table gives the medians over rounds.
#   THREADS   threads for kiln (train.threads, OMP_NUM_THREADS), torch (set_num_threads) and
#             bench_gemm (default 2).
#   KILN      the kiln binary (default build/kiln); BENCH_GEMM likewise (build/bench/bench_gemm).
#   PYTHON    interpreter with torch (default /usr/bin/python3).
#
# The Markdown table goes to stdout, progress to stderr, and everything measured (per-step
# tokens/s, the torch JSON lines, the ceiling) to the --out JSON file.
#
# Achieved GFLOP/s = tokens/s x flops/token with flops/token = 6 N_matmul + 12 L C T, where
# N_matmul counts the weights of every matrix product (per layer 4 C^2 for q, k, v, o and
# 3 C F for the MLP, plus V C for the LM head; no embedding, no norms). The ceiling is the
# kiln gemm in the leading precision on a square 2048^3 product (bench_gemm's kiln_bf16/square,
# or kiln_fp32/square without bf16 products).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

PRESETS="tiny,small"
OUT="bench/last_run.json"
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --presets) PRESETS="$2"; shift 2 ;;
        --presets=*) PRESETS="${1#*=}"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "train_bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

STEPS="${STEPS:-8}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-2}"
KILN="${KILN:-build/kiln}"
BENCH_GEMM="${BENCH_GEMM:-build/bench/bench_gemm}"
PYTHON="${PYTHON:-/usr/bin/python3}"
SKIP=2  # steps left out of the median (start-up, first-touch allocation, oneDNN primitive creation)

if ! [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "train_bench.sh: ROUNDS=$ROUNDS must be a positive integer" >&2
    exit 2
fi
if ! [[ "$STEPS" =~ ^[0-9]+$ ]] || (( STEPS <= SKIP )); then
    echo "train_bench.sh: STEPS=$STEPS must be an integer > $SKIP" >&2
    exit 2
fi
if [[ ! -x "$KILN" ]]; then
    echo "train_bench.sh: $KILN not found; build first (cmake --build build)" >&2
    exit 1
fi
PRESETS="${PRESETS//,/ }"
for p in $PRESETS; do
    case "$p" in tiny|small) ;; *) echo "train_bench.sh: unknown preset '$p' (tiny, small)" >&2; exit 2 ;; esac
done

WORK="$work"  # lib.sh's, removed at exit
LOADAVG_START="$(cut -d" " -f1-3 /proc/loadavg)"
failures=0
log() { echo "[train_bench] $*" >&2; }

# --- precision: bf16 where the CPU has bf16 products, else fp32 ---------------------------------
detect_precision
if [[ "$PRECISION" == bf16 ]]; then
    PRECISIONS="bf16 fp32"
    log "precision: bf16 products available; kiln and torch run bf16 and fp32"
else
    PRECISIONS="fp32"
    log "precision: fp32 only, bf16 columns skipped: $PRECISION_WHY"
fi

# --- ceiling: kiln gemm in $PRECISION on 2048^3 -----------------------------------------------
# ceiling -> $WORK/ceiling_rROUND.json
GEMM_OK=true
bench_gemm_starts "$BENCH_GEMM" || { GEMM_OK=false; log "$BENCH_GEMM $BENCH_GEMM_WHY; no ceiling"; }
ceiling() {
    $GEMM_OK || return 0
    log "round $round: the $PRECISION gemm ceiling ($BENCH_GEMM kiln_$PRECISION/square, $THREADS threads)"
    if ! OMP_NUM_THREADS="$THREADS" "$BENCH_GEMM" --benchmark_filter="^kiln_$PRECISION/square" \
            --benchmark_format=json --benchmark_min_time=0.5 >"$WORK/ceiling_r$round.json" \
            2>"$WORK/ceiling.err"; then
        log "bench_gemm failed:"; tail -5 "$WORK/ceiling.err" >&2
        rm -f "$WORK/ceiling_r$round.json"; failures=$((failures + 1))
    fi
}

# --- runs ---------------------------------------------------------------------------------------
# kiln PRESET BATCH SEQ PRECISION -> $WORK/kiln_PRESET_PRECISION_rROUND.jsonl (its metrics.jsonl)
run_kiln() {
    local preset=$1 batch=$2 seq=$3 prec=$4
    local dir; dir="$(mktemp -d)"
    local name="kiln_${preset}_${prec}_r$round"
    log "round $round: kiln $preset $prec: $STEPS steps of $batch x $seq"
    if OMP_NUM_THREADS="$THREADS" "$KILN" train \
            --set model.preset="$preset" --set train.micro_batch="$batch" \
            --set train.seq_len="$seq" --set train.steps="$STEPS" --set train.warmup_steps=1 \
            --set train.log_every=1 --set run.dir="$dir" --set train.precision="$prec" \
            --set train.threads="$THREADS" \
            >"$WORK/$name.log" 2>&1 && [[ -s "$dir/metrics.jsonl" ]]; then
        cp "$dir/metrics.jsonl" "$WORK/$name.jsonl"
    else
        log "kiln $preset $prec failed:"; tail -5 "$WORK/$name.log" >&2
        failures=$((failures + 1))
    fi
    rm -rf "$dir"  # checkpoints are hundreds of MB
}

# torch PRESET MODE -> $WORK/torch_PRESET_MODE_rROUND.json (the peer's JSON line)
run_torch() {
    local preset=$1 mode=$2
    local name="torch_${preset}_${mode}_r$round"
    log "round $round: torch $preset $mode: $SKIP warm-up + $((STEPS - SKIP)) timed steps"
    if OMP_NUM_THREADS="$THREADS" "$PYTHON" bench/torch_train.py --preset "$preset" --mode "$mode" \
            --warmup "$SKIP" --steps "$((STEPS - SKIP))" --threads "$THREADS" \
            >"$WORK/$name.out" 2>"$WORK/$name.err"; then
        tail -1 "$WORK/$name.out" >"$WORK/$name.json"
    else
        log "torch $preset $mode failed:"; tail -5 "$WORK/$name.err" >&2
        failures=$((failures + 1))
    fi
}

for round in $(seq 1 "$ROUNDS"); do
    ceiling
    for p in $PRESETS; do
        case "$p" in
            tiny) batch=8; seq=256 ;;
            small) batch=4; seq=512 ;;
        esac
        for prec in $PRECISIONS; do
            run_kiln "$p" "$batch" "$seq" "$prec"
            run_torch "$p" "$prec"
        done
    done
done

# --- report -------------------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
WORK="$WORK" OUT="$OUT" PRECISION="$PRECISION" PRECISION_WHY="$PRECISION_WHY" \
GEMM_WHY="${BENCH_GEMM_WHY:-}" LOADAVG_START="$LOADAVG_START" PRESETS="$PRESETS" STEPS="$STEPS" SKIP="$SKIP" THREADS="$THREADS" ROUNDS="$ROUNDS" \
"$PYTHON" - <<'EOF'
import datetime, json, os, statistics, subprocess

work, out = os.environ["WORK"], os.environ["OUT"]
steps, skip, threads = int(os.environ["STEPS"]), int(os.environ["SKIP"]), int(os.environ["THREADS"])
rounds = range(1, int(os.environ["ROUNDS"]) + 1)
# The leading precision: bf16 where the CPU has bf16 products, else fp32 (and no bf16 runs).
lead = os.environ["PRECISION"]
ran = ("bf16", "fp32") if lead == "bf16" else ("fp32",)
NO_BF16 = "n/a (no bf16 products)"

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

# Architecture of the presets (src/model/config.cpp); batch/seq are the benchmark's.
PRESETS = {
    "tiny":  dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab=32000, multiple_of=32, batch=8, seq=256),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab=32000, multiple_of=32, batch=4, seq=512),
}

def ffn_hidden(dim, multiple_of):
    h = int(2 * (4 * dim) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)

def shapes(p):
    C, L, V = p["dim"], p["n_layers"], p["vocab"]
    F = ffn_hidden(C, p["multiple_of"])
    kv = C * p["n_kv_heads"] // p["n_heads"]
    per_layer = C * C + 2 * C * kv + C * C + 3 * C * F  # q, k, v, o, gate, up, down
    n_matmul = L * per_layer + V * C
    return F, n_matmul, 6 * n_matmul + 12 * L * C * p["seq"]

def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def gemm_ceiling(j):
    runs = [b for b in j.get("benchmarks", []) if b.get("run_type", "iteration") == "iteration"]
    return runs[0]["GFLOP/s"] if runs else None

ceilings, cj = [], None
for r in rounds:
    j = load_json(os.path.join(work, f"ceiling_r{r}.json"))
    ceilings.append(gemm_ceiling(j) if j else None)
    cj = cj or j
ceiling = median(ceilings)

result = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "steps": steps, "median_over_steps_after": skip, "threads": threads, "rounds": len(rounds),
    # 1/5/15-minute load averages before and after the runs: a busy machine shows up here.
    "loadavg_start": os.environ["LOADAVG_START"],
    "loadavg_end": " ".join(open("/proc/loadavg").read().split()[:3]),
    "precision": lead, "no_bf16_products": os.environ["PRECISION_WHY"] or None,
    f"{lead}_gemm_ceiling_gflops": ceiling, f"{lead}_gemm_ceiling_gflops_per_round": ceilings,
    "bench_gemm": os.environ["GEMM_WHY"] or "ran",
    "bench_gemm_context": cj.get("context") if cj else None,
    "presets": {},
}

rows = []
for name in os.environ["PRESETS"].split():
    p = PRESETS[name]
    F, n_matmul, flops_tok = shapes(p)
    entry = {"dim": p["dim"], "n_layers": p["n_layers"], "ffn": F, "vocab": p["vocab"],
             "micro_batch": p["batch"], "seq_len": p["seq"], "n_matmul": n_matmul,
             "flops_per_token": flops_tok}
    per_round = []  # [round] {config: tokens/s}
    for r in rounds:
        tps = {}
        for prec in ("bf16", "fp32"):
            if prec not in ran:
                tps[f"kiln_{prec}"] = None
                continue
            try:
                with open(os.path.join(work, f"kiln_{name}_{prec}_r{r}.jsonl")) as f:
                    metrics = [json.loads(line) for line in f if line.strip()]
            except OSError:
                metrics = []
            tps[f"kiln_{prec}"] = median(m["tokens_per_s"] for m in metrics if m["step"] > skip)
            entry.setdefault(f"kiln_{prec}_rounds", []).append(
                {"step_tokens_per_s": [m["tokens_per_s"] for m in metrics],
                 "loss": [m["loss"] for m in metrics]})
        for mode in ("fp32", "bf16"):
            if mode not in ran:
                tps[f"torch_{mode}"] = None
                continue
            tj = load_json(os.path.join(work, f"torch_{name}_{mode}_r{r}.json"))
            tps[f"torch_{mode}"] = tj["tokens_per_s"] if tj else None
            entry.setdefault(f"torch_{mode}_rounds", []).append(tj)
        best_torch = max([v for k, v in tps.items() if k.startswith("torch") and v], default=None)
        kb = tps[f"kiln_{lead}"]
        tps["ratio"] = kb / best_torch if kb and best_torch else None
        c = ceilings[r - 1]
        tps["pct"] = 100 * kb * flops_tok / 1e9 / c if kb and c else None
        per_round.append(tps)
    tps = {k: median(t[k] for t in per_round) for k in per_round[0]}
    ratio, pct = tps["ratio"], tps["pct"]
    achieved = tps[f"kiln_{lead}"] * flops_tok / 1e9 if tps[f"kiln_{lead}"] else None
    for k in ("kiln_bf16", "kiln_fp32", "torch_fp32", "torch_bf16"):
        if k.endswith(ran):
            entry[k] = {"tokens_per_s": tps[k], "per_round": [t[k] for t in per_round]}
    entry.update({f"kiln_{lead}_over_best_torch": ratio,
                  f"kiln_{lead}_over_best_torch_per_round": [t["ratio"] for t in per_round],
                  f"kiln_{lead}_gflops": achieved, f"kiln_{lead}_pct_of_ceiling": pct,
                  f"kiln_{lead}_pct_of_ceiling_per_round": [t["pct"] for t in per_round],
                  "kiln_fp32_gflops": tps["kiln_fp32"] * flops_tok / 1e9 if tps["kiln_fp32"] else None})
    result["presets"][name] = entry
    rows.append((name, tps, ratio, achieved, pct))

with open(out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

def fmt(v, spec, unit=""):
    return "n/a" if v is None else format(v, spec) + unit

def cell(k, tps):
    return NO_BF16 if k.endswith("bf16") and "bf16" not in ran else fmt(tps[k], ".0f")

# kiln's leading precision against the best PyTorch mode that ran (torch fp32 alone without bf16)
vs = "best torch" if lead == "bf16" else "torch fp32"
print(f"Training throughput, tokens/s (median of steps {skip + 1}..{steps}, {threads} threads; "
      f"medians over {len(rounds)} rounds; ratio and % of ceiling taken within each round)")
if lead == "bf16":
    print("Precision: bf16 products available; kiln and torch ran bf16 and fp32")
else:
    print(f"Precision: fp32 only, bf16 skipped ({os.environ['PRECISION_WHY']})")
print()
print(f"| preset | kiln bf16 | kiln fp32 | torch fp32 | torch bf16 | kiln {lead} / {vs} "
      f"| kiln {lead} GFLOP/s | % of {lead} gemm ceiling |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name, tps, ratio, achieved, pct in rows:
    print(f"| {name} | {cell('kiln_bf16', tps)} | {cell('kiln_fp32', tps)} "
          f"| {cell('torch_fp32', tps)} | {cell('torch_bf16', tps)} "
          f"| {fmt(ratio, '.2f', 'x')} | {fmt(achieved, '.0f')} | {fmt(pct, '.1f', '%')} |")
print()
for name in os.environ["PRESETS"].split():
    e = result["presets"][name]
    print(f"{name}: kiln {lead} / {vs} per round: "
          + ", ".join(fmt(v, ".2f", "x") for v in e[f"kiln_{lead}_over_best_torch_per_round"])
          + "; % of ceiling per round: "
          + ", ".join(fmt(v, ".1f", "%") for v in e[f"kiln_{lead}_pct_of_ceiling_per_round"]))
gemm_why = f"; bench_gemm {os.environ['GEMM_WHY']}" if os.environ["GEMM_WHY"] else ""
print(f"{lead} gemm ceiling (kiln_{lead}/square, 2048^3): median {fmt(ceiling, '.0f')} GFLOP/s "
      "(per round: " + ", ".join(fmt(c, ".0f") for c in ceilings) + ")" + gemm_why)
for name, _, _, _, _ in rows:
    e = result["presets"][name]
    print(f"{name}: N_matmul {e['n_matmul']:,}, flops/token {e['flops_per_token']:,} "
          f"(C {e['dim']}, L {e['n_layers']}, F {e['ffn']}, V {e['vocab']}, T {e['seq_len']})")
print(f"raw results: {out}")
EOF

if (( failures > 0 )); then
    log "$failures run(s) failed"
    exit 1
fi
