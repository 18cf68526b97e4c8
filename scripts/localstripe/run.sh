#!/usr/bin/env bash
# localstripe (a fake, stateful Stripe server, PyPI `localstripe`) on 127.0.0.1:PORT, for the
# Stripe connector's tests (tests/api/stripe.rs starts it through this script). Its venv is made
# here on first use, in target/ (pinned version; the package registry is the only network
# needed), and reused after.
# Usage: scripts/localstripe/run.sh PORT
set -euo pipefail
cd "$(dirname "$0")/../.."
port=${1:?usage: run.sh PORT}
venv=target/localstripe-venv
version=1.15.10
ready="$venv/.ready-$version"
if [ ! -f "$ready" ]; then
    mkdir -p target
    # Two tests may start it at once: one makes the venv while the other waits.
    exec 9>target/localstripe-venv.lock
    flock 9
    if [ ! -f "$ready" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "localstripe==$version"
        touch "$ready"
    fi
    flock -u 9
fi
exec "$venv/bin/localstripe" --port "$port" --from-scratch
