#!/usr/bin/env python3
"""How far schemathesis got into payrail: per operation, how many requests it sent and how
many of them were answered 2xx, overall and in the stateful (link-following) phase.

Reads the NDJSON event stream that `schemathesis run --report ndjson` writes (schemathesis 4.x:
one JSON event per line; every `ScenarioFinished` event carries its recorder, with the
operation's label, the phase and each request with its response). Standard library only.

Usage: coverage.py EVENTS.ndjson [--openapi src/api/openapi.json] [--require-2xx]
With --openapi, operations the document lists but the run never called are shown with 0.
With --require-2xx, exits 1 if an operation not listed in HARD_TO_REACH never got a 2xx.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict

# Operations whose 2xx takes a chain of steps a short run may not complete, and what it takes.
# A run that misses any other operation's 2xx is marked NO 2xx.
HARD_TO_REACH = {
    "GET /api/v1/disputes/{id}": "a dispute, opened a second after a pm_card_createDispute payment is captured",
    "POST /api/v1/payments/{id}/approve": "a payment in_review: held by a review rule that no allow or block rule overrides",
    "POST /api/v1/payments/{id}/reject": "a payment in_review: held by a review rule that no allow or block rule overrides",
    "POST /sandbox/v1/payments/{reference}/complete_3ds": (
        "the psp_reference of a payment waiting for 3-D Secure (pm_card_threeDSecureRequired, confirmed)"
    ),
}


def load(path: str):
    """Yields (operation label, phase, status code or None) for every request sent."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            event = json.loads(line)
            finished = event.get("ScenarioFinished")
            if not finished:
                continue
            recorder = finished.get("recorder") or {}
            cases = recorder.get("cases") or {}
            for case_id, interaction in (recorder.get("interactions") or {}).items():
                # A stateful scenario calls many operations: each case names its own. Elsewhere the
                # scenario is one operation's, including the cases sent with another method to
                # check the 405 (those stay with the operation they were generated for).
                case = (cases.get(case_id) or {}).get("value") or {}
                if finished.get("phase") == "stateful" and case:
                    label = f"{case.get('method', '?').upper()} {case.get('path', '?')}"
                else:
                    label = recorder.get("label", "?")
                response = interaction.get("response")
                status = response.get("status_code") if response else None
                yield label, finished.get("phase", "?"), status


def documented_operations(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return [f"{m.upper()} {p}" for p, ops in doc.get("paths", {}).items() for m in ops if m in methods]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("events", help="the NDJSON report of a schemathesis run")
    parser.add_argument("--openapi", help="the OpenAPI document, to list operations never called")
    parser.add_argument("--require-2xx", action="store_true", help="fail if an operation expected to reach 2xx never did")
    args = parser.parse_args()

    sent: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    stateful_sent: Counter[str] = Counter()
    stateful_ok: Counter[str] = Counter()
    no_response: Counter[str] = Counter()
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    for label, phase, status in load(args.events):
        sent[label] += 1
        if status is None:
            no_response[label] += 1
            continue
        statuses[label][status] += 1
        is_ok = 200 <= status < 300
        ok[label] += is_ok
        if phase == "stateful":
            stateful_sent[label] += 1
            stateful_ok[label] += is_ok

    labels = list(documented_operations(args.openapi)) if args.openapi else []
    labels += sorted(set(sent) - set(labels))
    width = max([len(label) for label in labels] + [len("operation")])
    header = f"{'operation':<{width}}  {'cases':>6}  {'2xx':>6}  {'stateful':>8}  {'st. 2xx':>7}  statuses"
    print(header)
    print("-" * len(header))
    missing = []
    for label in labels:
        codes = " ".join(f"{code}×{n}" for code, n in sorted(statuses[label].items()))
        if no_response[label]:
            codes += f" none×{no_response[label]}"
        note = ""
        if ok[label] == 0:
            reason = HARD_TO_REACH.get(label)
            note = f"   (no 2xx: it needs {reason})" if reason else "   (NO 2xx)"
            if not reason:
                missing.append(label)
        print(
            f"{label:<{width}}  {sent[label]:>6}  {ok[label]:>6}  {stateful_sent[label]:>8}  {stateful_ok[label]:>7}  {codes}{note}"
        )
    print("-" * len(header))
    reached = sum(1 for label in labels if ok[label])
    print(
        f"{'total':<{width}}  {sum(sent.values()):>6}  {sum(ok.values()):>6}  {sum(stateful_sent.values()):>8}  "
        f"{sum(stateful_ok.values()):>7}  {reached}/{len(labels)} operations reached 2xx"
    )
    if args.require_2xx and missing:
        print(f"never answered 2xx: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
