"""A conntrack table that runs full, for real: the node warns before, counts the drops, and
its metrics show both.

`nf_conntrack_max` cannot be lowered here: on this kernel (6.x) it is global and writable
only from the host's initial network namespace, which other work on the machine shares.
What the kernel holds against it is each namespace's own count (`nf_conntrack_count`), so
the test fills the count of the lab's relay2 namespace instead: assured entries made over
ctnetlink (the kernel never evicts an assured entry to make room), up to 100 short of the
limit, then to the limit. A call's new stream then finds no room: its packets are dropped by
the kernel, as on a real host whose table is full.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, Node, clear_host, set_command
from lrkp_lab.parties import Peers
from lrkp_lab.scraping import metrics
from lrkp_tsl.ctcapacity import ENTRIES_PER_CALL
from lrkp_tsl.media import Endpoint

HOST = "relay2"
RELAY_IP = "10.201.1.2"
CONTROL = (RELAY_IP, 22333)
KAMAILIO_IP = "10.201.1.5"
METRICS = 9734
PORTS = (30000, 30999)  # 250 calls: up to 500 entries
NEEDED = ENTRIES_PER_CALL * (PORTS[1] - PORTS[0] + 1) // 4
# Enough entries for every machine this runs on (~300 bytes each in the kernel).
MAX_FILL = 1_100_000

NETLINK_NETFILTER = 12
IPCTNL_MSG_CT_NEW = 0
NLM_F_REQUEST, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x200, 0x400
NLMSG_ERROR = 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMEOUT = 1, 2, 3, 7
IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 1 << 1, 1 << 2, 1 << 3


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _tuple(kind: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    ip = _attr(1, _attr(1, src) + _attr(2, dst))
    proto = _attr(2, _attr(1, b"\x11") + _attr(2, struct.pack(">H", sport))
                  + _attr(3, struct.pack(">H", dport)))  # fmt: skip
    return _attr(kind, ip + proto)


def _entry(index: int) -> bytes:
    """An assured UDP entry, 10.X.Y.Z:5000 -> 10.251.0.1:9, unique per index."""
    src = IPv4Address(0x0AFA0000 + index).packed  # from 10.250.0.0 up
    dst = IPv4Address("10.251.0.1").packed
    body = (
        struct.pack("=BBH", socket.AF_INET, 0, 0)
        + _tuple(CTA_TUPLE_ORIG, src, dst, 5000, 9)
        + _tuple(CTA_TUPLE_REPLY, dst, src, 9, 5000)
        # CONFIRMED too: the kernel sets it on a ctnetlink entry, and refuses (EBUSY) a status
        # that would clear it.
        + _attr(CTA_STATUS, struct.pack(">I", IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED))
        + _attr(CTA_TIMEOUT, struct.pack(">I", 3600))
    )
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL  # no ack: only errors come back
    return struct.pack("=IHHII", 16 + len(body), 1 << 8 | IPCTNL_MSG_CT_NEW, flags, index, 0) + body


class Filler:
    """Makes conntrack entries in the namespace it was created in, as fast as ctnetlink
    takes them (messages sent in batches, only errors read back)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.next = 0
        self.refused = 0  # ENOMEM: the table was full

    def add(self, count: int) -> None:
        batch: list[bytes] = []
        for _ in range(count):
            batch.append(_entry(self.next))
            self.next += 1
            if len(batch) == 200:
                self._send(batch)
                batch = []
        if batch:
            self._send(batch)
        time.sleep(0.05)
        self._errors()

    def _send(self, batch: list[bytes]) -> None:
        self.sock.send(b"".join(batch))
        self._errors()

    def _errors(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            offset = 0
            while offset + 20 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + 16)
                    assert -code == errno.ENOMEM, f"conntrack create: {errno.errorcode[-code]}"
                    self.refused += 1
                offset += max(length, 20)

    def close(self) -> None:
        self.sock.close()


