"""The geometry of one relayed call: who sends where, and where the kernel forwards it.

Pure: no I/O. The data plane turns `Flow`s into nftables map elements; the session layer
builds `CallMedia` from an lrkproxy `S` command (field names follow lrkp-protocol.md §2.2).

One call has two parties and two relay endpoints:

    caller  --->  caller_relay (snat_ip:snat_port)   ==kernel==>  callee
    callee  --->  callee_relay (dst_ip:dst_port)     ==kernel==>  caller

and each party receives from the relay endpoint it sends to, so the relay is symmetric from
either side's view. RTCP runs the same way on every port + 1. In shared-port mode (`gt=1`)
both relay endpoints are the same `ip:port`; the flows then differ only by sender, which is
why every kernel key includes the sender's address and port.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address

from lrkp_tsl.errors import MediaError

RTCP_PORT_OFFSET = 1


class Stream(Enum):
    """Which of a call's two streams a flow carries."""

    RTP = "rtp"
    RTCP = "rtcp"


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """An IPv4 address and UDP port.

    Its hash is computed once: endpoints key every table of the node (owners, flows,
    conntrack keys), and IPv4Address hashes through hex(int(...)) on every call.
    """

    ip: IPv4Address
    port: int
    _hash: int = field(init=False, repr=False, compare=False)

    @classmethod
    def parse(cls, ip: str, port: int | str, *, what: str = "endpoint") -> Endpoint:
        """Build from untrusted text; raises MediaError naming `what` and the bad value."""
        try:
            addr = IPv4Address(ip)
        except ValueError:
            raise MediaError(f"{what}: {ip!r} is not an IPv4 address") from None
        text = str(port)
        if not (text.isascii() and text.isdigit() and len(text) <= 5):
            raise MediaError(f"{what}: port {port!r} is not a number")
        return cls(addr, int(text))

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise MediaError(f"port {self.port} is outside 1-65535")
        object.__setattr__(self, "_hash", hash((int(self.ip), self.port)))

    def __hash__(self) -> int:
        return self._hash

    def offset(self, delta: int) -> Endpoint:
        return Endpoint(self.ip, self.port + delta)

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Flow:
    """One direction of one stream, as the kernel relays it.

    A packet from `sender` to `relay` leaves the node from `relay_out` towards `target`.
    (`sender`, `relay`) is the exact kernel key; the reply direction of the same conntrack
    entry carries the other party's packets back, so one Flow per stream is enough for the
    kernel, but both directions are installed so that either party may send first.
    """

    stream: Stream
    sender: Endpoint
    relay: Endpoint
    target: Endpoint
    relay_out: Endpoint


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """What operators and tests need of one UDP entry: both tuples and the counters."""

    orig_src: Endpoint
    orig_dst: Endpoint
    reply_src: Endpoint
    reply_dst: Endpoint
    packets_orig: int | None
    packets_reply: int | None


@dataclass(frozen=True, slots=True)
class InstalledFlow:
    """A flow as found in the kernel: its comment (the Call-ID) and its endpoints; target
    or relay_out is None when one of the flow's two map elements is missing."""

    comment: str
    sender: Endpoint
    relay: Endpoint
    target: Endpoint | None
    relay_out: Endpoint | None


@dataclass(frozen=True, slots=True)
class CallMedia:
    """Addresses of one call, as Kamailio describes it in `S`/`D`."""

    call_id: str
    caller: Endpoint  # src_ip:src_port — the offerer's media address
    caller_relay: Endpoint  # snat_ip:snat_port — where the caller sends
    callee: Endpoint  # dnat_ip:dnat_port — the answerer's media address
    callee_relay: Endpoint  # dst_ip:dst_port — where the callee sends
    _relays: frozenset[Endpoint] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.call_id:
            raise MediaError("empty Call-ID")
        for name in ("caller", "caller_relay", "callee", "callee_relay"):
            endpoint: Endpoint = getattr(self, name)
            if endpoint.port + RTCP_PORT_OFFSET > 65535:
                raise MediaError(f"{name} {endpoint}: RTCP port {endpoint.port + 1} > 65535")
        if self.caller_relay == self.callee_relay and self.caller == self.callee:
            raise MediaError(
                f"shared relay port {self.caller_relay} with caller and callee both at "
                f"{self.caller}: the kernel could not tell their packets apart"
            )

    @property
    def shared_port(self) -> bool:
        """True in lrkproxy's `gt=1` mode: one relay endpoint serves both parties."""
        return self.caller_relay == self.callee_relay

    def relay_endpoints(self) -> frozenset[Endpoint]:
        """Every relay ip:port this call owns (RTP and RTCP); computed once, when asked
        (the call table keeps its own: session.Call)."""
        if self._relays is None:
            relays = frozenset(
                endpoint.offset(delta)
                for endpoint in (self.caller_relay, self.callee_relay)
                for delta in (0, RTCP_PORT_OFFSET)
            )
            object.__setattr__(self, "_relays", relays)
        assert self._relays is not None
        return self._relays

    def flows(self) -> tuple[Flow, ...]:
        """RTP and RTCP, caller-to-callee and callee-to-caller."""
        result = []
        for stream, delta in ((Stream.RTP, 0), (Stream.RTCP, RTCP_PORT_OFFSET)):
            caller, callee = self.caller.offset(delta), self.callee.offset(delta)
            caller_relay, callee_relay = (
                self.caller_relay.offset(delta),
                self.callee_relay.offset(delta),
            )
            result.append(Flow(stream, caller, caller_relay, callee, callee_relay))
            result.append(Flow(stream, callee, callee_relay, caller, caller_relay))
        return tuple(result)


@dataclass(frozen=True, slots=True)
class PortRange:
    """The node's relay port range, inclusive; Kamailio allocates ports from it."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (1 <= self.start <= 65535 and 1 <= self.end <= 65535):
            raise MediaError(f"port range {self.start}-{self.end} is not within 1-65535")
        if self.start > self.end:
            raise MediaError(f"port range {self.start}-{self.end} starts after it ends")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.start <= port <= self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"
