"""Media for a SIPp call (lrkp_lab.kamailio): each party sends from its SDP port to the relay
address the SDP it received gave it, exactly as a phone does."""

from __future__ import annotations

from lrkp_lab.calls import both_ways
from lrkp_lab.kamailio import Call, Sdp
from lrkp_lab.lab import Lab
from lrkp_lab.parties import Peers
from lrkp_tsl.media import Endpoint


def endpoint(sdp: Sdp) -> Endpoint:
    """Where the SDP says media goes (its first audio stream), as the node's Endpoint."""
    return Endpoint.parse(*sdp.endpoint)


def media_both_ways(
    lab: Lab, made: Call, caller_sdp: Sdp, callee_sdp: Sdp, packets: int = 20
) -> None:
    """RTP both ways; every packet arrives, from the relay address the receiver was given."""
    with Peers(lab) as peers:
        caller = peers(made.caller_host, made.caller_rtp[1])
        callee = peers(made.callee_host, made.callee_rtp[1])
        both_ways(
            caller, endpoint(caller_sdp), callee, endpoint(callee_sdp), packets, b"RTP-A", b"RTP-B"
        )
