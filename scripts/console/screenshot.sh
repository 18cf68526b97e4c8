#!/usr/bin/env bash
# Checks the operator console (GET /admin/, src/api/admin.html) in headless Chromium and keeps a
# 1400×900 screenshot of it in docs/console.png.
#
# It starts a payrail of its own (a fresh database, stream prefix and port; loopback only), then
#   1. opens the console in a headless Chromium held in real time (a few lines of DevTools
#      protocol below), so the page keeps its own history while curl drives traffic: captures,
#      partial captures, refunds, declines, risk blocks and reviews, disputes, PSP errors (an
#      unknown payment method) and three dead letters (signed PSP events for payments that do
#      not exist); after RUN_SECONDS it checks in the page that every panel has data, and
#      screenshots it;
#   2. loads the page once more in a one-shot `chromium --headless --dump-dom
#      --virtual-time-budget=8000` and greps the DOM for data-ready="yes" and the panel titles.
# Exits non-zero if either check fails. Cleans up (payrail, Chromium, the database, the streams)
# on any exit, and bounds its own time.
#
# Usage: scripts/console/screenshot.sh
#   PAYRAIL_BIN=path   a payrail binary (default target/debug/payrail, rebuilt if missing or older
#                      than src/api/admin.html, which is compiled in)
#   RUN_SECONDS=70     how long the console watches the traffic before the screenshot
#   SHOT=docs/console.png   where the screenshot goes (relative to the repository root)
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and NATS on 127.0.0.1:4222, as the drills do;
# installs Debian's chromium with apt-get if `chromium` is not on PATH.
set -euo pipefail
if [ -z "${PAYRAIL_CONSOLE_BOUNDED:-}" ]; then
    # The whole run, a build waiting for cargo's lock included, is bounded.
    PAYRAIL_CONSOLE_BOUNDED=1 exec timeout --kill-after=15 "${CONSOLE_TIMEOUT:-1800}" "$0" "$@"
fi
cd "$(dirname "$0")/../.."
RUN_SECONDS=${RUN_SECONDS:-70}
SHOT=${SHOT:-docs/console.png}
TOKEN=admin_test_token          # config.toml's [admin] token: a local test value, not a secret

log() { printf '[console] %s\n' "$*" >&2; }

bin=${PAYRAIL_BIN:-}
if [ -z "$bin" ]; then
    bin=target/debug/payrail
    if [ ! -x "$bin" ] || [ src/api/admin.html -nt "$bin" ]; then
        log "building $bin (the page is compiled into it; cargo may wait for another build's lock)"
        timeout 1200 cargo build --bin payrail --quiet
    fi
fi
if ! command -v chromium >/dev/null 2>&1; then
    log "installing chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
tag=$(date +%s)$$
db=payrail_console_$tag
prefix=CONSOLE$tag
port=$(free_port)
API=http://127.0.0.1:$port
work=$(mktemp -d)
payrail_pid='' chrome_pid='' cdp_pid='' receiver_pid=''

stop() {   # stop PID [seconds]: TERM, then KILL if it is still there
    local pid=$1 n=$((${2:-10} * 10))
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ $n -gt 0 ]; do sleep 0.1; n=$((n - 1)); done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    # `timeout` passes a signal to this script and then to its whole process group: a second
    # TERM must not cut the cleanup short.
    trap '' INT TERM
    set +e
    [ -n "$cdp_pid" ] && stop "$cdp_pid" 2
    # Chromium runs in a process group of its own (setsid): its renderers go with it.
    if [ -n "$chrome_pid" ]; then
        kill -TERM -- "-$chrome_pid" 2>/dev/null
        sleep 0.5
        kill -KILL -- "-$chrome_pid" 2>/dev/null
        wait "$chrome_pid" 2>/dev/null
    fi
    [ -n "$payrail_pid" ] && stop "$payrail_pid" 10
    [ -n "$receiver_pid" ] && stop "$receiver_pid" 2
    timeout 30 psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    timeout 15 python3 scripts/fuzz/drop_streams.py "${prefix}_PSP_EVENTS" "${prefix}_EVENTS" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- payrail -----------------------------------------------------------------------------------
