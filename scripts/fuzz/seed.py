#!/usr/bin/env python3
"""Test data for scripts/fuzz.sh that generated requests cannot make, or make only by luck.

- A dead letter: a correctly signed sandbox event about a payment that does not exist
  (`payment_intent.succeeded` for an unknown `pi_` reference). The event consumers retry it and,
  after `[nats] max_deliver` deliveries (a few seconds), park it as a dead letter; by the time
  the stateful phase runs, `GET /admin/v1/dead_letters` lists it and its link leads to a replay.
- A review rule for the demo merchant: its CHF payments are held for review (status
  `in_review`) when confirmed, so that approve and reject have payments to act on. Other
  currencies are untouched. Skipped when the server has no risk rules.

Usage: seed.py BASE_URL
Needs PAYRAIL__WEBHOOKS__SECRET (the server's webhook secret) and PAYRAIL_FUZZ_MERCHANT_KEY.
Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid


def post(url: str, body: dict, headers: dict) -> int:
    data = json.dumps(body).encode()
    if "Stripe-Signature" in headers:
        t = str(int(time.time()))
        mac = hmac.new(headers.pop("Stripe-Signature").encode(), t.encode() + b"." + data, hashlib.sha256)
        headers["Stripe-Signature"] = f"t={t},v1={mac.hexdigest()}"
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def main() -> int:
    base = sys.argv[1].rstrip("/")
    tag = uuid.uuid4().hex[:24]
    event = {
        "id": f"evt_fuzz_seed_{tag}",
        "type": "payment_intent.succeeded",
        "data": {"object": {"id": f"pi_fuzz_seed_{tag}", "object": "payment_intent"}},
    }
    status = post(
        f"{base}/internal/webhooks/psp/sandbox",
        event,
        {"Stripe-Signature": os.environ["PAYRAIL__WEBHOOKS__SECRET"]},
    )
    print(f"seed: a PSP event for an unknown payment, to become a dead letter: {status}")
    rule = {"action": "review", "predicate": ":currency: = 'CHF'", "description": "fuzz: hold CHF payments for review"}
    status = post(
        f"{base}/api/v1/risk/rules",
        rule,
        {"Authorization": f"Bearer {os.environ['PAYRAIL_FUZZ_MERCHANT_KEY']}", "Idempotency-Key": f"fuzz-seed-{tag}"},
    )
    print(f"seed: a review rule for CHF payments: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
