#!/usr/bin/env bash
# Fuzz the whole API with schemathesis (from PyPI, in a venv this script creates) against
# src/api/openapi.json (the document /openapi.json serves): no 5xx, no crash, every response as
# the document says. All phases run, the stateful one included: it follows the document's links
# (create a payment, then confirm, capture, refund, read it...). Each operation gets the
# credential of its security scheme (scripts/fuzz/schemathesis.toml, which also steers part of
# the generated values to the sandbox's test tokens and cards); scripts/fuzz/hooks.py supplies
# what no schema can (fresh idempotency keys, the card expiry window, webhook signatures) and
# confirms more payments at creation; scripts/fuzz/seed.py makes a dead letter and a review rule.
# At the end, scripts/fuzz/coverage.py prints how many generated requests each operation got and
# how many of them were answered 2xx, and the server's logged errors are summed up: the run fails
# on any failed check, a panic, or a PSP event the server could not park.
#
# Usage: scripts/fuzz.sh [examples] [seconds]
#   examples  the most test cases per operation in one round of the fuzzing phase, and a fifth of
#             the scenarios in one round of the stateful phase (default 50)
#   seconds   the time budget: the fuzzing and stateful phases run round after round until it is
#             spent (default 4 × examples; 0 runs each phase once). Reaching a refund or a capture
#             takes a chain of lucky steps, so a longer budget reaches more of the API.
# Environment: PAYRAIL_BIN     fuzz this binary instead of building one
#              PAYRAIL_CONFIG its configuration file (default config.toml)
#              FUZZ_OUT       where the reports go (default: a new directory under /tmp)
#              FUZZ_SEED      schemathesis's seed, to repeat a run
#              FUZZ_BASELINE  a schemathesis baseline file: failures recorded there are accepted
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-50}
seconds=${2:-$((examples * 4))}

# The version this script and its hooks were written against: newer ones change the CLI.
schemathesis_version=4.32.5
if ! .venv-fuzz/bin/schemathesis --version 2>/dev/null | grep -qF "$schemathesis_version"; then
    python3 -m venv .venv-fuzz
    .venv-fuzz/bin/pip install -q "schemathesis==$schemathesis_version"
fi

# The debug binary (a release build takes long on a small machine), unless a release binary is
# already there and newer than every source it is built from.
bin=${PAYRAIL_BIN:-}
if [ -z "$bin" ]; then
    release=target/release/payrail
    if [ -x "$release" ] && [ -z "$(find src migrations Cargo.toml Cargo.lock -newer "$release" -print -quit)" ]; then
        bin=$release
    else
        cargo build --bin payrail --quiet
        bin=target/debug/payrail
    fi
fi
echo "fuzzing $bin"

out=${FUZZ_OUT:-$(mktemp -d /tmp/payrail-fuzz.XXXXXX)}
mkdir -p "$out"
log=$out/payrail.log
port=18090
base=http://127.0.0.1:$port
stamp=$(date +%s)
db=payrail_fuzz_$stamp
export PAYRAIL__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
export PAYRAIL__SERVER__BIND=127.0.0.1:$port
export PAYRAIL__NATS__STREAM_PREFIX=FUZZ$stamp
export PAYRAIL__LOG__LEVEL=warn
# The server and the fuzzer share these: the operator token, and the secret webhooks are signed with.
export PAYRAIL__ADMIN__TOKEN=admin_test_token
export PAYRAIL__WEBHOOKS__SECRET=whsec_fuzz_$stamp
export PAYRAIL_FUZZ_MERCHANT_KEY=sk_test_demo   # the demo merchant's ([sandbox] demo_merchant)
export SCHEMATHESIS_HOOKS=scripts/fuzz/hooks.py
export PYTHONDONTWRITEBYTECODE=1                 # no __pycache__ next to the hooks
export PAYRAIL_FUZZ_SEED=${FUZZ_SEED:-payrail}     # the hooks' own random choices

"$bin" --config "${PAYRAIL_CONFIG:-config.toml}" serve > "$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" 2>/dev/null || true; python3 scripts/fuzz/drop_streams.py FUZZ${stamp}_PSP_EVENTS FUZZ${stamp}_EVENTS || true' EXIT
for _ in $(seq 1 150); do curl -sf $base/readyz >/dev/null && break; sleep 0.2; done
curl -sf $base/readyz >/dev/null || { echo "payrail did not get ready:"; tail -20 "$log"; exit 1; }
# Test data no generated request makes but by luck: a dead letter, and a review rule (seed.py).
python3 scripts/fuzz/seed.py $base
if ! curl -sf $base/openapi.json | cmp -s - src/api/openapi.json; then
    echo "note: $bin serves another /openapi.json than src/api/openapi.json (built from other sources); fuzzing the file"
fi

# Every check but positive_data_acceptance: requests the schema allows may still be refused
# by rules no JSON schema can state (a reused Idempotency-Key is 422, an unknown pm_ token or
# a currency other than the payment's is 400, a card number must pass the Luhn check); those
# answers are documented statuses and are checked for shape like every other.
status=0
# The examples per operation, and five times as many stateful scenarios, go into a copy of the
# configuration (--max-examples would set both to the same number).
config=$out/schemathesis.toml
cp scripts/fuzz/schemathesis.toml "$config"
printf '\n[generation]\nmax-examples = %d\n\n[phases.stateful.generation]\nmax-examples = %d\n' \
    "$examples" $((examples * 5)) >> "$config"
.venv-fuzz/bin/schemathesis --config-file "$config" run src/api/openapi.json --url $base \
    --phases examples,coverage,fuzzing,stateful \
    --checks all --exclude-checks positive_data_acceptance --continue-on-failure --request-timeout 10 \
    ${FUZZ_SEED:+--seed "$FUZZ_SEED"} ${FUZZ_BASELINE:+--baseline "$FUZZ_BASELINE"} \
    $([ "$seconds" -gt 0 ] && echo "--max-time $seconds") \
    --report ndjson,junit --report-dir "$out" --report-ndjson-path "$out/events.ndjson" \
    --report-junit-path "$out/junit.xml" || status=$?

echo
echo "Requests per operation, and how many were answered 2xx (stateful: following the document's links):"
python3 scripts/fuzz/coverage.py "$out/events.ndjson" --openapi src/api/openapi.json || status=1
echo "reports and the server's log: $out"
# What the server logged as errors: input that got past validation to PostgreSQL shows up here
# even when the API answered well (an event the consumers could not store, for one).
if grep -q 'ERROR\|WARN' "$log"; then
    echo "The server's errors and warnings, by message:"
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E ' (ERROR|WARN) ' | sed -E 's/^[^ ]+ +//; s/ (partition|event_id|provider|payment_id|request_id)=[^ ]+//g' |
        sort | uniq -c | sort -rn | head -20
fi
if grep -q 'panicked' "$log"; then
    echo "payrail panicked during the fuzz run:"
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -A1 'panicked' | grep -v '^--' | sort | uniq -c | head -10
    status=1
fi
# A PSP event that can be neither applied nor parked as a dead letter is redelivered forever.
if grep -q 'could not park a PSP event' "$log"; then echo "payrail could not park a PSP event (redelivered forever)"; status=1; fi
exit $status
