#!/usr/bin/env bash
# The cost of risk rules on the whole system: `payrail loadgen` (create+confirm, automatic
# capture, 64 connections) against a release build whose demo merchant has 50 rules, then the
# same with [risk] enabled = false, in the same run. Usage: scripts/bench/risk.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
cargo build --release --quiet
export PAYRAIL__SERVER__BIND=127.0.0.1:18081
export PAYRAIL__NATS__STREAM_PREFIX=BENCHRISK
export PAYRAIL__LOG__LEVEL=warn
API=http://127.0.0.1:18081
predicates=(
  ":amount: > 100000 and :card_country: != :ip_country:"
  ":card_bin: in @high_risk_bins"
  ":email_domain: in @disposable_domains"
  ":ip_attempts_1h: > 20 and :amount: <= 500"
  ":card_attempts_24h: > 1000000"
  "not (:currency: = 'USD' or :currency: = 'EUR') and :amount: > 50000"
  ":card_funding: = 'prepaid' and :amount: > 20000"
  ":ip: in @blocked_ips or :card_fingerprint: in @blocked_cards"
  ":email_cards_24h: > 3 and :card_is_prepaid:"
  ":amount: > 99999999"
)
run() {
  local label=$1 enabled=$2
  local db=payrail_bench_risk_$label
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" 2>/dev/null
  python3 scripts/fuzz/drop_streams.py BENCHRISK_PSP_EVENTS BENCHRISK_EVENTS 2>/dev/null || true
  PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db PAYRAIL__RISK__ENABLED=$enabled \
    ./target/release/payrail serve > /tmp/payrail-bench-risk.log 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do curl -sf $API/readyz >/dev/null && break; sleep 0.1; done
  for i in $(seq 0 49); do
    p=${predicates[$((i % 10))]}
    curl -sf $API/api/v1/risk/rules -H "Authorization: Bearer sk_test_demo" -H "Idempotency-Key: bench-rule-$i" \
      -d "{\"action\":\"review\",\"predicate\":\"$p\"}" >/dev/null
  done
  echo "== rules $label (50 rules of the demo merchant, [risk] enabled = $enabled)"
  PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db ./target/release/payrail loadgen --url $API \
    --connections 64 --duration "$secs" --report target/loadgen-risk-$label.json 2>/dev/null | tail -4
  kill $pid; wait $pid 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" 2>/dev/null
  python3 scripts/fuzz/drop_streams.py BENCHRISK_PSP_EVENTS BENCHRISK_EVENTS 2>/dev/null || true
}
run on true
run off false
