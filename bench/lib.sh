# Sourced by the bench scripts: ROOT, KILN (the binary, overridable), a work folder removed at
# exit, and the median tokens/s of a run folder.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KILN="${KILN:-$ROOT/build/kiln}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

median_tps() {  # RUN_DIR [SKIP]: median tokens/s of the steps after the first SKIP (default 2)
    /usr/bin/python3 - "$1/metrics.jsonl" "${2:-2}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(round(statistics.median(r["tokens_per_s"] for r in rows[int(sys.argv[2]):])))
PY
}

median_parts() {  # RUN_DIR [SKIP]: rank 0's median seconds per step in compute / wait / reduce / update
    /usr/bin/python3 - "$1/metrics.jsonl" "${2:-2}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
print(" / ".join(f"{statistics.median(r.get(k, 0) for r in rows):.3f}"
                 for k in ("compute_s", "wait_s", "reduce_s", "update_s")))
PY
}
