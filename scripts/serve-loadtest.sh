#!/usr/bin/env bash
# Load test of `slimnn serve` on loopback with the loadgen example (bounded, self-stopping):
#   1. `slimnn bench` at the serving batch size (the ceiling);
#   2. saturation with dynamic batching on (closed loop), then p50/p99 at 50% and 90% of it (open loop);
#   3. saturation with batching off, for the gain;
#   4. 3x overload (open loop): every request must end as 200 or a fast 503, none hung; then
#      recovery at 50%.
# Prints one JSON line per phase. Usage: scripts/serve-loadtest.sh MODEL.onnx [BATCH] [SEQ] [THREADS]
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
model="${1:?usage: serve-loadtest.sh MODEL.onnx [BATCH] [SEQ] [THREADS]}"
batch="${2:-8}"; seq="${3:-128}"; threads="${4:-2}"
dur="${DURATION_S:-20}"
# SLIMNN_BIN / LOADGEN_BIN: use these binaries instead of building them.
if [ -z "${SLIMNN_BIN:-}" ] || [ -z "${LOADGEN_BIN:-}" ]; then
    cargo build --release -q -p slimnn-cli -p slimnn-serve --example loadgen
fi
slimnn="${SLIMNN_BIN:-$repo_root/target/release/slimnn}"
loadgen="${LOADGEN_BIN:-$repo_root/target/release/examples/loadgen}"
port=18600

echo "== slimnn bench --batch $batch --seq $seq --threads $threads"
"$slimnn" bench "$model" --batch "$batch" --seq "$seq" --threads "$threads" --iterations 30 --json /tmp/slimnn-loadtest-bench.json >/dev/null
cat /tmp/slimnn-loadtest-bench.json; echo

start_server() { # max_batch
    "$slimnn" serve --model "m=$model" --host 127.0.0.1 --http-port $port --grpc-port $((port + 1)) \
        --threads "$threads" --max-batch-size "$1" --max-batch-delay-ms 5 --queue-capacity 64 \
        --request-timeout-ms 30000 >/dev/null 2>/tmp/slimnn-loadtest-server.log &
    server_pid=$!
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "server did not become ready" >&2; exit 1
}
stop_server() { kill -TERM "$server_pid"; wait "$server_pid" || true; }
lg() { "$loadgen" --url "127.0.0.1:$port" --model m --seq "$seq" "$@"; }
rate_of() { python3 -c "import json,sys; print(json.loads(sys.argv[1])['ok_rows_per_s'])" "$1"; }

echo "== batching on (max batch $batch): saturation, closed loop, 4x$batch connections"
start_server "$batch"
sat=$(lg --connections $((4 * batch)) --duration-s "$dur"); echo "$sat"
s=$(rate_of "$sat")
for f in 0.5 0.9; do
    r=$(python3 -c "print($s * $f)")
    echo "== batching on: open loop at ${f} x saturation ($r req/s)"
    lg --rate "$r" --duration-s "$dur"
done
r=$(python3 -c "print($s * 3)")
echo "== batching on: 3x overload, open loop at $r req/s"
lg --rate "$r" --duration-s "$dur" --timeout-s 60
echo "== recovery: open loop at 0.5 x saturation right after"
lg --rate "$(python3 -c "print($s * 0.5)")" --duration-s 10
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^slimnn_(requests_total|batch_size_(sum|count))' || true
stop_server

echo "== batching off (max batch 1): saturation, closed loop"
start_server 1
lg --connections $((4 * batch)) --duration-s "$dur"
stop_server
