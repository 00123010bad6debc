"""Many calls set up fast, and commands at a steady rate from a thread: a busy node.

`fill` sets up calls as a burst of `S` with a window of requests outstanding; `CommandLoad`
sends `S` and `D` at a fixed rate while a test looks at something else (a restart), and
retransmits an unanswered request as Kamailio does (same bytes, after `RETRANSMIT_AFTER`).
Both talk to the node over its real control socket, from a lab host.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from lrkp_lab.lab import Lab
from lrkp_lab.node import set_command

# lrkproxy's defaults: lrkproxy_tout 1 s, lrkproxy_retr 5.
RETRANSMIT_AFTER = 1.0
RETRANSMITS = 5


@dataclass(frozen=True)
class Block:
    """One call in lrkproxy's `gt=0` geometry: relay ports P (callee side) and P + 2
    (caller side), RTCP on the next ones; both parties reachable (latched at once)."""

    call_id: str
    port: int
    relay_ip: str
    caller: tuple[str, int]
    callee: tuple[str, int]

    def body(self, verb: str = "S") -> bytes:
        return set_command(
            verb, self.caller[0], self.relay_ip, self.relay_ip, self.callee[0],
            self.caller[1], self.port, self.port + 2, self.callee[1], self.call_id,
        )  # fmt: skip


def blocks(
    tag: str, first_port: int, count: int, relay_ip: str, caller: str, callee: str
) -> list[Block]:
    """`count` calls from `first_port` on, 4 ports each; Call-IDs `<tag>-<index>`."""
    return [
        Block(f"{tag}-{i}", first_port + 4 * i, relay_ip, (caller, 4000), (callee, 6000))
        for i in range(count)
    ]


def _prefix() -> bytes:
    return b"%d_" % (os.getpid() % 100000)


def fill(sock: socket.socket, control: tuple[str, int], bodies: Iterable[bytes],
         window: int = 64) -> int:  # fmt: skip
    """Send every body as one request, `window` outstanding at a time, until each is
    answered `OK` (retransmitted as Kamailio does). Returns how many were sent again."""
    pending: dict[bytes, tuple[bytes, bytes, float, int]] = {}  # cookie -> request
    todo = iter(enumerate(bodies))
    resent = 0
    exhausted = False
    while not exhausted or pending:
        while not exhausted and len(pending) < window:
            item = next(todo, None)
            if item is None:
                exhausted = True
                break
            cookie = _prefix() + b"%d" % (1_000_000 + item[0])
            datagram = cookie + b" " + item[1]
            sock.sendto(datagram, control)
            pending[cookie] = (item[1], datagram, time.monotonic(), 0)
        if not pending:
            break
        ready, _, _ = select.select([sock], [], [], 0.2)
        while ready:
            try:
                reply = sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            cookie, _, answer = reply.partition(b" ")
            request = pending.get(cookie)
            if request is not None and answer == request[0] + b"OK":
                del pending[cookie]
            elif request is not None and not answer.startswith(request[0]):
                raise RuntimeError(f"{request[0]!r} answered {answer!r}")
        now = time.monotonic()
        for cookie, (body, datagram, sent, tries) in list(pending.items()):
            if now - sent >= RETRANSMIT_AFTER:
                if tries >= RETRANSMITS:
                    raise RuntimeError(f"no OK for {body!r} after {tries + 1} sends")
                sock.sendto(datagram, control)
                resent += 1
                pending[cookie] = (body, datagram, now, tries + 1)
    return resent


@dataclass
class Request:
    body: bytes
    datagram: bytes
    first_sent: float
    last_sent: float
    tries: int = 1
    reply: bytes | None = None


@dataclass
class CommandLoad:
    """Send `commands` at `rate` per second from a thread, as Kamailio would: each request
    retransmitted after RETRANSMIT_AFTER while unanswered, at most RETRANSMITS times."""

    sock: socket.socket
    control: tuple[str, int]
    commands: Iterator[bytes]
    rate: float
    requests: dict[bytes, Request] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def on(cls, lab: Lab, host: str, ip: str, control: tuple[str, int],
           commands: Iterator[bytes], rate: float) -> CommandLoad:  # fmt: skip
        return cls(lab.udp_socket(host, ip, 0), control, commands, rate)

    def start(self) -> CommandLoad:
        self._thread = threading.Thread(target=self._run, name="command-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> CommandLoad:
        """Stop sending; replies still on their way are read for up to a second."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + 1.0
        while self.unanswered() and time.monotonic() < deadline:
            self._receive(0.05)
        self.sock.close()
        return self

    def answered(self, verb: bytes) -> list[bytes]:
        """Bodies of `verb` requests answered OK, in the order they were sent."""
        return [
            r.body
            for r in self.requests.values()
            if r.body.startswith(verb + b" ") and r.reply == r.body + b"OK"
        ]

    def unanswered(self) -> list[bytes]:
        return [r.body for r in self.requests.values() if r.reply is None]

    def refused(self) -> list[bytes]:
        return [
            r.reply
            for r in self.requests.values()
            if r.reply is not None and r.reply != r.body + b"OK"
        ]

    def _run(self) -> None:
        interval = 1.0 / self.rate
        due = time.monotonic()
        number = 0
        waiting: collections.deque[bytes] = collections.deque()  # by last send, oldest first
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= due:
                body = next(self.commands, None)
                if body is None:
                    return
                number += 1
                cookie = _prefix() + b"%d" % (5_000_000 + number)
                datagram = cookie + b" " + body
                self.sock.sendto(datagram, self.control)
                self.requests[cookie] = Request(body, datagram, now, now)
                waiting.append(cookie)
                due += interval
            while waiting:
                request = self.requests[waiting[0]]
                if request.reply is not None or request.tries > RETRANSMITS:
                    waiting.popleft()
                    continue
                if now - request.last_sent < RETRANSMIT_AFTER:
                    break
                self.sock.sendto(request.datagram, self.control)
                request.tries += 1
                request.last_sent = now
                waiting.append(waiting.popleft())
            self._receive(max(0.0, min(due - time.monotonic(), 0.05)))

    def _receive(self, wait: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], wait)
        while ready:
            try:
                reply = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            cookie, _, answer = reply.partition(b" ")
            request = self.requests.get(cookie)
            if request is not None and request.reply is None:
                request.reply = answer
