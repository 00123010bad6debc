"""Media for a SIPp call (lrkp_lab.kamailio): each party sends from its SDP port to the relay
address the SDP it received gave it, exactly as a phone does."""

from __future__ import annotations

from lrkp_lab.calls import both_ways
from lrkp_lab.kamailio import Call, Sdp
from lrkp_lab.lab import Lab
from lrkp_lab.parties import Party, Peers
from lrkp_tsl.media import Endpoint


def endpoint(sdp: Sdp) -> Endpoint:
    """Where the SDP says media goes (its first audio stream), as the node's Endpoint."""
    return Endpoint.parse(*sdp.endpoint)


def parties(
    peers: Peers, made: Call, caller_sdp: Sdp, callee_sdp: Sdp
) -> tuple[Party, Endpoint, Party, Endpoint]:
    """The call's two parties, each on its SDP port, and the relay endpoint the SDP it
    received gave it: (caller, caller's relay endpoint, callee, callee's), in the order
    `burst` and `both_ways` take them."""
    caller = peers(made.caller_host, made.caller_rtp[1])
    callee = peers(made.callee_host, made.callee_rtp[1])
    return caller, endpoint(caller_sdp), callee, endpoint(callee_sdp)


def media_both_ways(
    lab: Lab, made: Call, caller_sdp: Sdp, callee_sdp: Sdp, packets: int = 20
) -> None:
    """RTP both ways; every packet arrives, from the relay address the receiver was given."""
    with Peers(lab) as peers:
        both_ways(*parties(peers, made, caller_sdp, callee_sdp), packets, b"RTP-A", b"RTP-B")
