#!/usr/bin/env python3
"""Deletes JetStream streams by name, with the NATS wire protocol alone (no client library):
one PUB to $JS.API.STREAM.DELETE.<name> each, then a PING to make sure they were read.
Usage: scripts/fuzz/drop_streams.py NAME [NAME …]   (NATS on 127.0.0.1:4222)"""
import socket
import sys


def main(names):
    s = socket.create_connection(("127.0.0.1", 4222), timeout=5)
    s.recv(4096)  # INFO
    out = b'CONNECT {"verbose":false,"pedantic":false}\r\n'
    for name in names:
        out += f"PUB $JS.API.STREAM.DELETE.{name} 0\r\n\r\n".encode()
    s.sendall(out + b"PING\r\n")
    buf = b""
    while b"PONG" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    s.close()


if __name__ == "__main__":
    main(sys.argv[1:])
