"""The thin asyncio shell around the engine: sockets and kernel queues in, engine calls, replies
and packet verdicts out, one timer.

No decisions live here (engine.py has them). What does: reading sockets, the allow-list,
mapping queued packets to the opaque ids the engine holds, arming the engine's one
deadline, and making sure that nothing a callback raises ends the daemon or leaves a
queued packet without a verdict: every entry point runs under `guarded`, which logs the
first failure of each kind with its traceback (then every 1000th), counts it, and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any, cast

from netfilterqueue import Packet

from lrkp_tsl.config import Config, ControlAddress
from lrkp_tsl.dataplane.ctevents import ConntrackEvents
from lrkp_tsl.dataplane.queue import PacketQueue, unmarked
from lrkp_tsl.dataplane.role import freebind_udp_socket
from lrkp_tsl.engine import Engine
from lrkp_tsl.latency import Latency
from lrkp_tsl.operations import LRKPROXY, SendNow
from lrkp_tsl.protocol import MAX_REQUEST_SIZE
from lrkp_tsl.session import Verdict
from lrkp_tsl.udpbatch import UdpBatchControl, udp_socket

log = logging.getLogger("lrkp_tsl.server")

UNIX_READ_TIMEOUT = 5.0
# Stream events read per wake-up: a burst is handled over several loop turns.
EVENTS_PER_READ = 4096
ALLOWED_CACHE = 1024


class Server:
    def __init__(
        self,
        engine: Engine,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.stats = engine.stats
        self.packets: dict[int, Packet] = {}
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._failures: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.latency = Latency()  # command handling time (metrics.py)
        self._allowed: dict[str, bool] = {}  # allow-list answers by sender host

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._rearm()

    # -- error containment ---------------------------------------------------------------------

    def guarded(self, what: str, function: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """Run one entry point: (True, its result), or (False, None) after an unexpected
        exception, which is logged (the first of its kind with a traceback, then every
        1000th) and counted; the node carries on."""
        try:
            return True, function(*args)
        except Exception:
            count = self._failures.get(what, 0) + 1
            self._failures[what] = count
            self.stats[f"error.internal.{what}"] += 1
            if count == 1 or count % 1000 == 0:
                log.exception("internal error in %s (%d so far); the node carries on", what, count)
            return False, None
        finally:
            self._flush()

    def flush(self) -> None:
        """For work done outside an entry point (startup reconciliation)."""
        self._flush()

    def _flush(self) -> None:
        """Apply the engine's verdicts and re-arm its timer: after every input."""
        for packet_id, verdict in self.engine.take_verdicts():
            packet = self.packets.pop(packet_id, None)
            if packet is None:
                continue
            self.stats[f"queue.verdict.{verdict.value}"] += 1
            try:
                if verdict is Verdict.ACCEPT:
                    packet.set_mark(unmarked(packet.get_mark()))
                    packet.accept()
                else:
                    packet.drop()
            except Exception as exc:
                self.stats["error.verdict"] += 1
                log.error("verdict for a queued packet failed: %s", exc)
        self._rearm()

    def _rearm(self) -> None:
        if self._loop is None:
            return
        deadline = self.engine.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = None if deadline is None else self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.guarded("timer", self.engine.on_timer, self.clock())

    # -- inputs ----------------------------------------------------------------------------------

    def datagram(
        self,
        data: bytes,
        addr: tuple[Any, ...],
        *,
        with_cookie: bool = True,
        protocol: str = LRKPROXY,
    ) -> bytes | None:
        host = str(addr[0]) if addr else "unix"
        peer = f"{host}:{addr[1]}" if len(addr) > 1 else host
        front_end = self.engine.front_ends[protocol]
        started = time.perf_counter()
        _ok, replies = self.guarded(
            "control",
            lambda: front_end.on_datagrams([(data, addr, peer, with_cookie)], self.clock()),
        )
        self.latency.observe(time.perf_counter() - started)
        return cast(list[bytes | None], replies)[0] if replies is not None else None

    def datagrams(
        self,
        batch: list[tuple[bytes, tuple[Any, ...]]],
        protocol: str = LRKPROXY,
        send: SendNow | None = None,
    ) -> list[bytes | None]:
        """Datagrams read together from one UDP socket -> their replies (group commit),
        answered by the socket's protocol's front-end (through `send` as soon as a change
        is committed, if given: those come back None)."""
        items = [(data, addr, f"{addr[0]}:{addr[1]}", True) for data, addr in batch]
        front_end = self.engine.front_ends[protocol]
        started = time.perf_counter()
        sent_early = 0

        def timed(index: int, reply: bytes, early: SendNow) -> None:
            # A reply sent as soon as its change is committed: the client's wait ends here,
            # not after the bookkeeping that follows (what the histogram promises).
            nonlocal sent_early
            early(index, reply)
            self.latency.observe(time.perf_counter() - started)
            sent_early += 1

        sender = None if send is None else functools.partial(timed, early=send)
        _ok, replies = self.guarded(
            "control", lambda: front_end.on_datagrams(items, self.clock(), sender)
        )
        # The others waited for the whole group: that is their answer time.
        elapsed = time.perf_counter() - started
        for _ in range(len(batch) - sent_early):
            self.latency.observe(elapsed)
        return cast(list[bytes | None], replies) if replies is not None else [None] * len(batch)

    def accept_from(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        """The allow-list: False (counted, logged) for a sender not in it."""
        host = str(addr[0])
        if self.allowed(host):
            return True
        self.stats["dropped.not_allowed"] += 1
        self.engine.note_remote(
            self.clock(),
            "datagrams from senders not in the allow list",
            "dropped %d bytes from %s:%s: not in the allow list",
            len(data),
            host,
            addr[1],
        )
        return False

    def allowed(self, host: str) -> bool:
        """Whether `host` is in the allow list: decided once per sender, since the same few
        Kamailio workers send every command (the cache is bounded against spoofed floods)."""
        known = self._allowed.get(host)
        if known is None:
            try:
                address = ip_address(host.split("%")[0])
            except ValueError:
                return False
            known = any(address in net for net in self.config.allow)
            if len(self._allowed) >= ALLOWED_CACHE:
                self._allowed.clear()
            self._allowed[host] = known
        return known

    def on_queued(self, packet: Packet, source: Any, relay: Any) -> None:
        packet_id = next(self._ids)
        self.packets[packet_id] = packet
        ok, _ = self.guarded("queue", self.engine.on_packet, packet_id, source, relay, self.clock())
        if not ok and packet_id in self.packets:
            # A packet without a verdict would keep its queue slot until the node exits. If
            # the engine held it before failing, its later verdict finds no packet: ignored.
            self.packets.pop(packet_id).drop()
            self.stats["packets.dropped_after_error"] += 1

    def on_events(self, events: ConntrackEvents) -> None:
        def read() -> None:
            batch, overflowed = events.read(EVENTS_PER_READ)
            now = self.clock()
            if overflowed:
                self.engine.on_events_lost(now)
            if batch:
                self.engine.on_stream_events(batch, now)

        self.guarded("events", read)

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.guarded("shutdown", self.engine.shutdown)
        for packet in self.packets.values():
            with contextlib.suppress(Exception):
                packet.drop()
        self.packets.clear()


async def open_control(
    address: ControlAddress,
    server: Server,
    *,
    freebind: bool = False,
    protocol: str = LRKPROXY,
) -> asyncio.AbstractServer | asyncio.BaseTransport | UdpBatchControl:
    """Start listening on `address` for `protocol`'s commands; the returned object's
    close() stops it.

    `freebind`: bind even if the address is not on this host yet (a pair's VIP: the
    standby listens too, and answers once the VIP, and with it the traffic, moves here).
    """
    loop = asyncio.get_running_loop()
    if address.scheme in ("udp", "udp6"):
        # Read in batches, so that commands arriving together commit together (udpbatch).
        if address.scheme == "udp" and freebind:
            sock = freebind_udp_socket(address.host, address.port)
        else:
            sock = udp_socket(address.scheme, address.host, address.port)
        control = UdpBatchControl(server, sock, protocol)
        control.start(loop)
        return control
    path = Path(address.path)
    if path.is_socket():
        path.unlink()  # left by a previous run; a live node would hold the instance lock

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """unix: mode: one connection per command, no cookie, one reply."""
        try:
            data = await asyncio.wait_for(reader.read(MAX_REQUEST_SIZE + 1), UNIX_READ_TIMEOUT)
            reply = server.datagram(data, (f"unix:{path}",), with_cookie=False)
            if reply is not None:
                writer.write(reply)
                await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            log.warning("unix:%s: connection dropped: %s", path, exc)
        finally:
            writer.close()

    unix_server = await asyncio.start_unix_server(serve, path=str(path))
    os.chmod(path, 0o660)
    return unix_server


def attach_queue(server: Server, queue_num: int, loop: asyncio.AbstractEventLoop) -> PacketQueue:
    queue = PacketQueue(queue_num, server.on_queued, server.stats)
    queue.attach(loop)
    return queue
