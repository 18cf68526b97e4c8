#!/usr/bin/env python3
"""Drill: NATS outage, with a nats-server of the drill's own (never the shared one). While it
is down, webhooks get 503 fast, /readyz is 503, and payment API calls that do not need NATS
keep working (201); their outbox events wait. Once NATS is back, the outbox catches up and
webhooks are accepted again. Usage: scripts/drills/nats_outage.py [--binary …]"""

import argparse
import hashlib
import hmac
import json
import shutil
import subprocess
import tempfile
import time

import drill


def nats_server(port, store):
    return subprocess.Popen(["/usr/sbin/nats-server", "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def signed_webhook(port, secret):
    body = json.dumps({"id": f"evt_drill_{time.time_ns()}", "object": "event", "type": "customer.created",
                       "data": {"object": {"id": "cus_drill"}}})
    t = int(time.time())
    sig = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    started = time.monotonic()
    status, _ = drill.request(port, "POST", "/internal/webhooks/psp/sandbox", body, key=None,
                              headers={"Stripe-Signature": f"t={t},v1={sig}"})
    return status, time.monotonic() - started


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--binary")
    args = p.parse_args()
    db, prefix = drill.fresh_names("nats")
    nport, store = drill.free_port(), tempfile.mkdtemp(prefix="payrail-drill-nats-")
    nats = nats_server(nport, store)
    time.sleep(0.5)
    secret = "whsec_payrail_sandbox_secret"
    server = drill.Payrail(drill.binary(args), f"postgres://postgres@127.0.0.1:5432/{db}", prefix,
                           {"PAYRAIL__NATS__URL": f"nats://127.0.0.1:{nport}", "PAYRAIL__NATS__PUBLISH_TIMEOUT_MS": "500",
                            "PAYRAIL__PSP__SANDBOX__WEBHOOKS": "false", "PAYRAIL__WEBHOOKS__SECRET": secret})
    try:
        server.start()
        nats.kill()
        nats.wait()
        time.sleep(0.5)
        down_webhook, down_webhook_s = signed_webhook(server.port, secret)
        ready_down = drill.request(server.port, "GET", "/readyz")[0]
        created = [drill.create_confirm(server.port, 500 + i, f"nats-drill-{i}")[0] for i in range(20)]
        waiting = int(drill.psql(db, "SELECT count(*) FROM outbox_waiting"))
        nats = nats_server(nport, store)
        back = time.monotonic()
        caught_up_s, accepted = None, None
        while time.monotonic() - back < 30:
            if caught_up_s is None and int(drill.psql(db, "SELECT count(*) FROM outbox_waiting")) == 0:
                caught_up_s = time.monotonic() - back
            if accepted is None and signed_webhook(server.port, secret)[0] == 200:
                accepted = time.monotonic() - back
            if caught_up_s is not None and accepted is not None:
                break
            time.sleep(0.1)
        ok = (down_webhook == 503 and down_webhook_s < 2 and ready_down == 503 and created.count(201) == 20
              and waiting > 0 and caught_up_s is not None and accepted is not None)
        drill.verdict("NATS outage", ok, {
            "webhook_while_down": down_webhook, "its_latency_s": f"{down_webhook_s:.2f}", "readyz_while_down": ready_down,
            "payments_created_while_down": created.count(201), "outbox_waiting": waiting,
            "outbox_caught_up_after_s": f"{caught_up_s:.2f}" if caught_up_s is not None else "never",
            "webhooks_accepted_again_after_s": f"{accepted:.2f}" if accepted is not None else "never"})
    finally:
        server.stop()
        nats.kill()
        shutil.rmtree(store, ignore_errors=True)
        drill.drop_database(db)


if __name__ == "__main__":
    main()
