#!/usr/bin/env python3
"""Receiver-down drill for merchant webhooks (docs/RELIABILITY.md).

A local receiver answers 500 for --down seconds, then 200, while payments flow throughout.
Then every event the merchant has (read through GET /api/v1/events) must reach the receiver at
least once; duplicates are counted and reported. Round 2 does the same and kills payrail with
kill -9 in the middle of the outage, restarting it at once: nothing may be lost to the crash.

The retry schedule is shortened so that the drill does not wait for hours: retries start at
--retry-base-ms and double up to --retry-max-ms (defaults 2 s and 10 s; production: 10 s and
2 h); a dead node's leased deliveries are taken over after 15 s (production: 60 s).

Usage: scripts/drills/webhook_receiver_down.py [--down 60] [--after 20] [--threads 4] [--binary PATH]
"""
import argparse
import http.server
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import drill  # noqa: E402


class Receiver:
    """A threaded HTTP receiver: 500 while down, 200 otherwise; counts every event it gets."""

    def __init__(self):
        self.down = False
        self.lock = threading.Lock()
        self.counts = {}
        self.requests = 0
        self.refused = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests += 1
                    if receiver.down:
                        receiver.refused += 1
                        code = 500
                    else:
                        event = json.loads(body)
                        receiver.counts[event["id"]] = receiver.counts.get(event["id"], 0) + 1
                        code = 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self):
        with self.lock:
            return dict(self.counts)


def all_events(port):
    """Every event id of the demo merchant, through the events API (newest first, paged)."""
    ids, cursor = [], ""
    while True:
        status, body = drill.request(port, "GET", f"/api/v1/events?limit=100{cursor}")
        if status != 200:
            raise RuntimeError(f"GET /api/v1/events answered {status}")
        ids.extend(e["id"] for e in body["data"])
        if not body["has_more"]:
            return ids
        cursor = f"&starting_after={body['data'][-1]['id']}"


def wait_all_received(payrail, receiver, deadline_s):
    """Reads every event the merchant has now, then waits until each has been received.
    Returns the seconds it took (None if the deadline passed), the events, and what is missing."""
    started = time.monotonic()
    events = all_events(payrail.port)
    missing = events
    while time.monotonic() - started < deadline_s:
        got = receiver.received()
        missing = [e for e in missing if e not in got]
        if not missing:
            return time.monotonic() - started, events, []
        time.sleep(0.5)
    return None, events, missing


def round_(name, payrail, receiver, load, args, kill):
    print(f"-- {name}: receiver down for {args.down} s with payments flowing" + (", payrail killed -9 halfway" if kill else ""))
    receiver.down = True
    started = time.monotonic()
    if kill:
        time.sleep(args.down / 2)
        payrail.kill9()
        print("   payrail killed -9; restarting")
        payrail.start()
    time.sleep(max(0.0, args.down - (time.monotonic() - started)))
    receiver.down = False
    print(f"   receiver up; payments go on for {args.after} s")
    time.sleep(args.after)
    recovered, events, missing = wait_all_received(payrail, receiver, args.deadline)
    got = receiver.received()
    duplicates = sum(n - 1 for e, n in got.items() if e in set(events) and n > 1)
    return {
        "events": len(events),
        "received": sum(1 for e in events if e in got),
        "missing": len(missing),
        "duplicates": duplicates,
        "refused_while_down": receiver.refused,
        "all_received_after_s": round(recovered, 1) if recovered is not None else None,
        "example_missing": missing[:3],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--down", type=float, default=60)
    p.add_argument("--after", type=float, default=20)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--deadline", type=float, default=120, help="seconds to wait for the last event")
    p.add_argument("--retry-base-ms", type=int, default=2000)
    p.add_argument("--retry-max-ms", type=int, default=10000)
    p.add_argument("--binary")
    args = p.parse_args()

    db, prefix = drill.fresh_names("whdown")
    env = {
        "PAYRAIL__WEBHOOKS_OUT__RETRY_BASE_MS": str(args.retry_base_ms),
        "PAYRAIL__WEBHOOKS_OUT__RETRY_MAX_MS": str(args.retry_max_ms),
        "PAYRAIL__WEBHOOKS_OUT__CLAIM_LEASE_SECS": "15",
        "PAYRAIL__WEBHOOKS_OUT__ALLOW_PRIVATE_TARGETS": "true",
    }
    payrail = drill.Payrail(drill.binary(args), f"postgres://postgres@127.0.0.1:5432/{db}", prefix, env)
    receiver = Receiver()
    figures = {}
    ok = False
    try:
        payrail.start()
        status, endpoint = drill.request(payrail.port, "POST", "/api/v1/webhook_endpoints",
                                         {"url": f"http://127.0.0.1:{receiver.port}/hooks"}, idem="drill-endpoint")
        if status != 201:
            raise RuntimeError(f"creating the endpoint answered {status}: {endpoint}")
        load = drill.Load(lambda: payrail.port, args.threads)
        load.start()
        first = round_("round 1", payrail, receiver, load, args, kill=False)
        receiver.refused = 0
        second = round_("round 2", payrail, receiver, load, args, kill=True)
        load.stop()
        # What the last payments committed after the load stopped must arrive too.
        recovered, events, missing = wait_all_received(payrail, receiver, args.deadline)
        got = receiver.received()
        ledger_ok, ledger = payrail.verify_ledger()
        figures = {
            "payments_acked": len(load.acked),
            "statuses": load.statuses,
            "round1": first,
            "round2_kill9": second,
            "events_total": len(events),
            "missing_total": len(missing),
            "duplicates_total": sum(n - 1 for n in got.values() if n > 1),
            "ledger": ledger,
        }
        ok = first["missing"] == 0 and second["missing"] == 0 and not missing and ledger_ok and len(load.acked) > 0
        for k, v in figures.items():
            print(f"   {k}: {v}")
    finally:
        payrail.stop()
        drill.drop_database(db)
    drill.verdict("webhook receiver down", ok, {k: v for k, v in figures.items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
