"""Sockets of the node's own host: what Kamailio's lrkproxy sockets, a resolver or an NTP
client beside the node are. They live in the node's namespace and take whatever port the
kernel gives them, unless told where to bind."""

from __future__ import annotations

import select
import socket
import time

from lrkp_lab.lab import Lab

CLIENTS = 40
# How long a local client waits for the node's reply before it counts it lost: a bound for a
# lost datagram, not a speed limit (replies take well under a millisecond here).
REPLY_WAIT = 5.0


def local_socket(
    lab: Lab, bind: tuple[str, int] | None = None, host: str = "relay"
) -> socket.socket:
    with lab.inside(host):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if bind is not None:
        try:
            sock.bind(bind)
        except OSError:
            sock.close()  # a failed bind must not leak a socket into later tests
            raise
    return sock


def ping(sock: socket.socket, cookie: bytes, wait: float = REPLY_WAIT) -> bytes | None:
    """`P` as lrkproxy sends it (cookie `<number>_<number>`), from a connected socket; the
    reply, or None if none came."""
    sock.send(cookie + b" P")
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return None
        reply = sock.recv(4096)
        if reply.startswith(cookie + b" "):
            return reply
    return None


def short_lived_clients(
    lab: Lab,
    control: tuple[str, int],
    bind: list[tuple[str, int]] | None = None,
    host: str = "relay",
) -> list[tuple[int, bool]]:
    """CLIENTS sockets, one after the other: each connects to the node's control socket,
    sends one `P` and closes. (local port, answered) of each. A reply is matched by its
    cookie (port and index): a late one to an earlier socket on the same port is not it."""
    results = []
    for index in range(CLIENTS):
        sock = local_socket(lab, bind[index] if bind else None, host)
        try:
            sock.connect(control)
            port = sock.getsockname()[1]
            cookie = b"%d_%d" % (port, index)
            results.append((port, ping(sock, cookie) == cookie + b" P PONG"))
        finally:
            sock.close()
    return results
