#!/usr/bin/env bash
# The head node under load: requests/s and latency of /api/jobs/ (status) and /metrics from a
# loopback load generator (wrk), alone and while a training run goes on, and what that load
# costs the training run (median tokens/s with and without it).
#
#   bash bench/serve_bench.sh        DURATION=20 CONNECTIONS=8 THREADS=1 by default
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DURATION="${DURATION:-20}"
CONNECTIONS="${CONNECTIONS:-8}"
THREADS="${THREADS:-1}"
command -v wrk > /dev/null || { echo "serve_bench: needs wrk (scripts/setup.sh installs it)"; exit 1; }
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$KILN" serve --port "$port" --runs "$work/runs" > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$port"

# Some history for the endpoints to report: 20 finished jobs and their runs.
for i in $(seq 20); do
    "$KILN" submit --address "$url" -- kiln train --set model.preset=tiny --set train.seq_len=64 \
        --set train.micro_batch=1 --set train.steps=2 --set train.checkpoint_every=0 > /dev/null
done
while "$KILN" status --address "$url" | grep -q -E 'PENDING|RUNNING'; do sleep 0.5; done

train_steps=$((DURATION * 2))
train() {  # run-name: tiny, both cores, steps at about 2/s; prints the median tokens/s
    OMP_NUM_THREADS=2 "$KILN" train --set model.preset=tiny --set train.seq_len=256 \
        --set train.micro_batch=4 --set train.steps="$train_steps" --set train.log_every=1000 \
        --set train.checkpoint_every=0 --set run.dir="$work/runs/$1" > "$work/$1.log" 2>&1
    median_tps "$work/runs/$1" 3
}
load() {  # path seconds: "req/s p99"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2"s --latency "$url$1" > "$work/wrk.txt" 2>&1
    local rps p99
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
    p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
    echo "$rps $p99"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "wrk -t$THREADS -c$CONNECTIONS, ${DURATION} s per figure; 20 jobs and runs in the head's table"
echo
echo "| endpoint | alone: req/s | alone: p99 | during training: req/s | during training: p99 |"
echo "|---|---|---|---|---|"
for path in /api/jobs/ /metrics; do
    read -r a_rps a_p99 < <(load "$path" "$DURATION")
    train "bg-$(basename "$path")" > "$work/bg.tps" &
    trainer=$!
    sleep 3
    read -r t_rps t_p99 < <(load "$path" $((DURATION - 5)))
    wait $trainer
    echo "| $path | $a_rps | $a_p99 | $t_rps | $t_p99 |"
done
echo
quiet=$(train quiet)
(sleep 3; wrk -t"$THREADS" -c"$CONNECTIONS" -d$((DURATION - 5))s "$url/metrics" > /dev/null 2>&1) &
pid=$!
loaded=$(train loaded)
wait $pid
again=$(train again)  # the quiet run once more: the machine's own noise
echo "training (tiny, 2 threads, median tokens/s): quiet $quiet, then $again; under wrk on" \
     "/metrics $loaded ($(/usr/bin/python3 -c "print(f'{100*(1-$loaded/$quiet):.1f}')")% slower" \
     "than the first quiet run)"
