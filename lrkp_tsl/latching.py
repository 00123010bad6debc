"""Which source addresses may speak for a party: the latching policy. Pure.

The controlling layer only knows SDP addresses. Behind NAT a party's media comes from
another port, or another address; the node learns it from the party's first packet. The
policy decides whose first packet counts, per leg (one party, one stream):

- `strict`: only the exact SDP ip:port, known from the start; nothing is learned.
- `ip`: the first packet from the SDP IP (any port): a port-remapping NAT, or Kamailio
  having put the client's public IP in the SDP (`custom_sdp_ip_avp`).
- `any`: the first packet from anywhere: symmetric NAT without a usable SDP IP.
- `auto` (default): decided per leg from the SDP address itself:
    * an address the node can reach directly — a public address, or one inside a network
      the node has a route to other than its default route — is trusted from the start
      (media may flow to it before it sends) and may be re-learned only from that same IP
      (a port-remapping NAT), so a stranger who sends first can never take its place;
    * any other address (private, CGNAT, link-local, unspecified, ...) cannot be what the
      node sees: the party is behind NAT, and its first packet, from wherever it comes,
      teaches the node its real address. This is what makes a phone behind NAT work when
      Kamailio passes its private SDP address unchanged (the common configuration).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from enum import Enum
from ipaddress import IPv4Address, IPv4Network

from lrkp_tsl.media import Endpoint


class Policy(Enum):
    STRICT = "strict"
    IP = "ip"
    ANY = "any"
    AUTO = "auto"


class Rule(Enum):
    """What a leg accepts as a new source."""

    EXACT = "exact"  # only the address it has (never learns)
    SAME_IP = "same-ip"  # any port of the SDP IP
    ANYWHERE = "anywhere"  # any address

    def accepts(
        self, source: Endpoint, sdp: Endpoint | None, anchor: IPv4Address | None = None
    ) -> bool:
        """Whether `source` may speak for a leg whose SDP address is `sdp` (None: unknown)
        and whose SAME_IP address is `anchor` instead of the SDP's (see `start`)."""
        if self is Rule.EXACT:
            return source == sdp
        if self is Rule.SAME_IP:
            if anchor is not None:
                return source.ip == anchor
            return sdp is not None and source.ip == sdp.ip
        return True


def reachable(ip: IPv4Address, routed: Sequence[IPv4Network]) -> bool:
    """True if the node can send to `ip` as it is (see the module docstring)."""
    return _reachable(ip, tuple(routed))


@functools.lru_cache(maxsize=65536)
def _reachable(ip: IPv4Address, routed: tuple[IPv4Network, ...]) -> bool:
    # Cached: `is_global` tests a dozen networks, and parties repeat (every S asks for 4).
    if any(ip in network for network in routed):
        return True
    return ip.is_global


def initial(
    policy: Policy, sdp: Endpoint, routed: Sequence[IPv4Network]
) -> tuple[Rule, Endpoint | None]:
    """(rule, address trusted from the start or None) for a new leg."""
    if policy is Policy.STRICT:
        return Rule.EXACT, sdp
    if policy is Policy.IP:
        return Rule.SAME_IP, None
    if policy is Policy.ANY:
        return Rule.ANYWHERE, None
    if reachable(sdp.ip, routed):
        return Rule.SAME_IP, sdp
    return Rule.ANYWHERE, None


def start(
    policy: Policy,
    sdp: Endpoint | None,
    routed: Sequence[IPv4Network],
    hint: IPv4Address | None = None,
) -> tuple[Rule, Endpoint | None, IPv4Address | None]:
    """(rule, address trusted from the start or None, anchor) for a new leg whose SDP
    address may be unknown (None: `c=0.0.0.0`) and whose signalling came from `hint` (ng's
    `received-from`; None: not known).

    The anchor is the IP a SAME_IP leg accepts instead of its SDP's. Only `auto` uses the
    hint, and only where it knows better than the SDP: a party whose SDP address the node
    cannot reach (behind NAT) but whose signalling came from an address it can (the NAT's
    public address) is learned from that address's first packet, not from anyone's
    (`HINT_GRACE` says when anyone's counts again). An unknown SDP address is learned from
    the first packet under `any` and `auto` (and from the hint's IP under `ip`); `strict`
    learns nothing, so such a leg is not relayed until the SDP names an address.
    """
    if sdp is not None and hint is None:
        rule, latched = initial(policy, sdp, routed)
        return rule, latched, None
    if policy is Policy.STRICT:
        return Rule.EXACT, sdp, None
    if policy is Policy.ANY:
        return Rule.ANYWHERE, None, None
    if policy is Policy.IP:
        if sdp is not None:
            return Rule.SAME_IP, None, None
        return (Rule.SAME_IP, None, hint) if hint is not None else (Rule.EXACT, None, None)
    if sdp is not None and reachable(sdp.ip, routed):
        return Rule.SAME_IP, sdp, None
    if hint is not None and reachable(hint, routed):
        return Rule.SAME_IP, None, hint
    return Rule.ANYWHERE, None, None


HINT_GRACE = 1.0
"""Seconds a leg anchored on its signalling's address (`start`) waits for a packet from
that address before the first packet from anywhere may teach it: media that does not come
from where the signalling did (a proxy between the party and Kamailio) is relayed all the
same, one second late, while a stranger who sprays the relay ports cannot take a NAT'd
party's place at the start of its stream."""
