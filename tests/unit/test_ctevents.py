"""Conntrack events and targeted GETs, decoded without a kernel.

Messages are built with pyroute2's codec (the reference), the decoders are our struct ones.
"""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    NFCTAttrTuple,
    nfct_msg,
)

from lrkp_tsl.dataplane.conntrack import GET_BATCH, ConntrackTable, decode_entry, encode_get
from lrkp_tsl.dataplane.ctevents import decode_event
from lrkp_tsl.errors import KernelError
from lrkp_tsl.kernel import StreamChange, StreamEvent, StreamKey
from lrkp_tsl.media import Endpoint

SENDER = Endpoint(IPv4Address("10.0.0.21"), 4000)
RELAY = Endpoint(IPv4Address("10.0.0.10"), 20002)
KEY = (SENDER, RELAY)


def ct_message(
    kind: int,
    *,
    proto: int = 17,
    sport: int = 4000,
    timeout: int | None = None,
    family: int = socket.AF_INET,
    seq: int = 0,
) -> bytes:
    """A ctnetlink entry message as the kernel sends it (event, or GET reply)."""
    message = nfct_msg()
    message["nfgen_family"] = family
    message["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | kind
    message["header"]["sequence_number"] = seq
    attrs: list[list[object]] = [
        [
            "CTA_TUPLE_ORIG",
            {
                "attrs": NFCTAttrTuple(
                    saddr="10.0.0.21", daddr="10.0.0.10", sport=sport, dport=20002, proto=proto
                ).attrs()
            },
        ],
        [
            "CTA_TUPLE_REPLY",
            {
                "attrs": NFCTAttrTuple(
                    saddr="10.0.1.31", daddr="10.0.0.10", sport=6000, dport=20000, proto=proto
                ).attrs()
            },
        ],
        ["CTA_STATUS", 0x1C8],
    ]
    if timeout is not None:
        attrs.append(["CTA_TIMEOUT", timeout])
    message["attrs"] = attrs
    message.encode()
    return bytes(message.data)


def ack(seq: int, error: int = 0) -> bytes:
    """An NLMSG_ERROR reply (error 0 is an ack), with the request header echoed."""
    return struct.pack("=IHHIIi", 16 + 4 + 16, 2, 0x100, seq, 0, error) + bytes(16)


def test_get_matches_pyroute2_encoding() -> None:
    reference = nfct_msg.create_from(
        tuple_orig=NFCTAttrTuple(
            saddr="10.0.0.21", daddr="10.0.0.10", sport=4000, dport=20002, proto=17
        )
    )
    reference["nfgen_family"] = socket.AF_INET
    reference["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    reference["header"]["flags"] = 0x1 | 0x4  # request, ack
    reference["header"]["sequence_number"] = 78
    reference.encode()
    assert encode_get(SENDER, RELAY, 78) == bytes(reference.data)


def test_new_event_is_a_started_stream_keyed_by_its_original_direction() -> None:
    assert decode_event(ct_message(IPCTNL_MSG_CT_NEW)) == StreamEvent(StreamChange.STARTED, KEY)


@pytest.mark.parametrize(
    ("timeout", "change"),
    [
        (None, StreamChange.EXPIRED),  # the kernel omits CTA_TIMEOUT when none is left
        (0, StreamChange.EXPIRED),
        (1, StreamChange.REMOVED),  # `conntrack -D`, flush, or the node's own forget
        (59, StreamChange.REMOVED),
    ],
)
def test_destroy_event_tells_expiry_from_removal(timeout: int | None, change: StreamChange) -> None:
    message = ct_message(IPCTNL_MSG_CT_DELETE, timeout=timeout)
    assert decode_event(message) == StreamEvent(change, KEY)


def test_events_of_other_protocols_families_and_types_are_ignored() -> None:
    assert decode_event(ct_message(IPCTNL_MSG_CT_NEW, proto=6)) is None  # TCP
    assert decode_event(ct_message(IPCTNL_MSG_CT_NEW, family=socket.AF_INET6)) is None
    assert decode_event(ct_message(IPCTNL_MSG_CT_GET)) is None
    assert decode_event(ack(1)) is None


def test_port_zero_is_skipped_not_raised() -> None:
    message = ct_message(IPCTNL_MSG_CT_DELETE, sport=0)
    assert decode_event(message) is None
    assert decode_entry(message) is None  # a dump with such an entry goes on


def test_icmp_entry_without_ports_is_skipped() -> None:
    message = nfct_msg()
    message["nfgen_family"] = socket.AF_INET
    message["header"]["type"] = NFNL_SUBSYS_CTNETLINK << 8
    icmp = {
        "attrs": [
            [
                "CTA_TUPLE_IP",
                {"attrs": [["CTA_IP_V4_SRC", "10.0.0.1"], ["CTA_IP_V4_DST", "10.0.0.2"]]},
            ],
            ["CTA_TUPLE_PROTO", {"attrs": [["CTA_PROTO_NUM", 1], ["CTA_PROTO_ICMP_ID", 7]]}],
        ]
    }
    message["attrs"] = [["CTA_TUPLE_ORIG", icmp], ["CTA_TUPLE_REPLY", icmp]]
    message.encode()
    assert decode_event(bytes(message.data)) is None
    assert decode_entry(bytes(message.data)) is None


def test_truncated_event_is_none_at_every_length() -> None:
    message = ct_message(IPCTNL_MSG_CT_DELETE, timeout=30)
    for size in range(len(message)):
        assert decode_event(message[:size]) is None
    assert decode_event(message + b"\0" * 8) == StreamEvent(StreamChange.REMOVED, KEY)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_raise(data: bytes) -> None:
    decode_event(data)


@settings(max_examples=2000, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=10_000),
    value=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=0, max_value=10_000),
)
def test_corrupted_event_never_raises(position: int, value: int, cut: int) -> None:
    """Random bytes rarely get past the header check; corrupt a valid event instead."""
    message = bytearray(ct_message(IPCTNL_MSG_CT_DELETE, timeout=30))
    message[position % len(message)] = value
    event = decode_event(bytes(message[: len(message) - cut % 24]))
    assert event is None or isinstance(event, StreamEvent)


