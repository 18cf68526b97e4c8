#!/usr/bin/env -S python3 -u
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
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import drill  # noqa: E402


def serve(port_out, down, log_path):
    """The receiver, in a process of its own (the load's client threads would starve it of the
    GIL), on asyncio with keep-alive (Python's http.server manages a few hundred requests a
    second, which would measure the receiver, not payrail): answers 500 while `down` is set,
    else 200 and appends the event id to `log_path`."""
    import asyncio

    log = open(log_path, "a", buffering=1 << 16)

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                if down.value:
                    log.write("-\n")
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\ndown")
                else:
                    log.write(json.loads(body)["id"] + "\n")
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_out.value = server.sockets[0].getsockname()[1]

        async def flush():
            while True:
                await asyncio.sleep(0.2)
                log.flush()

        asyncio.create_task(flush())
        await server.serve_forever()

    asyncio.run(main())


class Receiver:
    """Controls the receiver process and reads what it got."""

    def __init__(self):
        import multiprocessing
        import tempfile

        self.log_path = tempfile.mktemp(prefix="payrail-receiver-", suffix=".log")
        open(self.log_path, "w").close()
        self._down = multiprocessing.Value("b", 0)
        port = multiprocessing.Value("i", 0)
        self.proc = multiprocessing.Process(target=serve, args=(port, self._down, self.log_path), daemon=True)
        self.proc.start()
        while port.value == 0:
            time.sleep(0.01)
        self.port = port.value
        self.refused_base = 0

    @property
    def down(self):
        return bool(self._down.value)

    @down.setter
    def down(self, value):
        self._down.value = 1 if value else 0

    def _lines(self):
        with open(self.log_path) as f:
            return f.read().split()

    def received(self):
        counts = {}
        for line in self._lines():
            if line != "-":
                counts[line] = counts.get(line, 0) + 1
        return counts

    @property
    def refused(self):
        return sum(1 for line in self._lines() if line == "-") - self.refused_base

    @refused.setter
    def refused(self, value):
        self.refused_base = sum(1 for line in self._lines() if line == "-") - value

    def stop(self):
        self.proc.terminate()
        os.unlink(self.log_path)


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
    up = time.monotonic()
    print(f"   receiver up; payments go on for {args.after} s")
    # The backlog: every event committed while the receiver was down.
    cleared, backlog, _ = wait_all_received(payrail, receiver, args.deadline)
    time.sleep(max(0.0, args.after - (time.monotonic() - up)))
    recovered, events, missing = wait_all_received(payrail, receiver, args.deadline)
    got = receiver.received()
    wanted = set(events)
    duplicates = sum(n - 1 for e, n in got.items() if e in wanted and n > 1)
    return {
        "events": len(events),
        "received": sum(1 for e in events if e in got),
        "missing": len(missing),
        "duplicates": duplicates,
        "refused_while_down": receiver.refused,
        "backlog_events": len(backlog),
        "backlog_received_within_s": round(cleared, 1) if cleared is not None else None,
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
        receiver.stop()
        drill.drop_database(db)
    drill.verdict("webhook receiver down", ok, {k: v for k, v in figures.items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
