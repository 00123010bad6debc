"""Calls set up as Kamailio would, and media counted exactly, for tests against the daemon."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.parties import Party
from lrkp_tsl.media import Endpoint

CONTROL = (str(INTERNAL_IP), 22333)
KAMAILIO_IP = "10.201.1.5"
# The node most call tests run: both relay IPs, ports 20000-21999, Kamailio on the allow list.
# Its kernel state outlives it (what a test of a restart needs)...
BASE_NODE_ARGS = (
    "--internal-ip", str(INTERNAL_IP), "--external-ip", str(EXTERNAL_IP),
    "--ports", "20000-21999", "--control", f"udp:{CONTROL[0]}:{CONTROL[1]}",
    "--allow", KAMAILIO_IP,
)  # fmt: skip
# ...unless it flushes it on its way out, as a test that runs it once wants.
NODE_ARGS = (*BASE_NODE_ARGS, "--flush-on-exit")


@contextlib.contextmanager
def running_node(lab: Lab, *args: str) -> Iterator[Node]:
    """A node in the relay namespace, answering `P`; stopped, and the relay and NAT boxes'
    conntrack cleared, at the end."""
    node = Node(lab, "relay", *args)
    client = Controller(lab, "sip", KAMAILIO_IP)
    try:
        node.wait_ready(CONTROL, client)
        yield node
    finally:
        client.close()
        node.close()
        for box in ("nat", "nat2"):
            lab.run(box, "conntrack", "-F", check=False)


class Call:
    """A call set up with `S`; the relay endpoints each party was told to use."""

    def __init__(
        self,
        kamailio: Controller,
        caller: Party,
        callee: Party,
        port: int,
        call_id: str,
        caller_side: str = "int",
        callee_side: str = "int",
        caller_sdp: Endpoint | None = None,
        control: tuple[str, int] = CONTROL,
    ) -> None:
        self.control = control
        self.call_id = call_id
        relay_ip = {"int": str(INTERNAL_IP), "ext": str(EXTERNAL_IP)}
        self.caller_relay = Endpoint.parse(relay_ip[caller_side], port + 2)
        self.callee_relay = Endpoint.parse(relay_ip[callee_side], port)
        sdp = caller_sdp or caller.endpoint
        body = set_command(
            "S", str(sdp.ip), str(self.callee_relay.ip), str(self.caller_relay.ip),
            str(callee.endpoint.ip), sdp.port, port, port + 2, callee.endpoint.port, call_id,
        )  # fmt: skip
        assert kamailio.command(body, self.control) == body + b"OK"
        self.body = body

    def delete(self, kamailio: Controller) -> None:
        """`D` with the same fields, as Kamailio 5.7+ sends it on BYE."""
        body = b"D" + self.body[1:]
        assert kamailio.command(body, self.control) == body + b"OK"


def burst(
    sender: Party, to: Endpoint, receiver: Party, expect_from: Endpoint, count: int, tag: bytes
) -> None:
    """`count` packets, each delivered exactly once, in order, from `expect_from`."""
    for seq in range(count):
        sender.send(to, b"%s-%d" % (tag, seq))
        assert receiver.expect(b"%s-%d" % (tag, seq)) == expect_from, (tag, seq)


def both_ways(
    caller: Party,
    caller_relay: Endpoint,
    callee: Party,
    callee_relay: Endpoint,
    count: int,
    caller_tag: bytes = b"A",
    callee_tag: bytes = b"B",
) -> None:
    """`count` exchanges: a packet from the caller, then one from the callee, each
    delivered exactly once, in order, from the relay endpoint the receiver was given."""
    for seq in range(count):
        caller.send(caller_relay, b"%s-%d" % (caller_tag, seq))
        assert callee.expect(b"%s-%d" % (caller_tag, seq)) == callee_relay, (caller_tag, seq)
        callee.send(callee_relay, b"%s-%d" % (callee_tag, seq))
        assert caller.expect(b"%s-%d" % (callee_tag, seq)) == caller_relay, (callee_tag, seq)


class Stream:
    """RTP-like packets at a fixed rate from one party to a relay endpoint, every arrival
    recorded at the other party: `lost()` counts exactly what did not arrive."""

    def __init__(self, sender: Party, to: Endpoint, receiver: Party, tag: bytes, rate: float = 50):
        self.sender, self.to, self.receiver, self.tag = sender, to, receiver, tag
        self.interval = 1.0 / rate
        self.sent: list[int] = []
        self.arrivals: dict[int, float] = {}
        self.sources: set[Endpoint] = set()
        self.foreign: list[bytes] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]

    def start(self) -> Stream:
        for thread in self._threads:
            thread.start()
        return self

    def _send(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sender.send(self.to, b"%s-%d" % (self.tag, seq))
            self.sent.append(seq)
            seq += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _receive(self) -> None:
        prefix = self.tag + b"-"
        while not (self._stop.is_set() and len(self.arrivals) >= len(self.sent)):
            got = self.receiver.receive(0.5)
            if got is None:
                if self._stop.is_set():
                    return
                continue
            data, source = got
            if data.startswith(prefix):
                self.arrivals[int(data[len(prefix) :])] = time.monotonic()
                self.sources.add(source)
            else:
                self.foreign.append(data)  # someone else's media: must never happen

    def stop(self) -> Stream:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        return self

    def __enter__(self) -> Stream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stopped also when the test fails mid-way: its threads must be gone before the
        parties' sockets close, or they report EBADF into the next test."""
        self.stop()

    def lost(self) -> list[int]:
        return [seq for seq in self.sent if seq not in self.arrivals]

    def longest_gap(self) -> float:
        times = sorted(self.arrivals.values())
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)
