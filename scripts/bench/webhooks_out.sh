#!/usr/bin/env bash
# Merchant webhooks out, end to end (commit → outbox relay → JetStream → dispatcher → leased
# delivery rows → endpoint workers → signed POST → recorded outcome): `payrail loadgen --mix
# webhooks-out` against a release build, the default system (risk on, the sandbox's own PSP
# webhooks on), with ENDPOINTS endpoints that each take every event, and PostgreSQL's ceiling
# measured in the same run. Usage: scripts/bench/webhooks_out.sh [endpoints] [seconds] [connections]
set -euo pipefail
cd "$(dirname "$0")/../.."
endpoints=${1:-4}
seconds=${2:-20}
connections=${3:-64}
cargo build --release --quiet
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/payrail_bench_wo
export PAYRAIL__SERVER__BIND=127.0.0.1:18081
export PAYRAIL__NATS__STREAM_PREFIX=BENCHWO$(date +%s)
export PAYRAIL__LOG__LEVEL=warn
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS payrail_bench_wo" 2>/dev/null
./target/release/payrail serve > /tmp/payrail-bench-wo.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18081/readyz >/dev/null && break; sleep 0.1; done
./target/release/payrail loadgen --url http://127.0.0.1:18081 --mix webhooks-out --endpoints "$endpoints" \
    --duration "$seconds" --connections "$connections" --compare-postgres --report target/webhooks-out-report.json 2>/dev/null
curl -s http://127.0.0.1:18081/metrics | grep -E '^payrail_webhook_(deliveries_total|retry_queue|deliveries_pending)' || true
./target/release/payrail ledger verify | tail -1