class FakeNetlink:
    """Stands for ConntrackTable's socket. Like the kernel, it queues the replies to a send
    during the send (one datagram per reply), one scripted batch of replies per send;
    `stale` is what an earlier, failed exchange left in the queue."""

    def __init__(self, batches: list[list[bytes]], stale: tuple[bytes, ...]) -> None:
        self.sent: list[bytes] = []
        self.batches = batches
        self.queue = list(stale)

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        self.queue += self.batches.pop(0)
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if not self.queue:
            assert flags & socket.MSG_DONTWAIT, "a blocking read here would wait forever"
            raise BlockingIOError(errno.EAGAIN, "empty")
        data = self.queue.pop(0)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def table_with(
    *batches: list[bytes], stale: tuple[bytes, ...] = ()
) -> tuple[ConntrackTable, FakeNetlink]:
    table = ConntrackTable()
    table._sock.close()
    fake = FakeNetlink(list(batches), stale)
    table._sock = fake  # type: ignore[assignment]
    return table, fake


def keys(count: int) -> list[StreamKey]:
    return [(Endpoint(SENDER.ip, 4000 + 2 * n), RELAY) for n in range(count)]


def test_alive_matches_replies_by_sequence_number() -> None:
    live, missing = keys(2)
    table, fake = table_with(
        [
            ack(99),  # not a request of this batch: skipped
            ct_message(IPCTNL_MSG_CT_NEW, seq=1, timeout=42),
            ack(1),
            ack(2, -errno.ENOENT),
        ],
        # Left by an earlier exchange, with the sequence numbers this one will use.
        stale=(ct_message(IPCTNL_MSG_CT_NEW, seq=2, timeout=7), ack(2)),
    )
    assert table.alive([live, missing]) == {live: 42.0}
    assert len(fake.sent) == 1 and fake.queue == []  # one send; read to the batch's end
    assert fake.sent[0] == encode_get(*live, 1) + encode_get(*missing, 2)


def test_alive_reads_a_whole_batch_before_raising_on_a_refusal() -> None:
    first, second = keys(2)
    table, fake = table_with([ack(1, -errno.EPERM), ack(2, -errno.ENOENT)])
    with pytest.raises(KernelError, match="EPERM"):
        table.alive([first, second])
    assert fake.queue == []


def test_alive_raises_rather_than_waits_when_replies_were_lost() -> None:
    table, _fake = table_with([ct_message(IPCTNL_MSG_CT_NEW, seq=1), ack(1)])
    with pytest.raises(KernelError, match="1 replies lost"):
        table.alive(keys(2))


def test_alive_sends_in_batches_and_reports_no_key_it_was_not_asked() -> None:
    asked = keys(70)
    batches: list[list[bytes]] = [[], []]
    for seq in range(1, 71):
        batches[seq > GET_BATCH] += [ct_message(IPCTNL_MSG_CT_NEW, seq=seq), ack(seq)]
    table, fake = table_with(*batches)
    found = table.alive(asked)
    assert found == dict.fromkeys(asked, 0.0)  # no CTA_TIMEOUT: 0.0
    assert len(fake.sent) == 2
    assert table.alive([]) == {}
