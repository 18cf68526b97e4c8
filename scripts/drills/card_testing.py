#!/usr/bin/env python3
"""Drill: a card-testing attack. 5,000 authorizations of $1, each with a different card, all
from one IP, mixed with legitimate customers paying from their own IPs. With the built-in
card-testing rules on (and no rule of the merchant's), at least 99 % of the attack must be
blocked once the threshold is passed, no legitimate payment may be blocked, and every blocked
attempt is a PSP call saved (checked in psp_attempts). Usage:
scripts/drills/card_testing.py [--attack 5000] [--legit 300] [--threads 8] [--binary …]"""

import argparse
import threading
import uuid

import drill


def luhn(body):
    total = 0
    for i, d in enumerate(reversed([int(c) for c in body])):
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return body + str((10 - total % 10) % 10)


def card(n):
    # Away from the sandbox's own test numbers (4000000000000002 declines, …).
    return luhn(f"400000{n + 100000:09d}")


def tokenize(port, number):
    status, body = drill.request(port, "POST", "/sandbox/v1/payment_methods",
                                 {"card": {"number": number, "exp_month": 12, "exp_year": 2031, "cvc": "123"}})
    assert status == 201, (status, body)
    return body["id"]


def pay(port, amount, token, ip, email):
    body = {"order_id": "drill_ct", "amount": {"value": amount, "currency": "USD"}, "payment_method": token,
            "confirm": True, "customer": {"ip": ip, "email": email}}
    status, resp = drill.request(port, "POST", "/api/v1/payments", body, idem=uuid.uuid4().hex)
    return status, resp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--attack", type=int, default=5000)
    p.add_argument("--legit", type=int, default=300)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--binary")
    args = p.parse_args()
    bin_path = drill.binary(args)
    db, prefix = drill.fresh_names("cardtest")
    server = drill.Payrail(bin_path, f"postgres://postgres@127.0.0.1:5432/{db}", prefix,
                           {"PAYRAIL__PSP__SANDBOX__WEBHOOKS": "false"})
    results = {"attack": [], "legit": []}
    lock = threading.Lock()
    try:
        server.start()
        port = server.port
        # The attacker's cards, tokenized first (as a card tester's script would, at the tokenizer).
        attack_tokens = [tokenize(port, card(n)) for n in range(args.attack)]
        legit_tokens = [tokenize(port, card(1_000_000 + n)) for n in range(args.legit)]
        jobs = [("attack", 100, t, "203.0.113.66", "x@tester.example") for t in attack_tokens]
        # Legitimate customers: each from its own IP, real amounts; interleaved with the attack.
        for i, t in enumerate(legit_tokens):
            jobs.insert((i * len(jobs)) // max(1, len(legit_tokens)),
                        ("legit", 2500 + i, t, f"198.51.{i // 250}.{i % 250 + 1}", f"customer{i}@shop.example"))
        order = iter(jobs)
        next_lock = threading.Lock()

        def worker():
            while True:
                with next_lock:
                    job = next(order, None)
                if job is None:
                    return
                kind, amount, token, ip, email = job
                status, body = pay(port, amount, token, ip, email)
                with lock:
                    results[kind].append((status, body))

        threads = [threading.Thread(target=worker) for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        attack, legit = results["attack"], results["legit"]
        blocked = sum(1 for s, b in attack if s == 201 and (b.get("failure") or {}).get("code") == "blocked")
        threshold = 5  # the built-in rule: a sixth card from one IP within the hour
        after = max(1, len(attack) - threshold)
        legit_blocked = sum(1 for s, b in legit if s == 201 and (b.get("failure") or {}).get("code") == "blocked")
        legit_ok = sum(1 for s, b in legit if s == 201 and b.get("status") == "captured")
        errors = sum(1 for s, _ in attack + legit if s != 201)
        out = drill.psql(db, "SELECT count(*) FROM psp_attempts WHERE operation = 'authorize'").strip()
        authorize_calls = int(out or 0)
        ratio = blocked / after
        ledger_ok, ledger = server.verify_ledger()
        ok = ratio >= 0.99 and legit_blocked == 0 and legit_ok == len(legit) and errors == 0 and ledger_ok \
            and authorize_calls == len(attack) + len(legit) - blocked
        drill.verdict("card testing from one IP", ok, {
            "attack": len(attack), "blocked": blocked, "blocked_after_threshold": f"{ratio:.4f}",
            "legit": len(legit), "legit_captured": legit_ok, "legit_blocked": legit_blocked,
            "psp_calls_saved": blocked, "authorize_calls": authorize_calls, "non_201": errors, "ledger": ledger})
    finally:
        server.stop()
        drill.drop_database(db)


if __name__ == "__main__":
    main()
