"""Many calls set up fast, and commands at a steady rate from a thread: a busy node.

`fill` sets up calls as a burst of `S` with a window of requests outstanding; `CommandLoad`
sends `S` and `D` at a fixed rate while a test looks at something else (a restart), and
retransmits an unanswered request as Kamailio does (same bytes, after `RETRANSMIT_AFTER`).
Both talk to the node over its real control socket, from a lab host.
"""

from __future__ import annotations

import collections
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


_NUMBERS = itertools.count(1)


def _cookie() -> bytes:
    """A cookie as lrkproxy makes them (`<number>_<number>`), never used twice by this process:
    the node answers a cookie it has seen from its cache, whatever the body."""
    return b"%d_%d" % (os.getpid() % 100000, next(_NUMBERS))


@dataclass
class Filled:
    """What a fill needed beyond one request per body."""

    resent: int = 0  # requests sent again, their reply late or lost
    stray_replies: int = 0  # replies to a request already answered (to a copy sent again)


def fill(
    sock: socket.socket,
    control: tuple[str, int],
    bodies: Iterable[bytes],
    window: int = 64,
    on_ok: Callable[[int], None] | None = None,
) -> Filled:
    """Send every body as one request, `window` outstanding at a time, until each is
    answered with the request + `OK` (any other answer fails the fill at once). A request
    unanswered for RETRANSMIT_AFTER is sent again with the same bytes, as Kamailio does, at
    most RETRANSMITS times. `on_ok(n)` runs when the n-th body (from 0) is answered."""
    # cookie -> (n, body, datagram, last sent, times sent again)
    pending: dict[bytes, tuple[int, bytes, bytes, float, int]] = {}
    todo = iter(enumerate(bodies))
    done = Filled()
    exhausted = False
    while not exhausted or pending:
        while not exhausted and len(pending) < window:
            item = next(todo, None)
            if item is None:
                exhausted = True
                break
            number, body = item
            cookie = _cookie()
            datagram = cookie + b" " + body
            sock.sendto(datagram, control)
            pending[cookie] = (number, body, datagram, time.monotonic(), 0)
        if not pending:
            break
        oldest = min(sent for _n, _b, _d, sent, _t in pending.values())
        wait = max(0.0, oldest + RETRANSMIT_AFTER - time.monotonic())
        ready, _, _ = select.select([sock], [], [], wait)
        while ready:
            try:
                reply = sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            cookie, _, answer = reply.partition(b" ")
            request = pending.pop(cookie, None)
            if request is None:
                done.stray_replies += 1
                continue
            number, body = request[0], request[1]
            if answer != body + b"OK":
                raise RuntimeError(f"{body!r} answered {answer!r}")
            if on_ok is not None:
                on_ok(number)
        now = time.monotonic()
        for cookie, (number, body, datagram, sent, tries) in list(pending.items()):
            if now - sent < RETRANSMIT_AFTER:
                continue
            if tries >= RETRANSMITS:
                raise RuntimeError(f"no OK for {body!r} after {tries + 1} sends")
            sock.sendto(datagram, control)
            done.resent += 1
            pending[cookie] = (number, body, datagram, now, tries + 1)
    return done


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
        waiting: collections.deque[bytes] = collections.deque()  # by last send, oldest first
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= due:
                body = next(self.commands, None)
                if body is None:
                    return
                cookie = _cookie()
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
