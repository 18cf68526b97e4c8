#!/usr/bin/env bash
# Checks the customer receipt page (GET /receipts/{token}) in headless Chromium and keeps a
# screenshot of it in docs/receipt.png.
#
# It starts a payrail of its own (a fresh database, stream prefix and port; loopback only),
# makes a payment with a tokenized test card and refunds part of it, asks for its receipt
# (GET /api/v1/payments/{id}/receipt), then opens the receipt URL WITHOUT any API key:
#   1. `chromium --dump-dom`: the page must show the merchant's name, the amounts, the card's
#      brand and last four, the refund, and no card number;
#   2. `chromium --screenshot` at a phone-like 480×720.
# Exits non-zero if a check fails. Cleans up (payrail, the database, the streams) on any exit.
#
# Usage: scripts/receipts/screenshot.sh
#   PAYRAIL_BIN=path   a payrail binary (default target/debug/payrail, built if missing)
#   SHOT=docs/receipt.png
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and NATS on 127.0.0.1:4222; installs
# Debian's chromium with apt-get if `chromium` is not on PATH.
set -euo pipefail
if [ -z "${PAYRAIL_RECEIPT_BOUNDED:-}" ]; then
    PAYRAIL_RECEIPT_BOUNDED=1 exec timeout --kill-after=15 "${RECEIPT_TIMEOUT:-1500}" "$0" "$@"
fi
cd "$(dirname "$0")/../.."
SHOT=${SHOT:-docs/receipt.png}
log() { printf '[receipt] %s\n' "$*" >&2; }

bin=${PAYRAIL_BIN:-target/debug/payrail}
if [ ! -x "$bin" ]; then
    log "building $bin"
    timeout 1200 cargo build --bin payrail --quiet
fi
if ! command -v chromium >/dev/null 2>&1; then
    log "installing chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
tag=$(date +%s)$$
db=payrail_receipt_$tag
prefix=RECEIPT$tag
port=$(free_port)
API=http://127.0.0.1:$port
work=$(mktemp -d)
payrail_pid=''
cleanup() {
    trap '' INT TERM
    set +e
    if [ -n "$payrail_pid" ]; then kill -TERM "$payrail_pid" 2>/dev/null; wait "$payrail_pid" 2>/dev/null; fi
    timeout 30 psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    timeout 15 python3 scripts/fuzz/drop_streams.py "${prefix}_PSP_EVENTS" "${prefix}_EVENTS" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db \
PAYRAIL__SERVER__BIND=127.0.0.1:$port \
PAYRAIL__NATS__STREAM_PREFIX=$prefix \
PAYRAIL__LOG__LEVEL=warn \
    "$bin" serve --config config.toml >"$work/payrail.log" 2>&1 &
payrail_pid=$!
for _ in $(seq 1 300); do
    curl -sf --max-time 2 "$API/readyz" >/dev/null 2>&1 && break
    kill -0 "$payrail_pid" 2>/dev/null || break
    sleep 0.2
done
curl -sf --max-time 2 "$API/readyz" >/dev/null || { log "payrail did not get ready"; tail -20 "$work/payrail.log" >&2; exit 1; }

AUTH="Authorization: Bearer sk_test_demo"
post() { curl -sf --max-time 10 "$API$1" -H "$AUTH" -H "Idempotency-Key: $2" -H 'Content-Type: application/json' -d "$3"; }
field() { python3 -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v = v[k]
print(v)' "$1"; }

pm=$(post /sandbox/v1/payment_methods receipt-pm '{"card":{"number":"5555555555554444","exp_month":12,"exp_year":2030,"cvc":"123"}}' | field id)
pay=$(post /api/v1/payments receipt-pay "{\"order_id\":\"ord_receipt\",\"amount\":{\"value\":12900,\"currency\":\"USD\"},\"payment_method\":\"$pm\",\"confirm\":true}" | field payment_id)
post "/api/v1/payments/$pay/refunds" receipt-refund '{"amount":{"value":2500,"currency":"USD"},"reason":"requested_by_customer"}' >/dev/null
url=$(curl -sf --max-time 10 "$API/api/v1/payments/$pay/receipt" -H "$AUTH" | field receipt_url)
log "receipt of $pay at $url (no API key from here on)"

CHROME_FLAGS=(--headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --no-default-browser-check
    --disable-background-networking --disable-component-update --disable-sync --disable-default-apps
    --disable-extensions --disable-domain-reliability --metrics-recording-only --disable-crash-reporter
    --disable-breakpad)
timeout 90 chromium "${CHROME_FLAGS[@]}" --user-data-dir="$work/p1" --dump-dom "$url" >"$work/dom.html" 2>"$work/c1.log" || true
status=0
for marker in 'Receipt from Demo Marketplace' 'USD 129.00' 'USD 104.00' 'mastercard •••• 4444' '−USD 25.00' "$pay"; do
    if grep -qF -- "$marker" "$work/dom.html"; then log "ok   page shows: $marker"; else log "FAIL page lacks: $marker"; status=1; fi
done
if grep -qE '[0-9]{13,19}' "$work/dom.html"; then log "FAIL page holds a card-number-like run of digits"; status=1; fi
timeout 90 chromium "${CHROME_FLAGS[@]}" --user-data-dir="$work/p2" --window-size=480,720 \
    --screenshot="$work/shot.png" "$url" >/dev/null 2>"$work/c2.log" || true
if [ -s "$work/shot.png" ]; then cp "$work/shot.png" "$SHOT"; else log "FAIL no screenshot"; status=1; fi
[ $status -eq 0 ] && log "PASS: the receipt renders; screenshot in $SHOT"
exit $status
