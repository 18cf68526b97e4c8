#!/usr/bin/env python3
"""A minimal Chrome DevTools Protocol client (stdlib only): opens a page in a running headless
Chromium, lets it run in real time, evaluates JavaScript in it and saves a screenshot.

Usage: cdp.py DEVTOOLS_PORT URL SECONDS SCREENSHOT.png EXPRESSION…
Each EXPRESSION must evaluate to true in the page after SECONDS, or the script exits 1."""
import base64
import http.client
import json
import os
import socket
import struct
import sys
import time


class Socket:
    def __init__(self, url):
        rest = url.split("://", 1)[1]
        hostport, path = rest.split("/", 1)
        host, port = hostport.split(":")
        self.s = socket.create_connection((host, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.s.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(head.decode(errors="replace"))
        self.next_id = 0

    def _read_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("the DevTools socket closed")
            buf += chunk
        return buf

    def _send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        head = bytes([0x81])
        n = len(data)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _recv(self):
        message = b""
        while True:
            b0, b1 = self._read_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read_exact(8))[0]
            message += self._read_exact(n)
            if b0 & 0x80:
                return json.loads(message)

    def call(self, method, **params):
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            m = self._recv()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(m["error"])
                return m.get("result", {})


def main():
    port, url, seconds, png, *checks = sys.argv[1:]
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
    conn.request("PUT", "/json/new?about:blank")
    target = json.loads(conn.getresponse().read())
    ws = Socket(target["webSocketDebuggerUrl"])
    ws.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
    ws.call("Page.enable")
    ws.call("Page.navigate", url=url)
    time.sleep(float(seconds))
    failed = []
    for expr in checks:
        r = ws.call("Runtime.evaluate", expression=expr, returnByValue=True)
        if r.get("result", {}).get("value") is not True:
            failed.append(expr)
    shot = ws.call("Page.captureScreenshot", format="png")
    with open(png, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    for expr in failed:
        print(f"FAIL: in the page, {expr} is not true")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
