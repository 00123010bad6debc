"""Bounded UDP sender and receiver for the throughput benchmark (run inside lab hosts).

    udp_roles.py recv IP PORT MAX_S IDLE_S       count packets until idle or deadline
    udp_roles.py send IP PORT DST_IP DST_PORT COUNT SIZE

Each prints one JSON line. Every loop is bounded by a count or a deadline.
"""

from __future__ import annotations

import json
import socket
import sys
import time

SO_RCVBUFFORCE = 33


def receive(ip: str, port: int, max_s: float, idle_s: float) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    sock.bind((ip, port))
    sock.settimeout(max_s)
    count, first, last = 0, 0.0, 0.0
    deadline = time.monotonic() + max_s
    try:
        sock.recv(4096)
        count, first = 1, time.monotonic()
        last = first
        sock.settimeout(idle_s)
        while time.monotonic() < deadline:
            sock.recv(4096)
            count += 1
            last = time.monotonic()
    except TimeoutError:
        pass
    span = last - first
    return {"received": count, "pps": round(count / span) if span > 0 else 0}


def send(ip: str, port: int, dst: tuple[str, int], count: int, size: int) -> dict[str, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, port))
    payload = b"\x80" + b"\0" * (size - 1)
    errors = 0
    started = time.monotonic()
    for _ in range(count):
        try:
            sock.sendto(payload, dst)
        except OSError:
            errors += 1
    span = time.monotonic() - started
    return {"sent": count, "errors": errors, "pps": round(count / span)}


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "recv":
        result = receive(args[0], int(args[1]), float(args[2]), float(args[3]))
    else:
        result = send(args[0], int(args[1]), (args[2], int(args[3])), int(args[4]), int(args[5]))
    print(json.dumps(result), flush=True)
