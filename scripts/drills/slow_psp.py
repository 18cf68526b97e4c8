#!/usr/bin/env python3
"""Drill: a slow PSP. The sandbox answers after 500 ms and 2,000 payments are in flight
(`payrail loadgen --connections 2000`). Nothing may block a thread while waiting, so
throughput should be about in-flight / latency (4,000/s), unless the database is the limit
first: a baseline at 0 ms from the same connections, in the same run, says which. Memory must
stay bounded. Usage: scripts/drills/slow_psp.py [--seconds 10] [--in-flight 2000] [--binary …]"""

import argparse
import json
import os
import subprocess
import tempfile

import drill


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(bin_path, latency_ms, args):
    db, prefix = drill.fresh_names(f"slow{latency_ms}")
    server = drill.Payrail(bin_path, f"postgres://postgres@127.0.0.1:5432/{db}", prefix,
                           {"PAYRAIL__PSP__SANDBOX__LATENCY_MS": str(latency_ms), "PAYRAIL__PSP__SANDBOX__WEBHOOKS": "false"})
    try:
        server.start()
        before = rss_mib(server.proc.pid)
        report = os.path.join(tempfile.gettempdir(), f"payrail-slow-{latency_ms}.json")
        subprocess.run([bin_path, "--config", os.path.join(drill.ROOT, "config.toml"), "loadgen", "--url",
                        f"http://127.0.0.1:{server.port}", "--connections", str(args.in_flight), "--duration",
                        str(args.seconds), "--report", report], capture_output=True, timeout=args.seconds + 120, check=True)
        after = rss_mib(server.proc.pid)
        with open(report) as f:
            r = json.load(f)
        return r, before, after
    finally:
        server.stop()
        drill.drop_database(db)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--in-flight", type=int, default=2000)
    p.add_argument("--binary")
    args = p.parse_args()
    bin_path = drill.binary(args)
    base, _, _ = run(bin_path, 0, args)
    slow, before, after = run(bin_path, 500, args)
    ideal = args.in_flight / 0.5
    expected = min(ideal, base["payments_per_s"])
    ok = slow["payments_per_s"] >= 0.8 * expected and slow["non_2xx"] == 0 and after - before < 1024
    drill.verdict("slow PSP (500 ms, 2,000 in flight)", ok, {
        "payments_per_s": round(slow["payments_per_s"]), "in_flight_over_latency": round(ideal),
        "baseline_0ms_payments_per_s": round(base["payments_per_s"]), "p50_ms": round(slow["latency_ms"]["p50"]),
        "p99_ms": round(slow["latency_ms"]["p99"]), "non_2xx": slow["non_2xx"],
        "rss_mib_before": round(before), "rss_mib_after": round(after)})


if __name__ == "__main__":
    main()
