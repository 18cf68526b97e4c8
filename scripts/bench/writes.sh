#!/usr/bin/env bash
# What PostgreSQL writes per payment, a figure this machine's speed does not move: create+confirm
# with automatic capture (64 connections, the default setup: sandbox webhooks, outbox relay)
# against a release build, then rows inserted, updated (HOT or not) and deleted per payment by
# table, and WAL records and bytes per payment by kind (pg_waldump over the middle of the run,
# when the load is steady). docs/BENCHMARKS.md reports it beside each throughput step.
# Usage: scripts/bench/writes.sh [seconds]   (default 10; run as root or postgres, to read pg_wal)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
db=payrail_writes
port=18096
pgbin=/usr/lib/postgresql/$(ls /etc/postgresql | sort -n | tail -1)/bin
wal=$(psql -h 127.0.0.1 -U postgres -Atc "SHOW data_directory")/pg_wal
cargo build --release --quiet --bin payrail
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
export PAYRAIL__SERVER__BIND=127.0.0.1:$port
export PAYRAIL__NATS__STREAM_PREFIX=WRITES
export PAYRAIL__LOG__LEVEL=warn
work=$(mktemp -d)
q() { psql -h 127.0.0.1 -U postgres -d "$db" -Atc "$1"; }
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
python3 scripts/fuzz/drop_streams.py WRITES_PSP_EVENTS WRITES_EVENTS 2>/dev/null || true
./target/release/payrail serve > "$work/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true; python3 scripts/fuzz/drop_streams.py WRITES_PSP_EVENTS WRITES_EVENTS 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do curl -sf --max-time 2 "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
curl -sf --max-time 2 "http://127.0.0.1:$port/readyz" >/dev/null || { echo "payrail did not become ready" >&2; cat "$work/serve.log" >&2; exit 1; }

./target/release/payrail loadgen --url "http://127.0.0.1:$port" --connections 64 --duration "$secs" \
    > "$work/load.txt" 2>/dev/null &
load=$!
# The window: from a quarter of the run to three quarters, payments counted at both ends.
sleep "$(awk -v s="$secs" "BEGIN { print s / 4 }")"
lsn0=$(q "SELECT pg_current_wal_lsn()"); n0=$(q "SELECT count(*) FROM payments")
sleep "$(awk -v s="$secs" "BEGIN { print s / 2 }")"
lsn1=$(q "SELECT pg_current_wal_lsn()"); n1=$(q "SELECT count(*) FROM payments")
wait $load
grep -E "^payments" "$work/load.txt"
# Let the last events land, so that every payment has had its three commits.
for _ in $(seq 1 100); do
    [ "$(q "SELECT count(*) FROM payments") " = "$(q "SELECT count(*) FROM processed_events") " ] && break
    sleep 0.1
done
total=$(q "SELECT count(*) FROM payments")
# Sessions report their row counts to pg_stat_user_tables within a second or so of idling.
for _ in $(seq 1 100); do
    [ "$(q "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'payments'")" = "$total" ] && break
    sleep 0.1
done
echo "== rows per payment, whole run ($total payments)"
q "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables
   WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 ORDER BY n_tup_ins + n_tup_upd + n_tup_del DESC" |
    awk -F'|' -v n="$total" 'BEGIN { printf "%-26s %9s %9s %9s %9s\n", "table", "inserted", "updated", "(HOT)", "deleted" }
        $2 + $3 + $5 >= n / 100 { printf "%-26s %9.2f %9.2f %9.2f %9.2f\n", $1, $2 / n, $3 / n, $4 / n, $5 / n }'
q "SELECT pg_relation_filenode(oid), relname FROM pg_class WHERE pg_relation_filenode(oid) IS NOT NULL" > "$work/nodes"
"$pgbin/pg_waldump" -p "$wal" -s "$lsn0" -e "$lsn1" > "$work/wal" 2> "$work/waldump.err" || { echo "pg_waldump:" >&2; head -3 "$work/waldump.err" >&2; }
python3 - "$work/wal" "$work/nodes" "$((n1 - n0))" <<'PY'
import collections, re, sys
wal, nodes, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = dict(l.rstrip("\n").split("|", 1) for l in open(nodes) if "|" in l)
count, size, by_kind, by_rel = 0, 0, collections.Counter(), collections.Counter()
locks = collections.Counter()
for line in open(wal):
    m = re.search(r"rmgr: (\w+)\s+len \(rec/tot\):\s+\d+/\s*(\d+).*?desc: (\w+)", line)
    if not m:
        continue
    count += 1
    size += int(m.group(2))
    by_kind[f"{m.group(1)} {m.group(3)}"] += 1
    r = re.search(r"rel \d+/\d+/(\d+)", line)
    rel = names.get(r.group(1), r.group(1)) if r else "-"
    by_rel[rel] += 1
    if m.group(1) == "Heap" and m.group(3) == "LOCK":
        locks[rel] += 1
if n <= 0 or count == 0:
    sys.exit("no payments or no WAL in the window")
print(f"== WAL per payment, {n} payments in the middle half: {count / n:.1f} records, {size / n:,.0f} bytes")
for k, c in by_kind.most_common(10):
    print(f"  {k:<28} {c / n:6.2f}")
print("  records by relation:")
for k, c in by_rel.most_common(24):
    print(f"  {k:<44} {c / n:6.2f}")
# A row lock (FOR SHARE, ON CONFLICT DO UPDATE, or an update moving a row to another page).
print("  Heap LOCK records by relation:")
for k, c in locks.most_common(6):
    print(f"  {k:<44} {c / n:6.2f}")
PY
