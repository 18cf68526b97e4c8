#!/usr/bin/env bash
# PSP webhooks end to end (HTTP → signature → JetStream → consumer → payment actor → commit):
# `payrail loadgen --mix webhooks` against a release build with the sandbox's own webhooks
# off, so every event counted is the load generator's. Usage: scripts/bench/webhooks.sh [events]
set -euo pipefail
cd "$(dirname "$0")/../.."
events=${1:-10000}
cargo build --release --quiet
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/payrail_bench
export PAYRAIL__SERVER__BIND=127.0.0.1:18080
export PAYRAIL__NATS__STREAM_PREFIX=BENCHWH$(date +%s)
export PAYRAIL__PSP__SANDBOX__WEBHOOKS=false
export PAYRAIL__LOG__LEVEL=warn
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS payrail_bench" 2>/dev/null
./target/release/payrail serve > /tmp/payrail-bench.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done
./target/release/payrail loadgen --url http://127.0.0.1:18080 --mix webhooks --events "$events" --connections 64 \
    --report target/webhooks-report.json 2>/dev/null
./target/release/payrail ledger verify | tail -1
