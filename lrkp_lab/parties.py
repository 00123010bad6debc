"""Lab helpers: UDP parties that send, and receive with a bounded wait, recording the source."""

from __future__ import annotations

import select
from ipaddress import IPv4Address

from lrkp_lab.lab import Lab, address
from lrkp_tsl.media import Endpoint, PortRange

# The relay port range of the lab node: room for 10,000 calls on one relay IP.
PORTS = PortRange(20000, 59999)

# How long a receiver waits before it concludes a packet was not delivered. Not a
# performance bound: relayed packets arrive in well under a millisecond here.
SILENCE = 0.3
WAIT = 2.0


class Party:
    def __init__(self, lab: Lab, host: str, port: int, ip: IPv4Address | None = None) -> None:
        self.host = host
        self.endpoint = Endpoint(ip or address(host), port)
        self.sock = lab.udp_socket(host, self.endpoint.ip, port)

    def send(self, to: Endpoint, payload: bytes) -> None:
        self.sock.sendto(payload, (str(to.ip), to.port))

    def receive(self, timeout: float = WAIT) -> tuple[bytes, Endpoint] | None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data, (ip, port) = self.sock.recvfrom(65535)
        return data, Endpoint(IPv4Address(ip), port)

    def expect(self, payload: bytes) -> Endpoint:
        """Wait for `payload`; return the source it came from."""
        got = self.receive()
        assert got is not None, f"{self.host} at {self.endpoint} received nothing"
        data, source = got
        assert data == payload, f"{self.host} received {data!r}, expected {payload!r}"
        return source

    def expect_nothing(self) -> None:
        got = self.receive(SILENCE)
        assert got is None, f"{self.host} at {self.endpoint} received {got!r}"

    def close(self) -> None:
        self.sock.close()


class Peers:
    """Creates parties and closes them all at the end of a test."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.made: list[Party] = []

    def __call__(self, host: str, port: int, ip: IPv4Address | None = None) -> Party:
        party = Party(self.lab, host, port, ip)
        self.made.append(party)
        return party

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        for party in self.made:
            party.close()
