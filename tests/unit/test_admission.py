"""What an S may ask of this node: one test per rule, and what Kamailio sends passes."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from lrkp_tsl.admission import BAD_PARTY, FOREIGN_RELAY, RELAY_PORT, NodeLimits, Refusal, check
from lrkp_tsl.media import CallMedia, Endpoint, PortRange

INTERNAL, EXTERNAL = "10.0.0.10", "203.0.113.10"
LIMITS = NodeLimits(
    frozenset({IPv4Address(INTERNAL), IPv4Address(EXTERNAL)}), PortRange(30000, 30999)
)


def ep(text: str) -> Endpoint:
    ip, port = text.split(":")
    return Endpoint(IPv4Address(ip), int(port))


def media(
    caller: str = "10.0.0.21:4000",
    caller_relay: str = f"{INTERNAL}:30002",
    callee: str = "198.51.100.7:6000",
    callee_relay: str = f"{EXTERNAL}:30000",
) -> CallMedia:
    return CallMedia("cid@host", ep(caller), ep(caller_relay), ep(callee), ep(callee_relay))


@pytest.mark.parametrize(
    "good",
    [
        media(),  # gt=0, internal <-> external
        media(caller_relay=f"{INTERNAL}:30000", callee_relay=f"{INTERNAL}:30000"),  # gt=1
        media(caller_relay=f"{INTERNAL}:30998", callee_relay=f"{INTERNAL}:30996"),  # the end
        media(caller="192.168.1.20:4000"),  # a NAT'd party's private address: learned
        media(caller="100.64.0.9:4000"),  # CGNAT
    ],
)
def test_what_kamailio_sends_is_admitted(good: CallMedia) -> None:
    check(good, LIMITS)


@pytest.mark.parametrize(
    ("bad", "code", "reason"),
    [
        (media(callee_relay="8.8.8.8:53"), FOREIGN_RELAY, "dst 8.8.8.8 is not this node's"),
        (media(caller_relay="10.0.0.11:30002"), FOREIGN_RELAY, "snat 10.0.0.11"),
        (media(callee_relay=f"{EXTERNAL}:29999"), RELAY_PORT, "dst_port 29999"),
        (media(caller_relay=f"{INTERNAL}:31000"), RELAY_PORT, "snat_port 31000"),
        (media(caller_relay=f"{INTERNAL}:30999"), RELAY_PORT, r"RTCP 31000\) is outside"),
        (media(caller="0.0.0.0:4000"), BAD_PARTY, "src_ip 0.0.0.0 is not a host address"),
        (media(callee="127.0.0.1:6000"), BAD_PARTY, "dnat_ip 127.0.0.1 is a loopback"),
        (media(callee="224.0.0.1:6000"), BAD_PARTY, "multicast"),
        (media(caller="255.255.255.255:4000"), BAD_PARTY, "broadcast"),
        (media(caller="240.0.0.1:4000"), BAD_PARTY, "reserved"),
        (media(caller=f"{INTERNAL}:4000"), BAD_PARTY, "this node's own relay address"),
        (media(callee=f"{EXTERNAL}:6000"), BAD_PARTY, "this node's own relay address"),
    ],
)
def test_each_rule_refuses_with_its_code(bad: CallMedia, code: str, reason: str) -> None:
    with pytest.raises(Refusal, match=reason) as refused:
        check(bad, LIMITS)
    assert refused.value.code == code


def test_a_kamailio_port_range_past_the_node_is_refused_whole_naming_the_fix() -> None:
    """Kamailio's start_port/end_port (5.7+) hand out blocks P..P+3 up to end_port and one
    past it. A block whose callee side fits but whose caller side does not (P+2, P+3 past
    the node's last port) is refused as a whole, never installed half; the reason names
    the modparams that fit: start_port = the first port, end_port = G's last block."""
    check(media(callee_relay=f"{INTERNAL}:30996", caller_relay=f"{INTERNAL}:30998"), LIMITS)
    half = media(callee_relay=f"{INTERNAL}:30998", caller_relay=f"{INTERNAL}:31000")
    with pytest.raises(Refusal) as refused:
        check(half, LIMITS)
    assert refused.value.code == RELAY_PORT
    assert refused.value.reason == (
        "snat_port 31000 (RTCP 31001) is outside this node's ports 30000-30999; if Kamailio "
        "sets start_port/end_port, they must lie inside it: start_port 30000 and end_port "
        "30996 (as G says), or unset both"
    )
