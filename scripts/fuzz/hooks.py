"""schemathesis hooks for scripts/fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

They supply what a JSON schema cannot say, so that generated requests get past the checks
that no schema states and reach payrail's logic; none of them makes an invalid request valid:

- Idempotency keys: the document says 1-255 printable ASCII characters, and generation keeps
  drawing the same short keys ("0", "A", ...), which payrail rightly answers 422 once the key
  was used for another request. Each valid key gets a unique suffix (keys the schema refuses
  are left alone, so they are still refused); one in ten is kept as drawn, so that replays and
  reuse are still exercised.
- Card expiry years: the sandbox tokenizer takes the current year to 20 years on, a window
  that moves, so the document cannot state it; the window is set here when the schema loads.
- Confirmation at creation: half the payment creations that leave `confirm` out get
  `confirm: true` (an explicit value is kept), so that more payments are authorized or
  captured and the operations on them (capture, refunds, disputes) get to run.
- Webhook signatures: for the `sandbox` and `stripe` providers, a request that carries a
  Stripe-Signature header is signed for real with the server's `[webhooks] secret` (taken from
  PAYRAIL__WEBHOOKS__SECRET, which fuzz.sh sets for the server too) over the exact bytes sent,
  so the event parser behind the signature check is fuzzed too. Requests without the header
  stay unsigned.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import random
import time
import uuid

import requests

import schemathesis

IDEMPOTENCY_HEADER = "Idempotency-Key"
PAYMENTS_PATH = "/api/v1/payments"
CONFIRM_AT_CREATION = 0.5
WEBHOOK_PATH = "/internal/webhooks/psp/{provider}"
TOKENIZER_PATH = "/sandbox/v1/payment_methods"
KEEP_AS_DRAWN = 0.1
_random = random.Random(os.environ.get("PAYRAIL_FUZZ_SEED", "payrail"))


@schemathesis.hook
def before_load_schema(context, raw_schema):
    year = datetime.datetime.now(datetime.timezone.utc).year
    card = raw_schema["paths"][TOKENIZER_PATH]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"
    ]["card"]["properties"]
    card["exp_year"]["minimum"] = year
    card["exp_year"]["maximum"] = year + 20


def _valid_key(key) -> bool:
    # What payrail accepts, after HTTP has dropped the spaces around a header value.
    return isinstance(key, str) and 1 <= len(key.strip(" \t")) and len(key) <= 255 and all(" " <= c <= "~" for c in key)


class StripeSignature(requests.auth.AuthBase):
    """Signs the prepared request's final body bytes: `t=<now>,v1=<HMAC-SHA256("t.body")>`."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        t = str(int(time.time()))
        mac = hmac.new(self.secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
        request.headers["Stripe-Signature"] = f"t={t},v1={mac}"
        return request


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers
    if headers:
        key = headers.get(IDEMPOTENCY_HEADER)
        if _valid_key(key) and _random.random() >= KEEP_AS_DRAWN:
            suffix = "-" + uuid.uuid4().hex
            headers[IDEMPOTENCY_HEADER] = key.strip(" \t")[: 255 - len(suffix)] + suffix
    if (
        case.operation.path == PAYMENTS_PATH
        and case.operation.method.upper() == "POST"
        and isinstance(case.body, dict)
        and "confirm" not in case.body
        and _random.random() < CONFIRM_AT_CREATION
    ):
        case.body["confirm"] = True
    if case.operation.path == WEBHOOK_PATH:
        secret = os.environ.get("PAYRAIL__WEBHOOKS__SECRET")
        provider = (case.path_parameters or {}).get("provider")
        if secret and provider in ("sandbox", "stripe") and headers and "Stripe-Signature" in headers:
            kwargs["auth"] = StripeSignature(secret)
