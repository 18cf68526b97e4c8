#!/usr/bin/env python3
"""Parses an OpenMetrics exposition (stdin) with the Prometheus project's own strict parser
(prometheus_client.openmetrics.parser), from a venv this script makes on first use.

Usage: curl -s localhost:8080/metrics | scripts/checks/openmetrics.py
Prints the families it read and exits 0; prints the parser's complaint and exits 1.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, "..", "..", "target", "venv-checks")
PYTHON = os.path.join(VENV, "bin", "python")


def ensure_venv():
    if os.path.exists(os.path.join(VENV, ".ready")):
        return
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([PYTHON, "-m", "pip", "install", "-q", "prometheus_client==0.21.1"], check=True)
    open(os.path.join(VENV, ".ready"), "w").close()


def main():
    if sys.prefix != os.path.abspath(VENV):
        ensure_venv()
        os.execv(PYTHON, [PYTHON, os.path.abspath(__file__)] + sys.argv[1:])
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser's own complaint is the verdict
        print(f"invalid OpenMetrics: {e}")
        return 1
    for f in families:
        print(f"{f.type:10} {f.name} ({len(f.samples)} samples)")
    print(f"{len(families)} families parsed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
