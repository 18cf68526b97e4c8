"""Shared plumbing for payrail's drills: start payrail (or a dependency) on loopback, send
requests, ask PostgreSQL, and report PASS/FAIL. Standard library only."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PSQL = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-At"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psql(db, sql, port=5432, host="127.0.0.1"):
    out = subprocess.run(["psql", "-h", host, "-p", str(port), "-U", "postgres", "-At", "-d", db, "-c", sql],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return out.stdout.strip()


class Payrail:
    """A payrail process with its own database, stream prefix and port."""

    def __init__(self, binary, database_url, prefix, env=None):
        self.binary, self.database_url, self.prefix, self.env = binary, database_url, prefix, env or {}
        self.proc, self.port = None, None

    def start(self, timeout=60):
        self.port = free_port()
        env = dict(os.environ, PAYRAIL__DATABASE__URL=self.database_url, PAYRAIL__SERVER__BIND=f"127.0.0.1:{self.port}",
                   PAYRAIL__NATS__STREAM_PREFIX=self.prefix, PAYRAIL__LOG__LEVEL="warn", **self.env)
        self.proc = subprocess.Popen([self.binary, "serve", "--config", os.path.join(ROOT, "config.toml")], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("payrail exited at start")
            try:
                if request(self.port, "GET", "/readyz")[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("payrail did not become ready")

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def verify_ledger(self):
        env = dict(os.environ, PAYRAIL__DATABASE__URL=self.database_url)
        out = subprocess.run([self.binary, "--config", os.path.join(ROOT, "config.toml"), "ledger", "verify"], env=env,
                             capture_output=True, text=True, timeout=120)
        return out.returncode == 0, out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip()


def request(port, method, path, body=None, key="sk_test_demo", idem=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    if idem:
        h["Idempotency-Key"] = idem
    conn.request(method, path, body=json.dumps(body) if isinstance(body, dict) else body, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, json.loads(data) if data else None
    except ValueError:
        return r.status, data.decode(errors="replace")


def create_confirm(port, amount, idem):
    body = {"order_id": f"drill_{idem[:20]}", "amount": {"value": amount, "currency": "USD"},
            "payment_method": "pm_card_visa", "confirm": True}
    return request(port, "POST", "/api/v1/payments", body, idem=idem)


def fresh_names(drill):
    tag = f"{int(time.time())}{uuid.uuid4().hex[:6]}"
    return f"payrail_drill_{drill}_{tag}", f"DRILL{drill.upper()}{tag}".upper()


def drop_database(name):
    subprocess.run(PSQL + ["-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], capture_output=True, timeout=60)


def binary(args):
    path = args.binary or os.path.join(ROOT, "target", "release", "payrail")
    if not args.binary:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return path


class Load:
    """Client threads doing create+confirm until stopped, keeping every 2xx they got."""

    def __init__(self, port_ref, threads):
        self.port_ref, self.threads, self.acked, self.statuses = port_ref, threads, [], {}
        self.lock, self.stop_flag, self.workers = threading.Lock(), threading.Event(), []

    def _run(self, n):
        i = 0
        while not self.stop_flag.is_set():
            i += 1
            idem = f"drill-{n}-{i}-{uuid.uuid4().hex[:8]}"
            try:
                status, body = create_confirm(self.port_ref(), 1000 + i, idem)
            except OSError:
                status, body = "connection_error", None
                time.sleep(0.05)
            with self.lock:
                self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
                if isinstance(status, int) and 200 <= status < 300:
                    self.acked.append(body)

    def start(self):
        for n in range(self.threads):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            t.start()
            self.workers.append(t)

    def stop(self):
        self.stop_flag.set()
        for t in self.workers:
            t.join(15)


def verdict(name, ok, figures):
    print(f"{'PASS' if ok else 'FAIL'} {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    sys.exit(0 if ok else 1)
