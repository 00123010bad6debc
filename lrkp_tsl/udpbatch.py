"""The udp:/udp6: control listener: every datagram waiting when the socket wakes the loop is
read at once and handed to the socket's front-end as one batch (group commit: the engine's
Batch).

asyncio's datagram transport reads one datagram per turn of the event loop, so commands
that Kamailio's workers send at the same moment would each pay a kernel transaction of
their own. Reading them together lets the engine commit them in one; each reply is sent
after that commit, so an `OK` still means the kernel relays the call. A change's reply goes
as soon as it is committed (the front-end's `send`), before the engine's bookkeeping that
follows: the client does not wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrkp_tsl.server import Server

log = logging.getLogger("lrkp_tsl.server")

IP_FREEBIND = 15  # linux/in.h; socket.IP_FREEBIND exists only on newer Pythons

# Datagrams read per wake-up: more than a batch (the engine commits at most GROUP_MAX per
# transaction), few enough that one wake-up never holds the loop for long.
READ_MAX = 64
# Longer than any request (the engine drops those unread): the size is only checked there.
RECV_SIZE = 65535


class UdpBatchControl:
    """One UDP control socket read by the event loop in batches; `close()` stops it."""

    def __init__(self, server: Server, sock: socket.socket, protocol: str) -> None:
        self.server = server
        self.sock = sock
        self.protocol = protocol
        self.sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        self.sock.close()

    def _readable(self) -> None:
        batch: list[tuple[bytes, tuple[Any, ...]]] = []
        for _ in range(READ_MAX):
            try:
                data, addr = self.sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # an ICMP error of an earlier reply: nothing to read
                log.debug("control socket: %s", exc)
                continue
            if self.server.accept_from(data, addr):
                batch.append((data, addr))
        if not batch:
            return

        def send_now(index: int, reply: bytes) -> None:
            self._send(reply, batch[index][1])

        replies = self.server.datagrams(batch, self.protocol, send_now)
        for (_data, addr), reply in zip(batch, replies, strict=True):
            if reply is not None:
                self._send(reply, addr)

    def _send(self, reply: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.sock.sendto(reply, addr)
        except OSError as exc:
            self.server.stats["error.reply_send"] += 1
            log.warning("reply to %s:%s not sent: %s", addr[0], addr[1], exc)


def udp_socket(scheme: str, host: str, port: int, *, freebind: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port), as asyncio would have made it.

    `freebind` (IP_FREEBIND) binds even if `host` is not local (yet): a standby listens on a
    virtual IP before it owns it, and packets to it arrive once the address moves here.
    """
    family = socket.AF_INET6 if scheme == "udp6" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if freebind:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock
