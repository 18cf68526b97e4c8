#!/usr/bin/env python3
"""Drill: PostgreSQL outage, with a PostgreSQL of the drill's own (own data directory and port,
never the shared one). Under load, it is stopped (immediate): payrail answers 503 fast, no
other 5xx, /readyz is 503; once it is back, everything resumes and every acknowledged payment
is there. Usage: scripts/drills/pg_outage.py [--seconds 4] [--binary …]"""

import argparse
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time

import drill

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]


def as_postgres(*cmd):
    # The server pg_ctl starts keeps its stdio: give it nothing to hold (its log goes to -l).
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--binary")
    args = p.parse_args()
    data = tempfile.mkdtemp(prefix="payrail-drill-pg-")
    shutil.chown(data, "postgres", "postgres")
    port = drill.free_port()
    init = as_postgres(f"{BIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres")
    if init.returncode != 0:
        drill.verdict("PostgreSQL outage", False, {"initdb": init.stderr.strip()[:200]})
    log = os.path.join(data, "server.log")
    pg = lambda action: as_postgres(f"{BIN}/pg_ctl", "-D", data, "-l", log, "-w", "-m", "immediate",
                                    "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", action)
    pg("start")
    db, prefix = drill.fresh_names("pg")
    server = drill.Payrail(drill.binary(args), f"postgres://postgres@127.0.0.1:{port}/{db}", prefix,
                           {"PAYRAIL__DATABASE__POOL_WAIT_MS": "500", "PAYRAIL__DATABASE__CONNECT_TIMEOUT_MS": "500"})
    try:
        server.start()
        load = drill.Load(lambda: server.port, 8)
        load.start()
        time.sleep(args.seconds / 2)
        pg("stop")
        # While it is down: how fast, and with what, does payrail answer?
        latencies, statuses = [], {}
        until = time.monotonic() + args.seconds / 2
        while time.monotonic() < until:
            t = time.monotonic()
            status, _ = drill.create_confirm(server.port, 100, f"pgdown-{time.time_ns()}")
            latencies.append(time.monotonic() - t)
            statuses[status] = statuses.get(status, 0) + 1
        ready_down = drill.request(server.port, "GET", "/readyz")[0]
        pg("start")
        back = time.monotonic()
        while drill.request(server.port, "GET", "/readyz")[0] != 200 and time.monotonic() - back < 30:
            time.sleep(0.05)
        resumed_s = time.monotonic() - back
        time.sleep(args.seconds / 2)
        load.stop()
        acked = [a for a in load.acked if isinstance(a, dict)]
        ids = ",".join(f"'{a['payment_id']}'" for a in acked) or "''"
        present = int(drill.psql(db, f"SELECT count(*) FROM payments WHERE id IN ({ids})", port=port))
        clean, verify = server.verify_ledger()
        other_5xx = {s: n for s, n in statuses.items() if isinstance(s, int) and s >= 500 and s != 503}
        max_latency = max(latencies) if latencies else 0
        ok = (statuses.get(503, 0) > 0 and not other_5xx and max_latency < 2 and ready_down == 503
              and present == len(acked) and clean and resumed_s < 30)
        drill.verdict("PostgreSQL outage", ok, {
            "answers_while_down": statuses, "max_latency_while_down_s": f"{max_latency:.2f}", "readyz_while_down": ready_down,
            "ready_again_after_s": f"{resumed_s:.2f}", "acknowledged": len(acked), "present_after": present,
            "ledger": verify, "load_responses": load.statuses})
    finally:
        server.stop()
        pg("stop")
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
