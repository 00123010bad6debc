from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from lrkp_tsl.errors import MediaError
from lrkp_tsl.media import CallMedia, Endpoint, Flow, PortRange, Stream


def ep(text: str) -> Endpoint:
    ip, port = text.split(":")
    return Endpoint(IPv4Address(ip), int(port))


# The worked call of lrkp-protocol.md §9.
WORKED = CallMedia(
    "a84b4c76e66710@10.0.0.21",
    caller=ep("10.0.0.21:4000"),
    caller_relay=ep("10.0.0.10:20002"),
    callee=ep("10.0.1.31:6000"),
    callee_relay=ep("10.0.0.10:20000"),
)


def test_flows_of_the_worked_call() -> None:
    assert WORKED.flows() == (
        Flow(
            Stream.RTP,
            ep("10.0.0.21:4000"),
            ep("10.0.0.10:20002"),
            ep("10.0.1.31:6000"),
            ep("10.0.0.10:20000"),
        ),
        Flow(
            Stream.RTP,
            ep("10.0.1.31:6000"),
            ep("10.0.0.10:20000"),
            ep("10.0.0.21:4000"),
            ep("10.0.0.10:20002"),
        ),
        Flow(
            Stream.RTCP,
            ep("10.0.0.21:4001"),
            ep("10.0.0.10:20003"),
            ep("10.0.1.31:6001"),
            ep("10.0.0.10:20001"),
        ),
        Flow(
            Stream.RTCP,
            ep("10.0.1.31:6001"),
            ep("10.0.0.10:20001"),
            ep("10.0.0.21:4001"),
            ep("10.0.0.10:20003"),
        ),
    )
    assert not WORKED.shared_port
    assert WORKED.relay_endpoints() == {
        ep("10.0.0.10:20000"),
        ep("10.0.0.10:20001"),
        ep("10.0.0.10:20002"),
        ep("10.0.0.10:20003"),
    }


def test_shared_port_flows_differ_by_sender_even_on_one_ip() -> None:
    relay = ep("10.0.0.10:20000")
    media = CallMedia("gt1", ep("10.0.0.21:4000"), relay, ep("10.0.0.21:6000"), relay)
    assert media.shared_port
    keys = [(flow.sender, flow.relay) for flow in media.flows()]
    assert len(set(keys)) == len(keys) == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"call_id": ""}, "empty Call-ID"),
        ({"caller": ep("10.0.0.21:65535")}, "RTCP port 65536"),
        ({"callee": ep("10.0.0.21:4000"), "callee_relay": ep("10.0.0.10:20002")}, "could not tell"),
    ],
)
def test_unrelayable_media_is_refused(change: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "call_id": WORKED.call_id,
        "caller": WORKED.caller,
        "caller_relay": WORKED.caller_relay,
        "callee": WORKED.callee,
        "callee_relay": WORKED.callee_relay,
    }
    fields.update(change)
    with pytest.raises(MediaError, match=message):
        CallMedia(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ip", "port", "message"),
    [
        ("10.0.0.300", "4000", "not an IPv4 address"),
        ("::1", "4000", "not an IPv4 address"),
        ("10.0.0.1", "x", "not a number"),
        ("10.0.0.1", "0", "outside 1-65535"),
        ("10.0.0.1", "65536", "outside 1-65535"),
    ],
)
def test_endpoint_parse_names_the_problem(ip: str, port: str, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        Endpoint.parse(ip, port, what="src")


def test_port_range() -> None:
    ports = PortRange(20000, 40000)
    assert 20000 in ports and 40000 in ports and 19999 not in ports
    with pytest.raises(MediaError):
        PortRange(40000, 20000)
