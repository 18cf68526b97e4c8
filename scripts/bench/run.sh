#!/usr/bin/env bash
# The payment core's throughput, beside DESIGN.md's PostgreSQL ceiling measured in the same
# run: pgbench (32 clients, -j 2) on the ceiling's transaction, then wrk (64 connections)
# on create+confirm with automatic capture against a release build of payrail with the
# sandbox PSP at 0 ms. Usage: scripts/bench/run.sh [seconds]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
here=scripts/bench
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
command -v pgbench >/dev/null || { echo "pgbench is missing (postgresql-client)" >&2; exit 1; }

db=payrail_bench_ceiling
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
psql -h 127.0.0.1 -U postgres -q -d $db -f $here/ceiling_schema.sql
echo "== PostgreSQL ceiling: pgbench -c 32 -j 2 -T $secs"
pgbench -h 127.0.0.1 -U postgres -n -c 32 -j 2 -T "$secs" -f $here/ceiling.sql $db | grep -E "tps|latency average|number of transactions actually"

cargo build --release --quiet
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/payrail_bench
export PAYRAIL__SERVER__BIND=127.0.0.1:18080
export PAYRAIL__NATS__STREAM_PREFIX=BENCH
export PAYRAIL__LOG__LEVEL=warn
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS payrail_bench"
./target/release/payrail serve > /tmp/payrail-bench.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done
echo "== payrail: wrk -c 64 -t 2 -d ${secs}s, create+confirm (automatic capture)"
wrk -c 64 -t 2 -d "${secs}s" --timeout 10s -s $here/create_confirm.lua http://127.0.0.1:18080 | grep -E "Requests/sec|non-2xx|latency p|requests in"
echo "== payments captured: $(psql -h 127.0.0.1 -U postgres -At -d payrail_bench -c "SELECT count(*) FROM payments WHERE status = 'captured'")"
