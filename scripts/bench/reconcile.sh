#!/usr/bin/env bash
# Reconciles a large Stripe-format settlement report and reports rows/s and payrail's peak RSS.
#   1. A release payrail on a fresh database (its own port and stream prefix).
#   2. N captured sandbox payments of the demo merchant, written in SQL (generate_series), and
#      the PSP's report of them: N charge lines with fees, each naming its intent, written by
#      COPY to a CSV file.
#   3. `payrail reconcile --connector … --file …` (the file streamed to the server), timed; the
#      server's VmHWM (peak resident memory since it started) read from /proc after the run.
#   4. Checks: every line matched, every payment settled, `payrail ledger verify` clean.
# The seeded payments have no capture journals: the run's missing_in_report scan has nothing to
# find, and the fee journals it posts are its own. Settling goes through the ledger shards as in
# production (no live actors: the fenced standalone commit).
# Usage: scripts/bench/reconcile.sh [lines]   (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/../.."
lines=${1:-1000000}
port=18090
db=payrail_bench_recon
prefix=BENCHRECON
work=$(mktemp -d)
cargo build --release --quiet --bin payrail
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
export PAYRAIL__SERVER__BIND=127.0.0.1:$port
export PAYRAIL__NATS__STREAM_PREFIX=$prefix
export PAYRAIL__LOG__LEVEL=${PAYRAIL__LOG__LEVEL:-warn}
export PAYRAIL__RECONCILIATION__DAILY_AT_UTC=""
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null
./target/release/payrail serve > "$work/payrail.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true; python3 scripts/fuzz/drop_streams.py ${prefix}_PSP_EVENTS ${prefix}_EVENTS 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { tail "$work/payrail.log"; exit 1; }
q() { psql -h 127.0.0.1 -U postgres -d "$db" -Atqc "$1"; }

merchant=$(q "SELECT m.id FROM merchants m JOIN api_keys k ON k.merchant_id = m.id LIMIT 1")
connector=$(q "SELECT id FROM connectors WHERE merchant_id = '$merchant'")
echo "== seeding $lines captured payments"
t0=$(date +%s.%N)
q "INSERT INTO payments (id, merchant_id, order_id, status, amount, currency, amount_capturable, amount_captured,
       capture_strategy, payment_method, psp, psp_reference, fee_bps, fee_fixed, version, transitions, created_at, updated_at)
   SELECT 'pay_bench' || lpad(g::text, 8, '0'), '$merchant', 'ord_' || g, 'captured', 1000 + g % 9000, 'USD', 0,
          1000 + g % 9000, 'automatic', 'pm_card_visa', 'sandbox', 'pi_bench' || g, 290, 30, 2, 2, now(), now()
   FROM generate_series(1, $lines) g" >/dev/null
q "ANALYZE payments" >/dev/null
report=$work/report.csv
# Fees as the sandbox charges them: 2.5 % rounded half up, plus 0.25.
psql -h 127.0.0.1 -U postgres -d "$db" -qc "\\copy (
   SELECT 'txn_' || lpad(to_hex(g), 16, '0'), 'charge', 'pi_bench' || g,
          to_char((1000 + g % 9000) / 100.0, 'FM999999990.00'),
          to_char(((1000 + g % 9000) * 250 + 5000) / 10000 / 100.0 + 0.25, 'FM999999990.00'),
          to_char(((1000 + g % 9000) - ((1000 + g % 9000) * 250 + 5000) / 10000 - 25) / 100.0, 'FM999999990.00'),
          'usd', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), '', 'charge'
   FROM generate_series(1, $lines) g) TO '$report' WITH (FORMAT csv, HEADER false)"
sed -i '1i id,type,source,amount,fee,net,currency,created,available_on,reporting_category' "$report"
printf 'seeded in %.1f s; report %s lines, %s MiB\n' "$(echo "$(date +%s.%N) - $t0" | bc)" \
    "$(($(wc -l < "$report") - 1))" "$(($(stat -c %s "$report") / 1048576))"
rss_before=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)

echo "== payrail reconcile --connector $connector --file report.csv"
# CPU time over the run, in clock ticks: the whole machine (busy), payrail, nats-server; the rest
# is PostgreSQL's, less whatever else the machine runs.
cpu() {
    python3 - "$pid" <<'PY'
import os, sys
def ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
v = list(map(int, open("/proc/stat").readline().split()[1:]))
nats = [p for p in os.listdir("/proc") if p.isdigit() and open(f"/proc/{p}/comm").read().strip() == "nats-server"]
print(sum(v) - v[3] - v[4], ticks(sys.argv[1]), sum(ticks(p) for p in nats))
PY
}
cpu0=$(cpu)
t0=$(date +%s.%N)
./target/release/payrail reconcile --connector "$connector" --file "$report" --url "http://127.0.0.1:$port" > "$work/run.json"
secs=$(echo "$(date +%s.%N) - $t0" | bc)
cpu1=$(cpu)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
read -r b0 p0 n0 <<< "$cpu0"; read -r b1 p1 n1 <<< "$cpu1"
hz=$(getconf CLK_TCK)
echo "CPU seconds over the run: machine $(((b1 - b0) / hz)) of $(awk -v n="$(nproc)" -v s="$secs" 'BEGIN { printf "%d", n * s + 0.5 }'); payrail $(((p1 - p0) / hz)), nats-server $(((n1 - n0) / hz)), the rest (PostgreSQL) $(((b1 - b0 - p1 + p0 - n1 + n0) / hz))"
python3 - "$work/run.json" "$secs" "$lines" "$rss_before" "$hwm" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
secs, lines, before, hwm = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(f"run {run['id']}: status {run['status']}, lines {run['lines']}, matched {run['matched']}, exceptions {run['exceptions']}")
print(f"{lines} lines in {secs:.1f} s = {lines / secs:,.0f} lines/s")
print(f"payrail RSS before the run {before / 1024:.0f} MiB; peak (VmHWM) {hwm / 1024:.0f} MiB")
ok = run["status"] == "succeeded" and run["matched"] == lines and run["exceptions"] == 0
sys.exit(0 if ok else 1)
PY
settled=$(q "SELECT count(*) FROM payments WHERE status = 'settled'")
echo "payments settled: $settled of $lines"
[ "$settled" -eq "$lines" ]
[ -n "${SHOW_LOG:-}" ] && grep -E "reconciliation chunk|report staged" "$work/payrail.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -${SHOW_LOG}
echo "== ledger verify"
./target/release/payrail ledger verify | tail -2
