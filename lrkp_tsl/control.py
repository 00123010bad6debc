"""The control server: lrkproxy commands from Kamailio -> call table -> kernel -> reply.

`Controller` is the glue and holds no sockets: it turns one request into a reply, applying
the call table's decisions to the data plane *before* replying, so an `OK` means the kernel
relays the call. The asyncio transports below only move bytes, check the allow-list and
replay retransmissions.

Kernel calls (one nftables transaction, a few conntrack deletions: ~0.25 ms) run inline in
the event loop: shorter than a thread hand-off, and it keeps commands strictly ordered.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import cast

from netfilterqueue import Packet

from lrkp_tsl import protocol
from lrkp_tsl.config import Config, ControlAddress
from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import Endpoint
from lrkp_tsl.protocol import (
    GetConfig,
    NodeConfig,
    Ping,
    ProtocolError,
    SetSession,
)
from lrkp_tsl.retransmit import RetransmitCache
from lrkp_tsl.session import Action, CallTable, KernelView, Verdict

log = logging.getLogger("lrkp_tsl.control")
calls_log = logging.getLogger("lrkp_tsl.calls")

# Kamailio retransmits for lrkproxy_retr x lrkproxy_tout (5 x 1 s by default).
RETRANSMIT_AGE = 30.0
RETRANSMIT_ENTRIES = 65536
UNIX_READ_TIMEOUT = 5.0
# A first packet whose peer is not latched yet waits at most this long, this many per call
# (RTP older than this is useless to a jitter buffer anyway).
HOLD_TIMEOUT = 2.0
HOLD_MAX_PER_CALL = 64


def _show(data: bytes, limit: int = 120) -> str:
    text = data[:limit].decode("ascii", "backslashreplace")
    return text + ("..." if len(data) > limit else "")


@dataclass(slots=True)
class HeldPacket:
    """A first packet whose sender is latched while the other party is not yet."""

    packet: Packet
    sender: Endpoint
    relay: Endpoint
    since: float


class Controller:
    """One request in, one reply out (or none), with the kernel updated in between; and one
    queued first packet in, one verdict out (now, or once the other party is known)."""

    def __init__(
        self,
        config: Config,
        table: CallTable,
        plane: DataPlane,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.table = table
        self.plane = plane
        self.clock = clock
        self.node_config = NodeConfig(
            config.ports.start,
            config.ports.end,
            config.ports.start,
            str(config.internal_ip),
            str(config.external_ip),
        )
        self.stats: collections.Counter[str] = collections.Counter()
        self.held: dict[str, list[HeldPacket]] = {}  # Call-ID -> packets, oldest first

    # -- control commands -------------------------------------------------------------------

    def handle(self, data: bytes, sender: str, *, with_cookie: bool = True) -> bytes | None:
        try:
            request = protocol.parse_request(data, with_cookie=with_cookie)
        except ProtocolError as error:
            self.stats[f"error.{error.code}"] += 1
            log.warning("bad request from %s: %s: %r", sender, error, _show(data))
            return protocol.reply_error(error)
        self.stats[f"request.{type(request).__name__}"] += 1
        if isinstance(request, Ping):
            return protocol.reply_pong(request)
        if isinstance(request, GetConfig):
            return protocol.reply_config(request, self.node_config)
        if not protocol.acknowledgeable(request):
            log.warning(
                "%s from %s is %d bytes: Kamailio cannot accept a reply that long",
                type(request).__name__,
                sender,
                len(request.raw),
            )
        try:
            if isinstance(request, SetSession):
                idle = self.config.idle_timeout or float(request.timeout) or 60.0
                self.apply(self.table.on_set(request.media, idle, self.clock()), sender)
            else:
                self.apply(self.table.on_delete(request.call_id), sender)
        except KernelError as error:
            self.stats["error.kernel"] += 1
            log.error("%s from %s not applied: %s", type(request).__name__, sender, error)
            return protocol.reply_refused(request, error.code, error.reason)
        return protocol.reply_ok(request)

    def apply(self, actions: list[Action], origin: str) -> None:
        """Apply `actions` to the kernel in order, recording each one that succeeded."""
        for action in actions:
            self.plane.sync(action.call_id, action.before, action.after)
            self.table.applied(action, self.clock())
            call = action.call
            if call is None:
                self.stats["calls.removed"] += 1
                calls_log.info("[%s] removed: %s", action.call_id, action.reason)
                for held in self.held.pop(action.call_id, []):
                    self.stats["packets.hold_dropped"] += 1
                    held.packet.drop()
                continue
            if action.reason in ("relaying", "updated"):
                self.stats[f"calls.{action.reason}"] += 1
                media = call.media
                calls_log.info(
                    "[%s] %s: caller %s <-> %s | callee %s <-> %s, idle timeout %g s (%s)",
                    media.call_id,
                    action.reason,
                    media.caller,
                    media.caller_relay,
                    media.callee,
                    media.callee_relay,
                    call.idle_timeout,
                    origin,
                )
            elif action.reason.startswith("re-adopted"):
                calls_log.info("[%s] %s", action.call_id, action.reason)
            self._release(action.call_id, action.after)

    def expire(self) -> None:
        self.apply(self.table.on_timer(self.clock()), "timer")

    # -- first packets ----------------------------------------------------------------------

    def on_packet(self, packet: Packet, source: Endpoint, relay: Endpoint) -> None:
        """A packet to a learning relay endpoint: latch, hold or drop it; never lose it
        while its call can still use it."""
        now = self.clock()
        decision = self.table.on_packet(source, relay, now, self._silent)
        if decision.event:
            self.stats[f"packets.{decision.event}"] += 1
        try:
            self.apply(decision.actions, f"packet from {source}")
        except KernelError as error:
            self.stats["error.kernel"] += 1
            log.error("first packet %s -> %s dropped: %s", source, relay, error)
            packet.drop()
            return
        call_id = self.table.owner(relay)
        if decision.event in ("learned", "relearned"):
            calls_log.info("[%s] %s %s at %s", call_id, decision.event, source, relay)
        elif decision.event == "stranger":
            log.debug("stranger %s -> %s dropped", source, relay)
        if decision.verdict is Verdict.ACCEPT:
            packet.accept()
        elif decision.verdict is Verdict.HOLD and call_id is not None:
            held = self.held.setdefault(call_id, [])
            if len(held) < HOLD_MAX_PER_CALL:
                held.append(HeldPacket(packet, source, relay, now))
                # Runs in the event loop (the queue's reader): time the drop from here.
                asyncio.get_running_loop().call_later(
                    HOLD_TIMEOUT + 0.01, lambda: self.expire_held(self.clock())
                )
            else:
                self.stats["packets.hold_dropped"] += 1
                packet.drop()
        else:
            packet.drop()

    def _silent(self, sender: Endpoint, relay: Endpoint) -> bool:
        return not self.plane.nft.is_seen(sender, relay)

    def _release(self, call_id: str, view: KernelView) -> None:
        """Accept held packets whose flow now exists, oldest first."""
        held = self.held.get(call_id)
        if not held:
            return
        keys = {(flow.sender, flow.relay) for flow in view.flows}
        waiting = []
        for item in held:
            if (item.sender, item.relay) in keys:
                self.stats["packets.released"] += 1
                item.packet.accept()
            else:
                waiting.append(item)
        if waiting:
            self.held[call_id] = waiting
        else:
            del self.held[call_id]

    def expire_held(self, now: float) -> None:
        """Drop held packets whose other party did not speak within HOLD_TIMEOUT."""
        for call_id in list(self.held):
            keep = []
            for item in self.held[call_id]:
                if now - item.since > HOLD_TIMEOUT:
                    self.stats["packets.hold_dropped"] += 1
                    item.packet.drop()
                else:
                    keep.append(item)
            if keep:
                self.held[call_id] = keep
            else:
                del self.held[call_id]


class UdpControl(asyncio.DatagramProtocol):
    """udp:/udp6: listeners: allow-list, retransmission replay, then the controller."""

    def __init__(self, controller: Controller, config: Config) -> None:
        self.controller = controller
        self.allow = config.allow
        self.cache = RetransmitCache(RETRANSMIT_ENTRIES, RETRANSMIT_AGE)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        host, port = str(addr[0]), addr[1]
        sender = f"{host}:{port}"
        stats = self.controller.stats
        if not any(ip_address(host.split("%")[0]) in net for net in self.allow):
            stats["dropped.not_allowed"] += 1
            log.warning("dropped %d bytes from %s: not in the allow list", len(data), sender)
            return
        now = self.controller.clock()
        cached = self.cache.lookup(addr, data, now)
        if cached is not None:
            stats["retransmissions"] += 1
            log.debug("retransmission from %s answered from cache", sender)
            self._send(cached, addr)
            return
        reply = self.controller.handle(data, sender)
        if reply is not None:
            self.cache.store(addr, data, reply, now)
            self._send(reply, addr)

    def _send(self, reply: bytes, addr: tuple[str | object, ...]) -> None:
        if self.transport is not None:
            self.transport.sendto(reply, addr)


async def open_control(
    address: ControlAddress, controller: Controller, config: Config
) -> asyncio.AbstractServer | asyncio.BaseTransport:
    """Start listening on `address`; the returned object's close() stops it."""
    loop = asyncio.get_running_loop()
    if address.scheme in ("udp", "udp6"):
        transport, _protocol = await loop.create_datagram_endpoint(
            lambda: UdpControl(controller, config), local_addr=(address.host, address.port)
        )
        return transport
    path = Path(address.path)
    if path.is_socket():
        path.unlink()  # left by a previous run; a live node would own the lock below

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """unix: mode: one connection per command, no cookie, one reply."""
        try:
            data = await asyncio.wait_for(
                reader.read(protocol.MAX_REQUEST_SIZE + 1), UNIX_READ_TIMEOUT
            )
            reply = controller.handle(data, f"unix:{path}", with_cookie=False)
            if reply is not None:
                writer.write(reply)
                await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            log.warning("unix:%s: connection dropped: %s", path, exc)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    os.chmod(path, 0o660)
    return server
