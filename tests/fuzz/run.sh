#!/usr/bin/env bash
# Runs one fuzz target for a bounded time over its seed corpus and prints how many inputs it ran.
#   run.sh BINARY SEEDS WORK TIMEOUT MAX_LEN SECONDS
# New inputs are kept in WORK (SEEDS, the committed corpus, is only read); a failing input is
# saved beside WORK as crash-*, timeout-*, leak-* or oom-* and the report is printed.
set -uo pipefail
bin=$1 seeds=$2 work=$3 timeout=$4 max_len=$5 seconds=$6
name=$(basename "$bin")
mkdir -p "$work"
log=$work.log
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
"$bin" "$work" "$seeds" -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=2048 \
    -max_len="$max_len" -artifact_prefix="$(dirname "$work")/$name-" -print_final_stats=1 \
    >"$log" 2>&1
rc=$?
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
inputs=$(find "$work" -type f | wc -l)
if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log"
    echo "$name: FAILED (exit $rc) after ${execs:-?} executions; log $log" | tee "$work.summary"
    exit 1
fi
echo "$name: ${execs:-?} executions in ${seconds} s (${rate:-?}/s), corpus $inputs inputs" |
    tee "$work.summary"
