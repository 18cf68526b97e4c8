#!/usr/bin/env bash
# A local payrail cluster on loopback: three nats-server processes clustered with JetStream
# (streams and the lease bucket at three replicas) and three payrail nodes in cluster mode,
# sharing config.toml's database (its operator token and demo merchant). Returns once all three
# nodes are ready (every partition owned, each node serving some) and prints one line per
# payrail node: `<base URL> <pid>`. scripts/cluster/down.sh stops everything it started.
#
# Environment: PAYRAIL_CLUSTER_DIR (state, logs; default target/cluster), PAYRAIL_BINARY (default:
# a release build, built if missing), PAYRAIL_CLUSTER_NATS_PORT (first client port; 4301),
# PAYRAIL_CLUSTER_HTTP_PORT (first payrail port; 8181). Any PAYRAIL__… setting passes through.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${PAYRAIL_CLUSTER_DIR:-$ROOT/target/cluster}"
NATS_PORT="${PAYRAIL_CLUSTER_NATS_PORT:-4301}"
HTTP_PORT="${PAYRAIL_CLUSTER_HTTP_PORT:-8181}"
NODES=3

if [[ -s "$DIR/pids" ]]; then
    "$ROOT/scripts/cluster/down.sh" >/dev/null
fi
mkdir -p "$DIR"
: >"$DIR/pids"
# Whatever fails from here on, nothing this script started is left running.
trap 'status=$?; if (( status != 0 )); then echo "cluster did not come up; logs in $DIR" >&2; "$ROOT/scripts/cluster/down.sh" >/dev/null; fi' EXIT

BINARY="${PAYRAIL_BINARY:-$ROOT/target/release/payrail}"
if [[ -z "${PAYRAIL_BINARY:-}" ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
fi

# Three nats-servers, one JetStream cluster.
routes=""
for i in $(seq 1 $NODES); do
    routes+="nats://127.0.0.1:$((NATS_PORT + 2000 + i - 1)),"
done
routes="${routes%,}"
urls=""
for i in $(seq 1 $NODES); do
    port=$((NATS_PORT + i - 1))
    store="$DIR/nats-$i"
    rm -rf "$store"
    mkdir -p "$store"
    cat >"$DIR/nats-$i.conf" <<CONF
server_name: payrail-nats-$i
listen: 127.0.0.1:$port
http: 127.0.0.1:$((NATS_PORT + 1000 + i - 1))
jetstream { store_dir: "$store" }
cluster {
  name: payrail-local
  listen: 127.0.0.1:$((NATS_PORT + 2000 + i - 1))
  routes: [ ${routes//,/, } ]
}
CONF
    /usr/sbin/nats-server -c "$DIR/nats-$i.conf" >"$DIR/nats-$i.log" 2>&1 &
    echo "nats $! $port" >>"$DIR/pids"
    urls+="nats://127.0.0.1:$port,"
done
urls="${urls%,}"

# JetStream is usable once the servers have elected a meta leader.
python3 - "$NATS_PORT" "$NODES" <<'PY'
import json, sys, time, urllib.request
base, n = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        seen = [json.load(urllib.request.urlopen(f"http://127.0.0.1:{base + 1000 + i}/jsz", timeout=1)) for i in range(n)]
        leaders = {s.get("meta_cluster", {}).get("leader") for s in seen}
        if len(leaders) == 1 and None not in leaders and "" not in leaders:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("the nats-servers elected no JetStream leader in 60 s")
PY

# Three payrail nodes in cluster mode.
for i in $(seq 1 $NODES); do
    port=$((HTTP_PORT + i - 1))
    PAYRAIL__SERVER__BIND="127.0.0.1:$port" \
    PAYRAIL__NATS__URL="$urls" \
    PAYRAIL__NATS__REPLICAS=3 \
    PAYRAIL__CLUSTER__ENABLED=true \
    PAYRAIL__CLUSTER__NODE_ID="node-$i" \
    PAYRAIL__DATABASE__NODE_LOCK_WAIT_MS=15000 \
        "$BINARY" serve --config "$ROOT/config.toml" >"$DIR/payrail-$i.log" 2>&1 &
    echo "payrail $! $port" >>"$DIR/pids"
done

python3 - "$DIR/pids" <<'PY'
import json, os, sys, time, urllib.error, urllib.request
nodes = [l.split() for l in open(sys.argv[1]) if l.startswith("payrail ")]
deadline = time.monotonic() + 90
ready = set()
while time.monotonic() < deadline and len(ready) < len(nodes):
    for _, pid, port in nodes:
        try:
            os.kill(int(pid), 0)
        except OSError:
            sys.exit(f"payrail node on port {port} (pid {pid}) exited at start")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                ready.add(port)
        except (OSError, urllib.error.HTTPError):
            pass
    time.sleep(0.2)
if len(ready) < len(nodes):
    sys.exit("payrail nodes not ready in 90 s")
PY

trap - EXIT
awk '$1 == "payrail" { print "http://127.0.0.1:" $3, $2 }' "$DIR/pids"
