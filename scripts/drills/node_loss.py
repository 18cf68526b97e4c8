#!/usr/bin/env python3
"""Drill: losing a node of a three-node cluster under load (scripts/cluster/up.sh, on a database
and ports of the drill's own).

--kill payrail (default): clients create+confirm payments spread over the three payrail nodes;
one node is killed with SIGKILL mid-run. A client whose node fails retries the same request
(same Idempotency-Key) on another node, as a client of a load balancer would. PASS when every
acknowledged payment is present exactly as acknowledged, no journal was posted twice, no PSP
event was applied twice, `payrail ledger verify` is clean, and the killed node's partitions
serve again (owned by the survivors) within 5 s. Non-2xx answers during the move are counted.

--kill nats: the same load plus signed PSP webhooks sent to every node; one of the three
nats-servers is killed with SIGKILL mid-run. PASS when every webhook payrail acknowledged
(200) is recorded as processed, the nodes keep serving, and the checks above hold.

A request the killed node had in flight holds its Idempotency-Key until the node leaves the
cluster (its claim names its process; then another node takes the key over at once); the clients
retry `idempotency_key_in_use` answers until then, and the drill counts them.

Usage: scripts/drills/node_loss.py [--kill payrail|nats] [--seconds 12] [--threads 12] [--binary …]"""

import argparse
import hashlib
import hmac
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import drill

SECRET = "whsec_payrail_sandbox_secret"


def up(db, binary, workdir):
    env = dict(os.environ, PAYRAIL_CLUSTER_DIR=workdir, PAYRAIL_BINARY=binary,
               PAYRAIL_CLUSTER_NATS_PORT=str(drill.free_port() % 1000 + 14000),
               PAYRAIL_CLUSTER_HTTP_PORT=str(drill.free_port() % 1000 + 18000),
               PAYRAIL__DATABASE__URL=f"postgres://postgres@127.0.0.1:5432/{db}",
               PAYRAIL__WEBHOOKS__SECRET=SECRET, PAYRAIL__LOG__LEVEL="warn")
    out = subprocess.run([os.path.join(drill.ROOT, "scripts", "cluster", "up.sh")], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"cluster did not come up: {out.stderr.strip()[-2000:]}")
    nodes = []
    for line in out.stdout.split("\n"):
        if line.startswith("http://"):
            url, pid = line.split()
            nodes.append({"port": int(url.rsplit(":", 1)[1]), "pid": int(pid), "alive": True})
    nats = [l.split() for l in open(os.path.join(workdir, "pids")) if l.startswith("nats ")]
    return nodes, [{"pid": int(p), "port": int(port)} for _, p, port in nats]


def down(workdir):
    subprocess.run([os.path.join(drill.ROOT, "scripts", "cluster", "down.sh")],
                   env=dict(os.environ, PAYRAIL_CLUSTER_DIR=workdir), capture_output=True, timeout=120)


class Load:
    """Client threads doing create+confirm over the nodes until stopped; a request that fails
    on one node (connection refused, 5xx) is sent again, same key, to the next node."""

    def __init__(self, nodes, threads):
        self.nodes, self.threads, self.acked, self.statuses = nodes, threads, [], {}
        self.lock, self.stop_flag, self.workers, self.failovers = threading.Lock(), threading.Event(), [], 0
        self.reasons = {}

    def count(self, status, body=None):
        with self.lock:
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            if not (isinstance(status, int) and 200 <= status < 300) and isinstance(body, dict) and "error" in body:
                why = f"{status} {body['error'].get('code')}: {body['error'].get('message')}"
                self.reasons[why] = self.reasons.get(why, 0) + 1

    def _run(self, n):
        i = 0
        while not self.stop_flag.is_set():
            i += 1
            idem = f"drill-{n}-{i}-{uuid.uuid4().hex[:8]}"
            for attempt in range(120):
                node = self.nodes[(n + i + attempt) % len(self.nodes)]
                if not node["alive"]:
                    continue
                try:
                    status, body = drill.create_confirm(node["port"], 1000 + i, idem)
                except OSError:
                    status, body = "connection_error", None
                self.count(status, body)
                in_use = status == 409 and isinstance(body, dict) and body["error"]["code"] == "idempotency_key_in_use"
                if in_use:
                    # The killed node held the key for its request in flight: until it has left
                    # the cluster (about the lease TTL), another node may not take the key over.
                    # A client retries, as docs/API.md tells it to.
                    time.sleep(0.5)
                    continue
                if isinstance(status, int) and status < 500:
                    if 200 <= status < 300:
                        with self.lock:
                            self.acked.append(body)
                    break
                with self.lock:
                    self.failovers += 1
                time.sleep(0.05)

    def start(self):
        for n in range(self.threads):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self.workers.append(t)

    def stop(self):
        self.stop_flag.set()
        for t in self.workers:
            t.join(90)


