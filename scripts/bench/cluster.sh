#!/usr/bin/env bash
# Three payrail nodes against one, on this machine, and what forwarding a call costs.
#   1. One node (single mode, the machine's nats-server): `payrail loadgen --compare-postgres`
#      (the PostgreSQL ceiling and payrail, 64 connections), then wrk -c 63.
#   2. scripts/cluster/up.sh (three nats-servers, R3 streams, three nodes): one wrk -c 21 per
#      node at once; their sum. The nodes share the machine's two cores with PostgreSQL and the
#      three nats-servers: this shows what clustering costs, not how it scales.
#   3. scripts/bench/forwarding.py: confirm latency served locally vs forwarded to the owner.
#   4. `payrail ledger verify` on each run's database.
# Usage: scripts/bench/cluster.sh [seconds]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release --quiet
bin=target/release/payrail
export PAYRAIL__LOG__LEVEL=warn
one_db=payrail_bench_one
three_db=payrail_bench_three
for db in $one_db $three_db; do psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; done
python3 scripts/fuzz/drop_streams.py BENCHONE_PSP_EVENTS BENCHONE_EVENTS 2>/dev/null || true
wrk_rps() { grep -E "Requests/sec" | awk '{ print $2 }'; }

echo "== one node: payrail loadgen --compare-postgres --connections 64 --duration $secs"
PAYRAIL__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$one_db" PAYRAIL__SERVER__BIND=127.0.0.1:18090 \
    PAYRAIL__NATS__STREAM_PREFIX=BENCHONE $bin serve >/tmp/payrail-bench-one.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; PAYRAIL_CLUSTER_DIR=target/cluster-bench scripts/cluster/down.sh >/dev/null' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18090/readyz >/dev/null && break; sleep 0.1; done
$bin loadgen --url http://127.0.0.1:18090 --compare-postgres --connections 64 --duration "$secs" 2>/dev/null
echo "== one node: wrk -c 63 -t 2 -d ${secs}s"
one=$(wrk -c 63 -t 2 -d "${secs}s" --timeout 10s -s scripts/bench/create_confirm.lua http://127.0.0.1:18090 -- one | wrk_rps)
echo "one node: $one payments/s"
kill $pid; wait $pid 2>/dev/null || true
PAYRAIL__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$one_db" $bin ledger verify | tail -1

echo "== three nodes: scripts/cluster/up.sh, then wrk -c 21 -t 1 -d ${secs}s on each at once"
urls=$(PAYRAIL_CLUSTER_DIR=target/cluster-bench PAYRAIL_BINARY=$bin PAYRAIL_CLUSTER_NATS_PORT=14301 \
    PAYRAIL_CLUSTER_HTTP_PORT=18181 PAYRAIL__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$three_db" \
    scripts/cluster/up.sh | awk '{ print $1 }')
n=0
for url in $urls; do
    n=$((n + 1))
    wrk -c 21 -t 1 -d "${secs}s" --timeout 10s -s scripts/bench/create_confirm.lua "$url" -- "node$n" \
        >"target/cluster-bench/wrk-$n.txt" &
done
wait $(jobs -p | grep -v "^$pid$") 2>/dev/null || true
total=0
for i in $(seq 1 $n); do
    rps=$(wrk_rps <"target/cluster-bench/wrk-$i.txt")
    grep -E "non-2xx" "target/cluster-bench/wrk-$i.txt" || true
    echo "node $i: $rps payments/s"
    total=$(python3 -c "print(round($total + $rps, 1))")
done
echo "three nodes: $total payments/s (one node: $one; ratio $(python3 -c "print(round($total / $one, 2))"))"

echo "== forwarding: confirm served by the owner vs forwarded to it"
set -- $urls
python3 scripts/bench/forwarding.py "$1" "$2" 400
PAYRAIL_CLUSTER_DIR=target/cluster-bench scripts/cluster/down.sh >/dev/null
PAYRAIL__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$three_db" $bin ledger verify | tail -1
