#!/usr/bin/env bash
# Stops what scripts/cluster/up.sh started, by the pids it recorded: the payrail nodes first
# (they give their leases back), then the nats-servers; then removes the servers' JetStream
# data. Safe to run twice.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${PAYRAIL_CLUSTER_DIR:-$ROOT/target/cluster}"
[[ -f "$DIR/pids" ]] || exit 0

stop() {
    local pids=("$@")
    (( ${#pids[@]} )) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null
    for _ in $(seq 1 100); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        (( alive )) || return 0
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null
}

mapfile -t payrail < <(awk '$1 == "payrail" { print $2 }' "$DIR/pids")
mapfile -t nats < <(awk '$1 == "nats" { print $2 }' "$DIR/pids")
stop "${payrail[@]}"
stop "${nats[@]}"
rm -rf "$DIR"/nats-[0-9]*/
rm -f "$DIR/pids"
echo "cluster stopped"