class Webhooks:
    """Signed sandbox webhooks to every live node, each with a fresh event id; keeps the ids
    payrail acknowledged with 200."""

    def __init__(self, nodes):
        self.nodes, self.acked, self.statuses, self.refused_at = nodes, [], {}, []
        self.stop_flag, self.thread = threading.Event(), None

    def _run(self):
        i = 0
        while not self.stop_flag.is_set():
            i += 1
            node = self.nodes[i % len(self.nodes)]
            if not node["alive"]:
                continue
            event_id = f"evt_drill_{uuid.uuid4().hex}"
            body = json.dumps({"id": event_id, "object": "event", "type": "customer.created",
                               "data": {"object": {"id": f"cus_{i}"}}})
            t = int(time.time())
            sig = hmac.new(SECRET.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
            try:
                status, _ = drill.request(node["port"], "POST", "/internal/webhooks/psp/sandbox", body, key=None,
                                          headers={"Stripe-Signature": f"t={t},v1={sig}"})
            except OSError:
                status = "connection_error"
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            if status == 200:
                self.acked.append(event_id)
            else:
                self.refused_at.append(time.monotonic())
            time.sleep(0.01)

    def start(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self):
        self.stop_flag.set()
        self.thread.join(30)


def cluster_view(port):
    status, body = drill.request(port, "GET", "/admin/v1/cluster", key="admin_test_token")
    return body if status == 200 else None


def wait_partitions_without(survivors, dead_node, bound=30):
    """Seconds until a survivor's view has every partition owned by a live node other than
    `dead_node`, or None."""
    started = time.monotonic()
    while time.monotonic() - started < bound:
        for s in survivors:
            try:
                view = cluster_view(s["port"])
            except OSError:
                continue
            if view and all(p["owner"] and p["owner"] != dead_node for p in view["partitions"]):
                return time.monotonic() - started
        time.sleep(0.05)
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kill", choices=["payrail", "nats"], default="payrail")
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--binary")
    args = p.parse_args()
    binary = drill.binary(args)
    db, _ = drill.fresh_names(f"node_loss_{args.kill}")
    workdir = tempfile.mkdtemp(prefix="payrail-drill-cluster-")
    try:
        nodes, nats = up(db, binary, workdir)
        load = Load(nodes, args.threads)
        hooks = Webhooks(nodes)
        load.start()
        if args.kill == "nats":
            hooks.start()
        time.sleep(args.seconds / 2)
        moved_s = None
        if args.kill == "payrail":
            victim = nodes[-1]
            dead_node = cluster_view(victim["port"])["node"]
            os.kill(victim["pid"], signal.SIGKILL)
            victim["alive"] = False
            moved_s = wait_partitions_without(nodes[:-1], dead_node)
        else:
            os.kill(nats[-1]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        killed_at = len(load.acked)
        time.sleep(args.seconds / 2)
        load.stop()
        hooks.stop() if args.kill == "nats" else None
        after_kill = len(load.acked) - killed_at
        acked = [a for a in load.acked if isinstance(a, dict)]
        missing, changed = 0, 0
        for chunk in range(0, len(acked), 500):
            part = acked[chunk:chunk + 500]
            ids = ",".join(f"'{a['payment_id']}'" for a in part)
            rows = dict(line.split("|", 1) for line in
                        drill.psql(db, f"SELECT id, status FROM payments WHERE id IN ({ids})").splitlines() if line)
            for a in part:
                if a["payment_id"] not in rows:
                    missing += 1
                elif rows[a["payment_id"]] != a["status"]:
                    changed += 1
        twice = int(drill.psql(db, "SELECT count(*) FROM (SELECT 1 FROM journals GROUP BY payment_id, kind, "
                                   "correlation_id HAVING count(*) > 1) d"))
        # An event applied twice moves its payment to the same status twice for the same cause;
        # two actors writing one payment break its chain of transitions.
        events_twice = int(drill.psql(db, "SELECT count(*) FROM (SELECT 1 FROM payment_transitions "
                                          "WHERE cause NOT LIKE 'api.%' GROUP BY payment_id, cause, to_status "
                                          "HAVING count(*) > 1) d"))
        broken = int(drill.psql(db, "SELECT count(*) FROM payment_transitions t JOIN payment_transitions b "
                                    "ON b.payment_id = t.payment_id AND b.seq = t.seq - 1 "
                                    "WHERE b.to_status <> t.from_status"))
        lost_hooks = 0
        if hooks.acked:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ids = ",".join(f"'{e}'" for e in hooks.acked)
                seen = int(drill.psql(db, f"SELECT count(*) FROM processed_events WHERE event_id IN ({ids})"))
                lost_hooks = len(hooks.acked) - seen
                if lost_hooks == 0:
                    break
                time.sleep(0.5)
        server = drill.Payrail(binary, f"postgres://postgres@127.0.0.1:5432/{db}", "UNUSED")
        clean, verify = server.verify_ledger()
        non_2xx = {k: v for k, v in load.statuses.items() if not k.startswith("2")}
        ok = (missing == 0 and changed == 0 and twice == 0 and events_twice == 0 and broken == 0 and clean
              and len(acked) > 0
              and after_kill > 0 and lost_hooks == 0)
        figures = {"acknowledged": len(acked), "acknowledged_after_kill": after_kill, "missing": missing,
                   "changed": changed, "journals_twice": twice, "events_applied_twice": events_twice,
                   "broken_transition_chains": broken, "ledger": verify,
                   "non_2xx_answers": non_2xx or 0, "retried_on_another_node": load.failovers,
                   "responses": load.statuses, "non_2xx_reasons": load.reasons}
        if args.kill == "payrail":
            ok = ok and moved_s is not None and moved_s < 5
            figures["partitions_serving_again_s"] = f"{moved_s:.2f}" if moved_s is not None else "never"
        else:
            # A refused webhook is retried by its PSP: nothing is lost, but the window is reported.
            window = (f"{min(hooks.refused_at) - killed:.2f}..{max(hooks.refused_at) - killed:.2f}"
                      if hooks.refused_at else "none")
            figures.update({"webhooks_acknowledged": len(hooks.acked), "webhooks_lost": lost_hooks,
                            "webhook_responses": hooks.statuses, "webhooks_refused_s_after_kill": window})
        drill.verdict(f"{args.kill} node loss in a three-node cluster", ok, figures)
    finally:
        down(workdir)
        drill.drop_database(db)


if __name__ == "__main__":
    main()
