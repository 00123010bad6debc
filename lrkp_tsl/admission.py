"""What an `S` may ask of this node. Pure.

The codec (protocol.py) checks that a command is well formed; this module checks that it
makes sense for *this* node, because the kernel does exactly what the maps say: an element
for a relay address that is not the node's would DNAT arbitrary forwarded traffic, and a
relay port outside the node's range would never be admitted by the guard chain (a call
without media) or collide with another call's RTCP. Refusals carry a stable code, are
answered as `E <code> <reason>` and counted.

Rules:
- relay IPs (`dst_ip`, `snat_ip`) are the node's internal or external IP;
- relay ports and their RTCP port (+1) lie in the node's port range. A mismatch usually
  means Kamailio's `start_port`/`end_port` modparams (5.7+) name ports outside the node's
  `ports`: the reason says so and names the values that fit (start_port = the first port,
  end_port = the last whole 4-port block, what `G` reports). The whole `S` is refused, so
  a call is either relayed both ways or not at all, never half (docs/kamailio.md);
- party addresses (`src_ip`, `dnat_ip`) are unicast IPv4 a party can have: not 0.0.0.0/8,
  loopback, multicast, reserved or broadcast, and not one of the node's own relay IPs.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address

from lrkp_tsl.errors import LrkpError
from lrkp_tsl.media import RTCP_PORT_OFFSET, CallMedia, Endpoint, PortRange
from lrkp_tsl.ports import PortUse


class Refusal(LrkpError):
    """A well-formed command this node will not carry out; `code` is sent on the wire."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


_BROADCAST = IPv4Address("255.255.255.255")
FOREIGN_RELAY = "foreign-relay"
RELAY_PORT = "relay-port"
BAD_PARTY = "bad-party"
CODES = (FOREIGN_RELAY, RELAY_PORT, BAD_PARTY)


@dataclass(frozen=True, slots=True)
class NodeLimits:
    relay_addrs: Collection[IPv4Address]
    ports: PortRange


def check(media: CallMedia, limits: NodeLimits) -> None:
    """Raise Refusal if `media` asks for something this node must not do."""
    for field, relay in (("dst", media.callee_relay), ("snat", media.caller_relay)):
        if relay.ip not in limits.relay_addrs:
            mine = " or ".join(str(ip) for ip in limits.relay_addrs)
            raise Refusal(
                FOREIGN_RELAY, f"{field} {relay.ip} is not this node's relay address ({mine})"
            )
        _check_ports(field, relay, limits.ports)
    for field, party in (("src", media.caller), ("dnat", media.callee)):
        why = _not_a_party(party.ip, limits.relay_addrs)
        if why:
            raise Refusal(BAD_PARTY, f"{field}_ip {party.ip} is {why}")


def _check_ports(field: str, relay: Endpoint, ports: PortRange) -> None:
    for port in (relay.port, relay.port + RTCP_PORT_OFFSET):
        if port not in ports:
            raise Refusal(
                RELAY_PORT,
                f"{field}_port {relay.port} (RTCP {relay.port + RTCP_PORT_OFFSET}) is outside "
                f"this node's ports {ports}; if Kamailio sets start_port/end_port, they must "
                f"lie inside it: start_port {ports.start} and end_port "
                f"{PortUse(ports).last_block()} (as G says), or unset both",
            )


def _not_a_party(ip: IPv4Address, relay_addrs: Collection[IPv4Address]) -> str:
    """Why `ip` cannot be a party, or "" (by first octet: this runs for every S)."""
    if ip in relay_addrs:
        return "this node's own relay address"
    first = ip.packed[0]
    if first == 0:
        return "not a host address (0.0.0.0/8)"
    if first == 127:
        return "a loopback address"
    if 224 <= first <= 239:
        return "a multicast address"
    if ip == _BROADCAST:
        return "the broadcast address"
    if first >= 240:
        return "a reserved address (240.0.0.0/4)"
    return ""