log "starting payrail on 127.0.0.1:$port (database $db, streams ${prefix}_*)"
PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db \
PAYRAIL__SERVER__BIND=127.0.0.1:$port \
PAYRAIL__NATS__STREAM_PREFIX=$prefix \
PAYRAIL__PSP__SANDBOX__LATENCY_MS=25 \
PAYRAIL__PSP__SANDBOX__REFUND_DELAY_MS=1500 \
PAYRAIL__PSP__SANDBOX__DISPUTE_DELAY_MS=1500 \
PAYRAIL__LOG__LEVEL=warn \
    "$bin" serve --config config.toml >"$work/payrail.log" 2>&1 &
payrail_pid=$!
for _ in $(seq 1 300); do
    curl -sf --max-time 2 "$API/readyz" >/dev/null 2>&1 && break
    kill -0 "$payrail_pid" 2>/dev/null || break
    sleep 0.2
done
if ! curl -sf --max-time 2 "$API/readyz" >/dev/null 2>&1; then
    log "payrail did not get ready:"; tail -20 "$work/payrail.log" >&2; exit 1
fi

# ---- traffic (sk_test_demo, the sandbox's demo merchant) ----------------------------------------
AUTH="Authorization: Bearer sk_test_demo"
post() {   # post PATH IDEMPOTENCY_KEY BODY → the response body on stdout
    curl -s --max-time 10 "$API$1" -H "$AUTH" -H "Idempotency-Key: $2" -H 'Content-Type: application/json' -d "$3" || true
}
pay() {    # pay KEY AMOUNT PAYMENT_METHOD [capture_strategy] → the response body
    post /api/v1/payments "$1" "{\"order_id\":\"ord_$1\",\"amount\":{\"value\":$2,\"currency\":\"USD\"},\"payment_method\":\"$3\",\"capture_strategy\":\"${4:-automatic}\",\"confirm\":true}"
}
field() { python3 -c 'import json,sys
try: print(json.load(sys.stdin).get(sys.argv[1]) or "")
except Exception: print("")' "$1"; }

round() {  # round N LOAD: LOAD card payments at once, plus one of each other kind of traffic
    local n=$1 load=$2 i pids=()
    for i in $(seq 1 "$load"); do pay "r$n-$i" $((1000 + RANDOM % 9000)) pm_card_visa >/dev/null & pids+=($!); done
    # Authorize, capture part of it, refund part of that, then the rest.
    ( p=$(pay "m$n" 4999 pm_card_visa manual | field payment_id)
      if [ -n "$p" ]; then
          post "/api/v1/payments/$p/capture" "cap$n" '{"amount":{"value":3000,"currency":"USD"}}' >/dev/null
          post "/api/v1/payments/$p/refunds" "ref$n-a" '{"amount":{"value":1000,"currency":"USD"},"reason":"customer_request"}' >/dev/null
          post "/api/v1/payments/$p/refunds" "ref$n-b" '{}' >/dev/null
      fi ) & pids+=($!)
    pay "d$n" 900 pm_card_chargeDeclined >/dev/null & pids+=($!)
    [ $((n % 2)) -eq 0 ] && { pay "x$n" 2500 pm_card_createDispute >/dev/null & pids+=($!); }
    [ $((n % 3)) -eq 0 ] && { pay "f$n" 3100 pm_card_riskLevelHighest >/dev/null & pids+=($!); }
    # Caught by the risk rules created below: blocked before the PSP, or held for review.
    [ $((n % 2)) -eq 1 ] && { pay "b$n" 995000 pm_card_visa >/dev/null & pids+=($!); }
    [ $((n % 5)) -eq 2 ] && { pay "v$n" 600000 pm_card_visa >/dev/null & pids+=($!); }
    # A payment method the PSP does not know: refused by the PSP, counted as a PSP error.
    [ $((n % 4)) -eq 1 ] && { pay "u$n" 1200 pm_console_unknown >/dev/null & pids+=($!); }
    wait "${pids[@]}" 2>/dev/null || true
}

# Two risk rules of the merchant's: block very large amounts, review large ones.
post /api/v1/risk/rules console-rule-block '{"action":"block","predicate":":amount: >= 990000"}' >/dev/null
post /api/v1/risk/rules console-rule-review '{"action":"review","predicate":":amount: >= 500000 and :amount: < 990000"}' >/dev/null

# ---- the console, held open in real time --------------------------------------------------------
cat >"$work/cdp.py" <<'PY'
"""Opens a URL in a running headless Chromium (DevTools protocol over a WebSocket, standard
library only), lets it run SECONDS in real time, then evaluates CHECKS and saves a screenshot.
Usage: cdp.py DEVTOOLS_PORT URL SECONDS PNG CHECKS_JSON   (CHECKS: {name: expression})"""
import base64, http.client, json, os, socket, struct, sys, time

class Page:
    def __init__(self, ws_url):
        hostport, path = ws_url.split("://", 1)[1].split("/", 1)
        host, port = hostport.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.s.recv(1)
            if not chunk:
                raise RuntimeError("DevTools closed the connection")
            head += chunk
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(head.decode(errors="replace"))
        self.n = 0

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("DevTools closed the connection")
            buf += chunk
        return buf

    def call(self, method, **params):
        self.n += 1
        data, mask = json.dumps({"id": self.n, "method": method, "params": params}).encode(), os.urandom(4)
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            message = b""
            while True:
                b0, b1 = self._exact(2)
                size = b1 & 0x7F
                if size == 126:
                    size = struct.unpack(">H", self._exact(2))[0]
                elif size == 127:
                    size = struct.unpack(">Q", self._exact(8))[0]
                message += self._exact(size)
                if b0 & 0x80:
                    break
            m = json.loads(message)
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(m["error"])
                return m.get("result", {})

def main():
    port, url, seconds, png, checks = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
    conn.request("GET", "/json/list")
    target = next(t for t in json.loads(conn.getresponse().read()) if t.get("type") == "page")
    page = Page(target["webSocketDebuggerUrl"])
    page.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
    page.call("Page.enable")
    page.call("Page.navigate", url=url)
    time.sleep(seconds)
    failed = []
    for name, expr in checks.items():
        r = page.call("Runtime.evaluate", expression=expr, returnByValue=True).get("result", {})
        ok = r.get("value") is True
        print(f"[console] {'ok  ' if ok else 'FAIL'} {name}", file=sys.stderr)
        if not ok:
            failed.append(name)
    shot = page.call("Page.captureScreenshot", format="png")
    with open(png, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    status = page.call("Runtime.evaluate", expression="document.getElementById('stamp').textContent + ' | ' + "
                       "document.getElementById('error').textContent", returnByValue=True)
    print("[console] page says: " + str(status.get("result", {}).get("value")), file=sys.stderr)
    sys.exit(1 if failed else 0)

main()
PY

CHROME_FLAGS=(--headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900
    --no-first-run --no-default-browser-check --disable-background-networking --disable-component-update
    --disable-sync --disable-default-apps --disable-extensions --disable-domain-reliability --metrics-recording-only
    --disable-crash-reporter --disable-breakpad)
devtools=$(free_port)
setsid chromium "${CHROME_FLAGS[@]}" --user-data-dir="$work/profile" --remote-debugging-address=127.0.0.1 \
    --remote-debugging-port="$devtools" about:blank >"$work/chromium.log" 2>&1 &
chrome_pid=$!
for _ in $(seq 1 100); do curl -sf --max-time 1 "http://127.0.0.1:$devtools/json/version" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf --max-time 1 "http://127.0.0.1:$devtools/json/version" >/dev/null || { log "chromium did not start:"; tail -20 "$work/chromium.log" >&2; exit 1; }

# What must be true in the page once it watched the traffic (each a JavaScript expression).
CHECKS=$(cat <<'JSON'
{
  "data arrived (body data-ready=yes)": "document.body.dataset.ready === 'yes'",
  "at least 20 samples of history": "Number(document.body.dataset.samples) >= 20",
  "no error shown": "document.getElementById('error').textContent === ''",
  "every panel has its title": "['Mailbox depth by actor kind','Live actors by kind','Webhooks delivered','JetStream lag','PSP latency','PSP errors','Ledger commit latency','Ledger batch sizes','Dead letters','Busiest actors'].every(t => document.body.innerText.includes(t))",
  "PSP latency per operation": "/authorize\\s+[0-9.]+ ms/.test(document.getElementById('l-psp').innerText)",
  "PSP errors by code": "document.getElementById('l-psperr').innerText.includes('invalid request')",
  "ledger batches counted": "/since start: [1-9]/.test(document.getElementById('l-batch').innerText)",
  "busiest payment actors listed": "document.querySelectorAll('#top td.id').length >= 5",
  "the dead letter is listed": "document.getElementById('dl').innerText.includes('evt_console_orphan')",
  "dead letters counted": "Number(document.getElementById('dl-count').textContent) >= 1",
  "webhooks delivered and a retry queue": "/retrying [1-9]/.test(document.getElementById('ts-wh').innerText) && document.getElementById('t-wh').innerText !== '0/s'",
  "every tile has a figure": "[...document.querySelectorAll('.tile .v')].every(e => e.textContent.trim() !== '–')",
  "token taken out of the address bar": "location.hash === ''",
  "no card-number-like digits on the page": "!/\\b\\d{13,19}\\b/.test(document.body.innerText)"
}
JSON
)
log "console open for ${RUN_SECONDS}s while traffic runs"
python3 "$work/cdp.py" "$devtools" "$API/admin/#token=$TOKEN" "$RUN_SECONDS" "$SHOT" "$CHECKS" &
cdp_pid=$!

# PSP events for payments nobody has (as a PSP would send after a lost create): retried with
# backoff, then parked as dead letters, replayable.
orphan() {   # orphan N TYPE OBJECT_JSON
    local body="{\"id\":\"evt_console_orphan_$1\",\"object\":\"event\",\"type\":\"$2\",\"created\":$(date +%s),\"data\":{\"object\":$3}}" sig
    sig=$(python3 -c 'import hmac, hashlib, sys, time
t = int(time.time())
print(f"t={t},v1=" + hmac.new(b"whsec_payrail_sandbox_secret", f"{t}.{sys.argv[1]}".encode(), hashlib.sha256).hexdigest())' "$body")
    curl -s --max-time 10 -o /dev/null "$API/internal/webhooks/psp/sandbox" -H "Stripe-Signature: $sig" \
        -H 'Content-Type: application/json' -d "$body" || true
}

# Merchant webhooks: one endpoint that answers (a small receiver of this script's) and one that
# refuses connections (port 9, discard), so the console shows deliveries and a retry queue.
python3 -c 'import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()' > "$work/receiver.port" &
receiver_pid=$!
for _ in $(seq 1 50); do [ -s "$work/receiver.port" ] && break; sleep 0.1; done
post /api/v1/webhook_endpoints console-hook-ok "{\"url\":\"http://127.0.0.1:$(cat "$work/receiver.port")/hooks\"}" >/dev/null
post /api/v1/webhook_endpoints console-hook-down '{"url":"http://127.0.0.1:9/hooks","enabled_events":["payment.captured"]}' >/dev/null

# Traffic that rises to a peak and falls back to a trickle, so the charts have a shape, until
# the screenshot is taken.
start=$SECONDS n=0
while kill -0 "$cdp_pid" 2>/dev/null; do
    n=$((n + 1)) elapsed=$((SECONDS - start)) half=$((RUN_SECONDS / 2))
    load=$((6 + 34 * (elapsed < half ? elapsed : (elapsed < 2 * half ? 2 * half - elapsed : 0)) / half))
    case $n in
        3) orphan 1 payment_intent.succeeded '{"id":"pi_console_lost_1","object":"payment_intent","amount":4200}' ;;
        9) orphan 2 charge.refunded '{"id":"ch_console_lost_2","object":"charge","payment_intent":"pi_console_lost_2","amount_refunded":1500}' ;;
        15) orphan 3 charge.dispute.created '{"id":"dp_console_lost_3","object":"dispute","payment_intent":"pi_console_lost_3","amount":2500,"reason":"fraudulent"}' ;;
    esac
    round "$n" "$load"
    sleep 1
done
log "traffic done ($n rounds); waiting for the screenshot"

status=0
wait "$cdp_pid" || status=1
cdp_pid=''
[ -s "$SHOT" ] || { log "no screenshot was written"; status=1; }

# ---- a one-shot load with a virtual time budget, as a plain `chromium --dump-dom` sees it ------
timeout 90 chromium "${CHROME_FLAGS[@]}" --user-data-dir="$work/profile2" --virtual-time-budget=8000 \
    --dump-dom "$API/admin/#token=$TOKEN" >"$work/dom.html" 2>"$work/chromium2.log" || true
for marker in 'data-ready="yes"' 'Mailbox depth by actor kind' 'Busiest actors' 'evt_console_orphan' 'class="id" title="pay_'; do
    if grep -qF "$marker" "$work/dom.html"; then
        log "ok   dump-dom has: $marker"
    else
        log "FAIL dump-dom lacks: $marker"; status=1
    fi
done

if [ $status -eq 0 ]; then
    log "PASS: the console rendered every panel with data; screenshot in $SHOT"
else
    log "FAIL: see above (the screenshot of what the page showed, if any, is in $SHOT)"
    tail -5 "$work/payrail.log" >&2 || true
fi
exit $status
