#!/usr/bin/env bash
# The performance regression guard `.ci/run` runs (issue 16): a short create+confirm load
# (automatic capture, 64 connections, the default setup with sandbox webhooks and the outbox
# relay), beside docs/DESIGN.md's PostgreSQL ceiling measured in the same run. It fails when
# payrail / ceiling falls below the floor: a ratio, never an absolute time, because this
# machine's speed drifts from day to day. The floor is docs/BENCHMARKS.md's figure less a wide
# noise margin, so that it catches a step backwards, not the machine's weather.
#
# By default it loads the debug build `.ci/run` has just made (floor 0.12x: it read
# 0.204x-0.236x on a slow machine of this kind on 2026-11-30), so that CI builds nothing more:
# an optimized build from scratch took 8-10 minutes there, a third of CI's time.
# `GUARD_PROFILE=guard` loads Cargo.toml's `guard` profile instead (release without fat LTO;
# floor 0.25x: it read 0.327x-0.46x in every run since 2026-11-29).
# Usage: [GUARD_PROFILE=dev|guard] scripts/bench/guard.sh [seconds] [floor]   (defaults: 5, by profile)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-5}
command -v pgbench >/dev/null || { echo "pgbench is missing (postgresql-client)" >&2; exit 1; }
case "${GUARD_PROFILE:-dev}" in
    dev)
        cargo build --quiet --bin payrail
        bin=./target/debug/payrail
        default_floor=0.12
        ;;
    guard)
        cargo build --profile guard --quiet --bin payrail
        bin=./target/guard/payrail
        default_floor=0.25
        ;;
    *) echo "GUARD_PROFILE is dev or guard" >&2; exit 2 ;;
esac
floor=${2:-${PAYRAIL_PERF_FLOOR:-$default_floor}}
db=payrail_guard
port=18095
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
export PAYRAIL__SERVER__BIND=127.0.0.1:$port
export PAYRAIL__NATS__STREAM_PREFIX=GUARD
export PAYRAIL__LOG__LEVEL=warn
export PAYRAIL__RECONCILIATION__DAILY_AT_UTC=""
report=$(mktemp)
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null
python3 scripts/fuzz/drop_streams.py GUARD_PSP_EVENTS GUARD_EVENTS 2>/dev/null || true
$bin serve > "$report.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true; python3 scripts/fuzz/drop_streams.py GUARD_PSP_EVENTS GUARD_EVENTS 2>/dev/null || true; rm -f "$report" "$report.log"' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { tail "$report.log"; exit 1; }
$bin loadgen --url "http://127.0.0.1:$port" --compare-postgres --connections 64 \
    --duration "$secs" --report "$report" > /dev/null 2>&1
$bin ledger verify | tail -1
python3 - "$report" "$floor" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
floor = float(sys.argv[2])
ratio, non2xx = r["ratio"], r["non_2xx"]
print(f"performance guard: {r['payments_per_s']:.0f} payments/s, ceiling {r['postgres_ceiling_tps']:.0f} tps, "
      f"ratio {ratio:.3f}x (floor {floor}x), p99 {r['latency_ms']['p99']:.1f} ms, non-2xx {non2xx}")
if non2xx or ratio < floor:
    print("performance guard: FAILED", file=sys.stderr)
    sys.exit(1)
PY
