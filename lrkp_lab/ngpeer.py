"""Relays that speak ng, as the differential tests and benchmarks see them.

`NgPeer` is one request in, one decoded reply out. `UdpNgPeer` talks to a relay over UDP
(rtpengine, or the node once it serves `--ng`); `FrontEndPeer` runs lrkp_tsl.ng's pure
front-end in this process, with an in-memory port pool, for as long as the node does not
serve ng. Swapping one for the other is the only change a test makes.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import Any, Protocol

from lrkp_tsl.media import PortRange
from lrkp_tsl.ng.adapter import NgDecider
from lrkp_tsl.ng.allocator import SharedPortPool
from lrkp_tsl.ng.bencode import Encodable, Value, decode, encode
from lrkp_tsl.ng.callmodel import Interfaces, NgCalls
from lrkp_tsl.ports import PortUse


class NgPeer(Protocol):
    name: str

    def request(self, message: Mapping[str, Encodable]) -> dict[str, Any]:
        """Send one ng message; its reply with strings as text (Latin-1 for SDP bytes)."""


def text(value: Value) -> Any:
    """A decoded bencode value with every string as str (Latin-1: byte for byte)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, list):
        return [text(item) for item in value]
    if isinstance(value, dict):
        return {key.decode("latin-1"): text(item) for key, item in value.items()}
    return value


def _reply(data: bytes, cookie: bytes) -> dict[str, Any]:
    got, _, body = data.partition(b" ")
    if got != cookie:
        raise RuntimeError(f"reply for cookie {got!r}, expected {cookie!r}")
    decoded = text(decode(body))
    if not isinstance(decoded, dict):
        raise RuntimeError(f"reply is not a dictionary: {body[:80]!r}")
    return decoded


class UdpNgPeer:
    """An ng relay at `address`, over a UDP socket made by the caller (in a namespace)."""

    def __init__(
        self, name: str, sock: socket.socket, address: tuple[str, int], timeout: float = 5.0
    ) -> None:
        self.name = name
        self.sock = sock
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self._seq = itertools.count(1)
        self._prefix = f"{os.getpid()}_{id(self) % 100000}"

    def request(self, message: Mapping[str, Encodable]) -> dict[str, Any]:
        cookie = f"{self._prefix}_{next(self._seq)}".encode()
        self.sock.send(cookie + b" " + encode(message))
        while True:
            data = self.sock.recv(65535)
            if data.partition(b" ")[0] == cookie:
                return _reply(data, cookie)

    def close(self) -> None:
        self.sock.close()


class FrontEndPeer:
    """lrkp_tsl.ng's front-end in this process: every change is carried out at once."""

    def __init__(
        self,
        internal: IPv4Address,
        external: IPv4Address,
        ports: PortRange,
        name: str = "lrkp-tsl",
    ) -> None:
        self.name = name
        self.pool = SharedPortPool(PortUse(ports))
        interfaces = Interfaces({"internal": internal, "external": external})
        self.front_end = NgDecider(NgCalls(self.pool, interfaces))
        self._seq = itertools.count(1)
        self.now = 0.0

    def request(self, message: Mapping[str, Encodable]) -> dict[str, Any]:
        cookie = b"fe_%d" % next(self._seq)
        self.now += 0.01
        decision = self.front_end.decide(cookie + b" " + encode(message), self.now)
        reply = self.front_end.carried_out(decision) if decision.change else decision.reply
        if reply is None:
            raise RuntimeError("no reply: the request had no cookie")
        return _reply(reply, cookie)
