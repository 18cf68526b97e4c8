#!/usr/bin/env python3
"""Drill: kill -9 under load. Clients create+confirm payments; payrail is killed with SIGKILL
mid-run and restarted on the same database. PASS when every 2xx-acknowledged payment is there
exactly as acknowledged, no journal was posted twice, and `payrail ledger verify` is clean.
Usage: scripts/drills/kill9.py [--seconds 10] [--threads 16] [--binary target/debug/payrail]"""

import argparse
import time

import drill


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--binary")
    args = p.parse_args()
    db, prefix = drill.fresh_names("kill9")
    server = drill.Payrail(drill.binary(args), f"postgres://postgres@127.0.0.1:5432/{db}", prefix)
    try:
        server.start()
        load = drill.Load(lambda: server.port, args.threads)
        load.start()
        time.sleep(args.seconds / 2)
        server.kill9()
        ready_after = server.start()
        time.sleep(args.seconds / 2)
        load.stop()
        acked = [a for a in load.acked if isinstance(a, dict)]
        missing, changed = 0, 0
        for chunk in range(0, len(acked), 500):
            part = acked[chunk:chunk + 500]
            ids = ",".join(f"'{a['payment_id']}'" for a in part)
            rows = dict(line.split("|", 1) for line in drill.psql(db, f"SELECT id, status FROM payments WHERE id IN ({ids})").splitlines() if line)
            for a in part:
                if a["payment_id"] not in rows:
                    missing += 1
                elif rows[a["payment_id"]] != a["status"]:
                    changed += 1
        twice = int(drill.psql(db, "SELECT count(*) FROM (SELECT 1 FROM journals GROUP BY payment_id, kind, correlation_id HAVING count(*) > 1) d"))
        clean, verify = server.verify_ledger()
        ok = missing == 0 and changed == 0 and twice == 0 and clean and len(acked) > 0
        drill.verdict("kill -9 under load", ok, {
            "acknowledged": len(acked), "missing": missing, "changed": changed, "journals_twice": twice,
            "ledger": verify, "ready_again_s": f"{ready_after:.2f}", "responses": load.statuses})
    finally:
        server.stop()
        drill.drop_database(db)


if __name__ == "__main__":
    main()
