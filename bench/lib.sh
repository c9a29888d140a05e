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
