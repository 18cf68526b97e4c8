#!/usr/bin/env python3
"""Verifies payrail's `Payrail-Signature` headers with Stripe's own library: stripe-python's
`WebhookSignature.verify_header`, from a venv this script makes on first use. payrail signs
merchant webhooks exactly as Stripe signs its own, so a merchant can verify them with it.

Usage: a JSON list on stdin, one check per item:
    [{"payload": "<body as sent>", "header": "t=…,v1=…", "secret": "whsec_…", "expect": true}, …]
`tolerance` (seconds, default 300) may be given per item. Prints one line per check; exits 0
when every verdict is as expected, 1 otherwise.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, "..", "..", "target", "venv-stripe")
PYTHON = os.path.join(VENV, "bin", "python")


def ensure_venv():
    if os.path.exists(os.path.join(VENV, ".ready")):
        return
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([PYTHON, "-m", "pip", "install", "-q", "stripe==16.1.0"], check=True)
    open(os.path.join(VENV, ".ready"), "w").close()


def main():
    if sys.prefix != os.path.abspath(VENV):
        ensure_venv()
        os.execv(PYTHON, [PYTHON, os.path.abspath(__file__)] + sys.argv[1:])
    import stripe

    checks = json.load(sys.stdin)
    failed = 0
    for i, c in enumerate(checks):
        try:
            stripe.WebhookSignature.verify_header(c["payload"], c["header"], c["secret"], c.get("tolerance", 300))
            verdict = True
            why = "verified"
        except stripe.SignatureVerificationError as e:
            verdict = False
            why = str(e).splitlines()[0]
        ok = verdict == c.get("expect", True)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} check {i}: {why}")
    print(f"stripe {stripe.VERSION}: {len(checks) - failed} of {len(checks)} as expected")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