def proc(lab: Lab, name: str) -> int:
    return int(lab.run(HOST, "cat", f"/proc/sys/net/netfilter/{name}").stdout)


@pytest.fixture
def filled(lab: Lab) -> Iterator[Filler]:
    limit = proc(lab, "nf_conntrack_max")
    if limit == 0 or limit > MAX_FILL:
        pytest.skip(f"nf_conntrack_max = {limit}: too many entries to fill in a test")
    lab.run(HOST, "conntrack", "-F", check=False)
    lab.run(HOST, "nft", "delete", "table", "ip", "lrkp", check=False)
    with lab.inside(HOST):
        filler = Filler()
    try:
        yield filler
    finally:
        filler.close()
        clear_host(lab, HOST)


def test_a_conntrack_table_short_of_room_is_warned_of_and_its_drops_counted(
    lab: Lab, filled: Filler, peers: Peers, tmp_path: Path
) -> None:
    limit = proc(lab, "nf_conntrack_max")
    filled.add(limit - 100 - proc(lab, "nf_conntrack_count"))
    assert filled.refused == 0 and proc(lab, "nf_conntrack_count") == limit - 100
    node = Node(
        lab, HOST, "--internal-ip", RELAY_IP, "--ports", f"{PORTS[0]}-{PORTS[1]}",
        "--control", f"udp:{RELAY_IP}:22333", "--allow", KAMAILIO_IP,
        "--metrics-listen", f"127.0.0.1:{METRICS}", "--flush-on-exit",
    )  # fmt: skip
    kamailio = Controller(lab, "sip", KAMAILIO_IP)
    try:
        node.wait_ready(CONTROL, kamailio)
        # At start: 100 entries free, the 250 calls of the range need up to 500.
        node.wait_log("conntrack may run out", 15)
        warning = next(line for line in node.output().splitlines() if "may run out" in line)
        assert f"nf_conntrack_max={limit} entries are free" in warning
        assert f"can take 250 more calls, which need up to {NEEDED}" in warning
        assert "sysctl -w net.netfilter.nf_conntrack_max=" in warning
        samples = metrics(lab, HOST, METRICS)
        entries = samples[("lrkp_conntrack_entries", frozenset())]
        assert samples[("lrkp_conntrack_max", frozenset())] == limit
        assert limit - 100 <= entries <= limit  # the fill, and the node's own sockets
        assert samples[("lrkp_conntrack_shortfall", frozenset())] == NEEDED - (limit - entries)
        drops_before = samples[("lrkp_conntrack_failures_total", frozenset({("kind", "drop")}))]
        # A call set up while there is still room for its command (the controller's entry
        # exists already), then the table runs full.
        caller, callee = peers("a", 4700), peers("b", 6700)
        body = set_command(
            "S", str(caller.endpoint.ip), RELAY_IP, RELAY_IP, str(callee.endpoint.ip),
            4700, PORTS[0], PORTS[0] + 2, 6700, "full@lab",
        )  # fmt: skip
        assert kamailio.command(body, CONTROL) == body + b"OK"
        filled.add(200)
        assert filled.refused > 0  # the kernel said the table is full
        caller_relay, callee_relay = (Endpoint.parse(RELAY_IP, p) for p in (30002, 30000))
        caller.send(caller_relay, b"no room")
        callee.expect_nothing()  # the stream's first packet found no conntrack entry
        node.wait_log("conntrack could not keep", 30)
        # Room again: the kernel counted the drop, and the stream goes through.
        lab.run(HOST, "conntrack", "-F")
        samples = metrics(lab, HOST, METRICS)
        drops = samples[("lrkp_conntrack_failures_total", frozenset({("kind", "drop")}))]
        assert drops > drops_before
        assert samples[("lrkp_conntrack_shortfall", frozenset())] == 0
        caller.send(caller_relay, b"room again")
        assert callee.expect(b"room again") == callee_relay
        node.wait_log("conntrack has room again", 30)
    finally:
        kamailio.close()
        node.stop()
