"""ng calls set up as Kamailio's rtpengine module does it, for tests against the daemon:
an offer on the INVITE, an answer on the 200, a re-offer on a re-INVITE, a delete on BYE."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from lrkp_lab.calls import KAMAILIO_IP
from lrkp_lab.lab import Lab
from lrkp_lab.ngpeer import UdpNgPeer
from lrkp_lab.parties import Party
from lrkp_tsl.media import Endpoint
from lrkp_tsl.ng.bencode import Encodable

NAT_OUTSIDE = "10.201.1.20"  # the caller's NAT box (host `c` is behind it), as a relay sees it


@contextlib.contextmanager
def kamailio_ng(
    lab: Lab, name: str, address: tuple[str, int], timeout: float = 5.0
) -> Iterator[UdpNgPeer]:
    """An ng peer where Kamailio is in the lab (host `sip`, KAMAILIO_IP: the allow list's
    address), talking to the ng socket at `address`; closed on exit."""
    peer = UdpNgPeer(name, lab.udp_socket("sip", KAMAILIO_IP, 0), address, timeout)
    try:
        yield peer
    finally:
        peer.close()


def sdp(party: Party, *streams: tuple[str, int], attributes: tuple[str, ...] = ()) -> str:
    """An SDP offer or answer: one m= line per (kind, port), at the party's address, each
    with `attributes` (e.g. "sendonly" for a hold, "rtcp-mux")."""
    ip = party.endpoint.ip
    lines = ["v=0", f"o=- 1 1 IN IP4 {ip}", "s=-", f"c=IN IP4 {ip}", "t=0 0"]
    for kind, port in streams:
        payload = "0" if kind == "audio" else "96"
        lines.append(f"m={kind} {port} RTP/AVP {payload}")
        if kind == "video":
            lines.append("a=rtpmap:96 VP8/90000")
        lines += [f"a={attribute}" for attribute in attributes]
    return "".join(line + "\r\n" for line in lines)


def relay_ports(reply: dict[str, Any]) -> list[tuple[str, int]]:
    """(address, port) of each m= line of a rewritten SDP."""
    body = reply["sdp"]
    address = re.search(r"^c=IN IP4 (\S+)", body, re.M)
    assert address is not None, body
    return [(address.group(1), int(port)) for port in re.findall(r"^m=\w+ (\d+) ", body, re.M)]


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("result") == "ok", reply
    return reply


def received_from(party: Party) -> str:
    """The address Kamailio saw the party's signalling come from (`$si`): its NAT box's
    outside address for the NAT'd caller `c`."""
    return NAT_OUTSIDE if party.host == "c" else str(party.endpoint.ip)


class NgCall:
    """A call set up over ng as Kamailio's rtpengine module does it (offer on the INVITE,
    answer on the 200): the relay endpoints each party was told, per stream."""

    def __init__(
        self,
        kamailio: UdpNgPeer,
        caller: Party,
        callee: Party,
        call_id: str,
        kinds: tuple[str, ...] = ("audio", "video"),
        attributes: tuple[str, ...] = (),
        ringing: bool = False,
    ) -> None:
        """`ringing`: the offer only (the callee's phone rings); `answered` completes it."""
        self.kamailio, self.call_id = kamailio, call_id
        self.caller, self.callee, self.kinds = caller, callee, kinds
        self.attributes = attributes
        self.offer = self.offered()
        # The callee sends to what the offer told it; the caller to what the answer did.
        self.callee_relays = [Endpoint.parse(ip, port) for ip, port in relay_ports(self.offer)]
        self.caller_relays: list[Endpoint] = []
        if not ringing:
            self.answered()

    def offered(self, attributes: tuple[str, ...] = ()) -> dict[str, Any]:
        """The offer (again, for a re-INVITE: "sendonly" in `attributes` is a hold)."""
        ports = [(k, self.caller.endpoint.port + 2 * i) for i, k in enumerate(self.kinds)]
        return ok(self.kamailio.request({
            **self._common(), "command": "offer",
            "sdp": sdp(self.caller, *ports, attributes=(*self.attributes, *attributes)),
            "direction": ["internal", "external"],
            "received-from": ["IP4", received_from(self.caller)],
        }))  # fmt: skip

    def answered(self, attributes: tuple[str, ...] = ()) -> dict[str, Any]:
        """The answer (to a re-INVITE too); the caller's relay endpoints are what it says."""
        ports = [(k, self.callee.endpoint.port + 2 * i) for i, k in enumerate(self.kinds)]
        self.answer = ok(self.kamailio.request({
            **self._common(), "command": "answer", "to-tag": "callee-tag",
            "sdp": sdp(self.callee, *ports, attributes=(*self.attributes, *attributes)),
            "direction": ["external", "internal"],
            "received-from": ["IP4", received_from(self.callee)],
        }))  # fmt: skip
        self.caller_relays = [Endpoint.parse(ip, port) for ip, port in relay_ports(self.answer)]
        return self.answer

    def negotiate(self, attributes: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
        """A re-INVITE's offer and answer (`attributes` ("sendonly") on the offer, and its
        counterpart ("recvonly") on the answer: a hold); both replies."""
        back = tuple("recvonly" if a == "sendonly" else a for a in attributes)
        return self.offered(attributes), self.answered(back)

    def _common(self) -> dict[str, Encodable]:
        return {
            "call-id": self.call_id, "from-tag": "caller-tag", "ICE": "remove",
            "replace": ["origin", "session-connection"],
        }  # fmt: skip

    def query(self) -> dict[str, Any]:
        return ok(self.kamailio.request({"command": "query", "call-id": self.call_id}))

    def delete(self) -> dict[str, Any]:
        return ok(self.kamailio.request({"command": "delete", "call-id": self.call_id,
                                         "from-tag": "caller-tag"}))  # fmt: skip
