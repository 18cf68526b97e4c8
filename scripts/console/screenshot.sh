#!/usr/bin/env bash
# Checks the operator console (GET /admin/) in headless Chromium and keeps a screenshot in
# docs/console.png. Starts its own payrail (its own database, stream prefix and port), drives
# a little traffic (captures, refunds, a decline, a dispute, a blocked card tester, a dead
# letter), lets the console collect 30 s of history, then:
#   1. dumps the DOM after the page ran and checks that data arrived (data-ready="yes") and the
#      panels are there;
#   2. takes a 1400×900 screenshot.
# Installs Debian's chromium if it is missing. Usage: scripts/console/screenshot.sh [binary]
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-}
if [ -z "$bin" ]; then
    cargo build --bin payrail --quiet
    bin=target/debug/payrail
fi
command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stamp=$(date +%s)
db=payrail_console_$stamp
API=http://127.0.0.1:$port
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
export PAYRAIL__SERVER__BIND=127.0.0.1:$port
export PAYRAIL__NATS__STREAM_PREFIX=CONSOLE$stamp
export PAYRAIL__NATS__MAX_DELIVER=2
export PAYRAIL__PSP__SANDBOX__LATENCY_MS=40
export PAYRAIL__PSP__SANDBOX__DISPUTE_DELAY_MS=500
export PAYRAIL__LOG__LEVEL=warn
"$bin" --config config.toml serve > /tmp/payrail-console.log 2>&1 &
pid=$!
profile=$(mktemp -d)
cleanup() {
    kill $pid 2>/dev/null || true
    wait $pid 2>/dev/null || true
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true
    python3 scripts/fuzz/drop_streams.py CONSOLE${stamp}_PSP_EVENTS CONSOLE${stamp}_EVENTS || true
    rm -rf "$profile"
}
trap cleanup EXIT
for _ in $(seq 1 150); do curl -sf $API/readyz >/dev/null && break; sleep 0.2; done
curl -sf $API/readyz >/dev/null || { echo "payrail did not get ready"; tail -20 /tmp/payrail-console.log; exit 1; }
AUTH="Authorization: Bearer sk_test_demo"
pay() { curl -s -o /dev/null $API/api/v1/payments -H "$AUTH" -H "Idempotency-Key: $1" -d "$2"; }
traffic() {
    local round=$1 pids=()
    for i in $(seq 1 25); do
        pay "c$round-$i" '{"order_id":"o","amount":{"value":'$((1000 + i))',"currency":"USD"},"payment_method":"pm_card_visa","confirm":true}' &
        pids+=($!)
    done
    pay "d$round" '{"order_id":"o","amount":{"value":900,"currency":"USD"},"payment_method":"pm_card_chargeDeclined","confirm":true}'
    pay "x$round" '{"order_id":"o","amount":{"value":2500,"currency":"USD"},"payment_method":"pm_card_createDispute","confirm":true}'
    wait "${pids[@]}"
}
# The console must be open while things happen: it keeps its own history. A headless Chromium
# with its DevTools port holds the page in real time (scripts/console/cdp.py drives it).
devtools=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
chromium --headless --no-sandbox --disable-gpu --user-data-dir="$profile" --remote-debugging-port=$devtools \
    --remote-allow-origins='*' about:blank > /dev/null 2>&1 &
chrome=$!
trap 'kill $chrome 2>/dev/null || true; cleanup' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:$devtools/json/version >/dev/null && break; sleep 0.1; done
python3 scripts/console/cdp.py $devtools "$API/admin/#token=admin_test_token" 40 docs/console.png \
    'document.body.dataset.ready === "yes"' \
    'document.body.innerText.includes("Mailbox depth by actor kind")' \
    'document.getElementById("top").innerText.includes("pay_")' \
    'document.getElementById("dl").innerText.includes("evt_console_orphan")' \
    'document.getElementById("error").textContent === ""' &
shot=$!
# A PSP event for a payment that does not exist: parked as a dead letter after two deliveries.
body='{"id":"evt_console_orphan","object":"event","type":"payment_intent.succeeded","created":1,"data":{"object":{"id":"pi_nobody","object":"payment_intent","amount":100}}}'
sig=$(python3 -c "
import hmac, hashlib, sys, time
t = int(time.time()); b = sys.argv[1]
print(f't={t},v1=' + hmac.new(b'whsec_payrail_sandbox_secret', f'{t}.{b}'.encode(), hashlib.sha256).hexdigest())" "$body")
curl -s -o /dev/null $API/internal/webhooks/psp/sandbox -H "Stripe-Signature: $sig" -d "$body"
# Traffic while the console watches: captures, a decline, a dispute, and a card tester
# (distinct cards from one IP, blocked after the fifth).
for round in $(seq 1 10); do
    traffic $round
    for n in $(seq 1 3); do
        num=$(python3 -c "
b='400000%09d' % (700000 + $round * 10 + $n)
t=sum((int(c)*2-9 if int(c)*2>9 else int(c)*2) if i%2==0 else int(c) for i,c in enumerate(reversed(b)))
print(b + str((10 - t % 10) % 10))")
        pm=$(curl -s $API/sandbox/v1/payment_methods -H "$AUTH" -d "{\"card\":{\"number\":\"$num\",\"exp_month\":12,\"exp_year\":2031,\"cvc\":\"123\"}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        pay "t$round-$n" "{\"order_id\":\"t\",\"amount\":{\"value\":100,\"currency\":\"USD\"},\"payment_method\":\"$pm\",\"confirm\":true,\"customer\":{\"ip\":\"203.0.113.66\"}}"
    done
    sleep 2
done
if wait $shot; then
    echo "PASS: the console rendered its panels with data; screenshot in docs/console.png"
else
    echo "FAIL: see above; the screenshot of what it showed is in docs/console.png"
    exit 1
fi
