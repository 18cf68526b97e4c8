#!/usr/bin/env python3
"""Drill: one PSP connector goes down under load (docs/RELIABILITY.md, "PSP outage").

The demo merchant gets a second sandbox connector (B) and the routing `default: [A, B]`, A being
its own sandbox connector. `payrail loadgen` sends create+confirm at a fixed rate in three
phases: before, during and after an outage of A (`POST /sandbox/v1/connectors/{A}/outage`).
PASS when, over the whole run, at least 99.9 % of the authorizations asked for end captured in
the database (and none is left uncaptured), each phase reaches 90 % of the rate; p99 during the outage
is under 1 s; no payment has two succeeded authorization attempts; A's circuit breaker opened
during the outage and is closed again at the end; and `payrail ledger verify` is clean.
Usage: scripts/drills/psp_outage.py [--rate 500] [--outage 20] [--calm 10] [--binary …]"""

import argparse
import json
import os
import re
import subprocess
import tempfile

import drill

TOKEN = "admin_test_token"


def loadgen(bin_path, port, rate, seconds, tag):
    report = os.path.join(tempfile.gettempdir(), f"payrail-psp-outage-{tag}.json")
    subprocess.run([bin_path, "--config", os.path.join(drill.ROOT, "config.toml"), "loadgen", "--url",
                    f"http://127.0.0.1:{port}", "--connections", "128", "--rate", str(rate), "--duration",
                    str(seconds), "--report", report], capture_output=True, timeout=seconds + 120, check=True)
    with open(report) as f:
        return json.load(f)


def metric(port, name, labels):
    status, body = drill.request(port, "GET", "/metrics", key=None)
    text = body if isinstance(body, str) else json.dumps(body)
    m = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=int, default=500)
    p.add_argument("--outage", type=int, default=20)
    p.add_argument("--calm", type=int, default=10)
    p.add_argument("--binary")
    args = p.parse_args()
    bin_path = drill.binary(args)
    db, prefix = drill.fresh_names("pspoutage")
    server = drill.Payrail(bin_path, f"postgres://postgres@127.0.0.1:5432/{db}", prefix)
    try:
        server.start()
        port = server.port
        status, conns = drill.request(port, "GET", "/api/v1/connectors")
        a = conns["data"][0]["id"]
        merchant = conns["data"][0]["merchant_id"]
        status, b = drill.request(port, "POST", f"/admin/v1/merchants/{merchant}/connectors", key=TOKEN,
                                  body={"connector_id": "mca_drill_b", "psp": "sandbox", "label": "B"})
        assert status in (200, 201), b
        status, r = drill.request(port, "PUT", f"/admin/v1/merchants/{merchant}/routing", key=TOKEN,
                                  body={"default": [a, "mca_drill_b"]})
        assert status == 200, r

        before = loadgen(bin_path, port, args.rate, args.calm, "before")
        status, _ = drill.request(port, "POST", f"/sandbox/v1/connectors/{a}/outage", body={"enabled": True})
        assert status == 200
        during = loadgen(bin_path, port, args.rate, args.outage, "during")
        opened = metric(port, "payrail_psp_breaker_opened_total", 'psp="sandbox"')
        failovers = metric(port, "payrail_psp_failovers_total", 'reason="unreachable"')
        status, _ = drill.request(port, "POST", f"/sandbox/v1/connectors/{a}/outage", body={"enabled": False})
        assert status == 200
        after = loadgen(bin_path, port, args.rate, args.calm, "after")
        still_open = metric(port, "payrail_psp_breakers_open", 'psp="sandbox"')
        status, health = drill.request(port, "GET", "/admin/v1/connectors", key=TOKEN)
        breaker = {c["id"]: c["breaker"] for c in health["data"]}

        phases = [before, during, after]
        requests = sum(sum(r["status"].values()) for r in phases)
        # Success is what the database holds, not the HTTP status: payments captured (every
        # card here succeeds, with automatic capture) over authorizations asked for.
        captured = int(drill.psql(db, "SELECT count(*) FROM payments WHERE status = 'captured'"))
        success = captured / requests if requests else 0.0
        rates_ok = all(r["payments_per_s"] >= 0.9 * args.rate for r in phases)
        twice = int(drill.psql(db, "SELECT count(*) FROM (SELECT payment_id FROM psp_attempts WHERE operation = 'authorize' "
                                   "AND outcome = 'succeeded' GROUP BY payment_id HAVING count(*) > 1) t"))
        on_b = int(drill.psql(db, "SELECT count(*) FROM payments WHERE routing->>'connector_id' = 'mca_drill_b'"))
        not_captured = int(drill.psql(db, "SELECT count(*) FROM payments WHERE status <> 'captured'"))
        clean, verify = server.verify_ledger()
        ok = (success >= 0.999 and during["latency_ms"]["p99"] < 1000 and twice == 0 and opened >= 1
              and still_open == 0 and breaker.get(a) == "closed" and clean and rates_ok and not_captured == 0)
        drill.verdict("PSP outage (connector A down, failover to B)", ok, {
            "rate": args.rate, "requests": requests, "captured": captured,
            "authorization_success": f"{100 * success:.3f}%",
            "payments_per_s": "/".join(str(round(r["payments_per_s"])) for r in phases),
            "p99_ms_before_during_after": "/".join(f"{r['latency_ms']['p99']:.0f}" for r in phases),
            "max_ms_during": f"{during['latency_ms']['max']:.0f}", "non_2xx": sum(r["non_2xx"] for r in phases),
            "failovers_unreachable": failovers, "breaker_opened": opened, "breakers_open_at_end": still_open,
            "breaker_a_at_end": breaker.get(a), "payments_on_b": on_b, "not_captured": not_captured,
            "authorized_twice": twice, "ledger": verify})
    finally:
        server.stop()
        drill.drop_database(db)


if __name__ == "__main__":
    main()
