#!/usr/bin/env bash
# Marketplace throughput (issue 14) beside the plain mix and docs/DESIGN.md's PostgreSQL ceiling,
# all in one run against one release payrail:
#   1. `payrail loadgen --compare-postgres`: the ceiling (pgbench), then create+confirm
#      (automatic capture) for the demo merchant alone;
#   2. the same spread over 32 merchants;
#   3. one platform (the demo merchant) with 10,000 sellers: every payment split between 5 of them
#      (Zipf) with a 10 % application fee (`--splits 5 --sellers 10000`);
#   4. `payrail ledger verify`.
# Usage: scripts/bench/marketplace.sh [seconds] [sellers]   (defaults: 20, 10000)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-20}
sellers=${2:-10000}
command -v pgbench >/dev/null || { echo "pgbench is missing (postgresql-client)" >&2; exit 1; }
cargo build --release --quiet --bin payrail
db=payrail_bench_market
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
export PAYRAIL__SERVER__BIND=127.0.0.1:18091
export PAYRAIL__NATS__STREAM_PREFIX=BENCHMARKET
export PAYRAIL__LOG__LEVEL=warn
export PAYRAIL__RECONCILIATION__DAILY_AT_UTC=""
url=http://127.0.0.1:18091
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null
python3 scripts/fuzz/drop_streams.py BENCHMARKET_PSP_EVENTS BENCHMARKET_EVENTS 2>/dev/null || true
./target/release/payrail serve > /tmp/payrail-bench-market.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; python3 scripts/fuzz/drop_streams.py BENCHMARKET_PSP_EVENTS BENCHMARKET_EVENTS 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf $url/readyz >/dev/null && break; sleep 0.1; done
run() {
    ./target/release/payrail loadgen --url $url --connections 64 --duration "$secs" "$@" \
        --report target/loadgen-market.json 2>/dev/null > /dev/null
    python3 - <<'PY'
import json
r = json.load(open("target/loadgen-market.json"))
line = f"{r['payments_per_s']:.0f} payments/s, p99 {r['latency_ms']['p99']:.1f} ms, non-2xx {r['non_2xx']}"
if "postgres_ceiling_tps" in r:
    line += f"; PostgreSQL ceiling {r['postgres_ceiling_tps']:.0f} tps, payrail / ceiling = {r['ratio']:.2f}x"
print(line)
PY
}
echo "== plain, 1 merchant (+ the PostgreSQL ceiling first)"
run --compare-postgres
echo "== plain, 32 merchants"
run --merchants 32
echo "== 1 platform x $sellers sellers, 5 splits per payment"
run --splits 5 --sellers "$sellers"
echo "== ledger verify"
./target/release/payrail ledger verify | tail -2
