#!/usr/bin/env python3
"""What forwarding costs: payments are created on the first node (so it owns them), then half
are confirmed through that node (served locally) and half through another node (forwarded to
the owner over NATS request/reply), one request at a time, interleaved. Prints the median and
p90 latency of each and the difference. Standard library only.
Usage: scripts/bench/forwarding.py <owner base URL> <other base URL> [payments]"""

import http.client
import json
import statistics
import sys
import time
import uuid
from urllib.parse import urlparse


def client(url):
    u = urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=30)


def post(conn, path, body):
    headers = {"Authorization": "Bearer sk_test_demo", "Content-Type": "application/json",
               "Idempotency-Key": uuid.uuid4().hex}
    started = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r.status, json.loads(data), time.perf_counter() - started


def main():
    owner, other = client(sys.argv[1]), client(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    local, forwarded = [], []
    for i in range(n):
        status, body, _ = post(owner, "/api/v1/payments", {
            "order_id": f"fwd_{i}", "amount": {"value": 1000 + i, "currency": "USD"},
            "payment_method": "pm_card_visa", "capture_strategy": "manual"})
        assert status == 201, body
        via, into = (owner, local) if i % 2 == 0 else (other, forwarded)
        status, body, took = post(via, f"/api/v1/payments/{body['payment_id']}/confirm", {})
        assert status == 200, body
        into.append(took * 1000)
    q = lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))]
    for name, xs in (("local", local), ("forwarded", forwarded)):
        print(f"confirm {name:9}: n={len(xs)} median={statistics.median(xs):.2f} ms p90={q(xs, 0.9):.2f} ms")
    print(f"forwarding overhead: median {statistics.median(forwarded) - statistics.median(local):+.2f} ms, "
          f"p90 {q(forwarded, 0.9) - q(local, 0.9):+.2f} ms")


if __name__ == "__main__":
    main()
