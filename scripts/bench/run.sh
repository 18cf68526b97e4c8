#!/usr/bin/env bash
# payrail's throughput beside docs/DESIGN.md's PostgreSQL ceiling measured in the same run.
#   1. `payrail loadgen --compare-postgres`: pgbench (32 clients, -j 2) on the ceiling's
#      transaction, then create+confirm with automatic capture from 64 connections, against a
#      release build with the sandbox PSP at 0 ms. One merchant (the demo), so one ledger shard.
#   2. The same from wrk, an independent client, as a cross-check.
#   3. `payrail ledger verify` on what the run wrote.
# Usage: scripts/bench/run.sh [seconds] [merchants]   (defaults: 10, 1)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
merchants=${2:-1}
command -v pgbench >/dev/null || { echo "pgbench is missing (postgresql-client)" >&2; exit 1; }
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }

cargo build --release --quiet
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/payrail_bench
export PAYRAIL__SERVER__BIND=127.0.0.1:18080
export PAYRAIL__NATS__STREAM_PREFIX=BENCH
export PAYRAIL__LOG__LEVEL=warn
# A fresh database and fresh streams: events a previous run left unacknowledged would otherwise
# be delivered to this one, fail their lookups and end as dead letters.
drop_streams() { python3 scripts/fuzz/drop_streams.py BENCH_PSP_EVENTS BENCH_EVENTS 2>/dev/null || true; }
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS payrail_bench" 2>/dev/null
drop_streams
./target/release/payrail serve > /tmp/payrail-bench.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; drop_streams' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done

echo "== payrail loadgen --compare-postgres --connections 64 --duration $secs --merchants $merchants"
./target/release/payrail loadgen --url http://127.0.0.1:18080 --compare-postgres --connections 64 \
    --duration "$secs" --merchants "$merchants" --report target/loadgen-report.json 2>/dev/null

echo "== cross-check: wrk -c 64 -t 2 -d ${secs}s, create+confirm (automatic capture)"
wrk -c 64 -t 2 -d "${secs}s" --timeout 10s -s scripts/bench/create_confirm.lua http://127.0.0.1:18080 \
    | grep -E "Requests/sec|non-2xx|latency p"

echo "== ledger verify"
./target/release/payrail ledger verify | tail -2
