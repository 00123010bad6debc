"""Conntrack adapter: forget the kernel's bindings of a call's streams.

Why deletions matter: a conntrack entry keeps the NAT binding it was created with. After a
call is removed, or a flow is re-committed with a new target, an old entry would keep
relaying (or blackholing) that stream until it times out (stack.md §2, pitfalls 1-2).

Why deletions are encoded here and not by pyroute2's NFCTSocket: measured on this machine,
`NFCTSocket.entry('del', ...)` costs ~390 µs per call and cannot run inside a running
asyncio loop (it drives its own), and encoding one `nfct_msg` with pyroute2 costs ~85 µs.
A call has four flows, so that alone would be ~1.5 ms per commit, several times the
nftables transaction. The delete request is one fixed-shape message; we encode it with
`struct` (a unit test checks the bytes against pyroute2's encoder) and send a call's
deletions in one `send`, reading the acks back. Dumps are decoded the same way (unit tests
check both against pyroute2's codec).

Why `alive` asks by key rather than dumping: the node must learn whether a few streams are
still live in O(keys), not O(table) (a dump of 40k entries takes about a second). A GET of
an entry whose timeout has passed but that the GC has not reaped yet reaps it and answers
ENOENT, so `alive` never reports a stream that is in fact expired.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address
from typing import Any

from lrkp_tsl.errors import KernelError
from lrkp_tsl.kernel import Counters, StreamKey
from lrkp_tsl.media import ConntrackEntry, Endpoint, Flow

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_TIMEOUT = 7
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_COUNTERS_PACKETS = 1
CTA_COUNTERS_BYTES = 2
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
IPPROTO_UDP = 17
# Requests per send: a call has 4; a flush has many, and acks must fit the receive buffer.
BATCH = 128
# GETs per send: each is answered by an entry and an ack, which must all fit the receive
# buffer (the kernel answers the whole batch inside `send`, before we read anything).
GET_BATCH = 64

_NLMSGHDR = struct.Struct("=IHHII")
_NLMSGERR = struct.Struct("=i")
_CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_BE32 = struct.Struct(">I")
# nlmsghdr, nfgenmsg, then CTA_TUPLE_ORIG { CTA_TUPLE_IP { src, dst }, CTA_TUPLE_PROTO
# { num, sport, dport } }, each attribute padded to 4 bytes, as ctnetlink expects.
_BY_TUPLE = struct.Struct(
    "=IHHII"  # nlmsghdr: len, type, flags, seq, pid
    "BBH"  # nfgenmsg: family, version, res_id (big endian, 0)
    "HH"  # CTA_TUPLE_ORIG
    "HH"  # CTA_TUPLE_IP
    "HH4s"  # CTA_IP_V4_SRC
    "HH4s"  # CTA_IP_V4_DST
    "HH"  # CTA_TUPLE_PROTO
    "HHB3x"  # CTA_PROTO_NUM (u8 + pad)
    "HH2s2x"  # CTA_PROTO_SRC_PORT (be16 + pad)
    "HH2s2x"  # CTA_PROTO_DST_PORT (be16 + pad)
)


def _encode_by_tuple(kind: int, sender: Endpoint, relay: Endpoint, seq: int) -> bytes:
    """A ctnetlink request of type `kind` for the UDP entry whose original tuple is
    sender -> relay, acked."""
    return _BY_TUPLE.pack(
        _BY_TUPLE.size,
        (NFNL_SUBSYS_CTNETLINK << 8) | kind,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        0,
        socket.AF_INET,
        0,
        0,
        4 + 20 + 28,
        CTA_TUPLE_ORIG,
        4 + 8 + 8,
        CTA_TUPLE_IP,
        8,
        CTA_IP_V4_SRC,
        sender.ip.packed,
        8,
        CTA_IP_V4_DST,
        relay.ip.packed,
        4 + 8 + 8 + 8,
        CTA_TUPLE_PROTO,
        5,
        CTA_PROTO_NUM,
        IPPROTO_UDP,
        6,
        CTA_PROTO_SRC_PORT,
        sender.port.to_bytes(2, "big"),
        6,
        CTA_PROTO_DST_PORT,
        relay.port.to_bytes(2, "big"),
    )


def encode_delete(sender: Endpoint, relay: Endpoint, seq: int) -> bytes:
    """A ctnetlink request deleting the UDP entry whose original tuple is sender -> relay."""
    return _encode_by_tuple(IPCTNL_MSG_CT_DELETE, sender, relay, seq)


def encode_get(sender: Endpoint, relay: Endpoint, seq: int) -> bytes:
    """A ctnetlink request reading the UDP entry whose original tuple is sender -> relay.

    Answered by the entry (an IPCTNL_MSG_CT_NEW message) then an ack, or by ENOENT alone.
    """
    return _encode_by_tuple(IPCTNL_MSG_CT_GET, sender, relay, seq)


class ConntrackTable:
    """The conntrack table of the network namespace this object was created in."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._seq = 0
        self._buffer = bytearray(65536)

    def close(self) -> None:
        self._sock.close()

    def forget(self, flows: Iterable[Flow]) -> int:
        """Delete the entries whose original direction is one of `flows`; returns how many.

        A stream has one entry, created by whichever party sent first, so deleting by every
        flow's (sender -> relay) tuple removes it whichever side started. Missing entries
        are the normal case and are not errors.
        """
        return self.forget_keys((flow.sender, flow.relay) for flow in flows)

    def forget_keys(self, keys: Iterable[tuple[Endpoint, Endpoint]]) -> int:
        """`forget` by (sender, relay) pairs: one send per BATCH requests, acks read back."""
        deleted = 0
        requests: list[bytes] = []
        for sender, relay in keys:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            requests.append(encode_delete(sender, relay, self._seq))
            if len(requests) == BATCH:
                deleted += self._send(requests)
                requests = []
        if requests:
            deleted += self._send(requests)
        return deleted

    def _drain(self) -> None:
        """Discard replies left by an exchange that failed midway (ENOBUFS, an exception).

        Why before every exchange: while such replies sit in the queue, the socket stays
        "congested" and the kernel drops new replies without reporting ENOBUFS again, so a
        reader would wait forever for an ack that will never come.
        """
        while True:
            try:
                self._sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise

    def _send(self, requests: list[bytes]) -> int:
        try:
            self._drain()
            self._sock.send(b"".join(requests))
            return self._read_acks(len(requests))
        except OSError as exc:
            raise KernelError(f"conntrack delete failed: {exc}") from exc

    def _read_acks(self, expected: int) -> int:
        deleted = 0
        acked = 0
        while acked < expected:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if msg_type == NLMSG_ERROR:
                    (error,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                    acked += 1
                    if error == 0:
                        deleted += 1
                    elif error != -errno.ENOENT:
                        raise KernelError(
                            f"conntrack delete refused: {errno.errorcode.get(-error, error)}"
                        )
                offset += max((length + 3) & ~3, _NLMSGHDR.size)
        return deleted

    def alive(self, keys: Iterable[StreamKey]) -> dict[StreamKey, float]:
        """The entries among `keys` that exist, with the seconds left before they expire.

        One GET per key, GET_BATCH per send. Replies are matched to requests by sequence
        number: a live entry is answered by the entry then an ack, a missing one by ENOENT
        alone, so a request is settled by its NLMSG_ERROR; replies left over from an
        earlier, failed exchange are drained first and could never match anyway. The
        kernel reports whole seconds (rounded down): an entry in its last second reports 0.0.
        """
        found: dict[StreamKey, float] = {}
        pending: dict[int, StreamKey] = {}
        for key in keys:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            pending[self._seq] = key
            if len(pending) == GET_BATCH:
                self._get(pending, found)
                pending = {}
        if pending:
            self._get(pending, found)
        return found

    def counters(self, keys: Iterable[StreamKey]) -> dict[StreamKey, Counters]:
        """The live entries found by `keys` (an entry answers to either of its tuples),
        by their original tuple, with their counters. One GET per key, as `alive`."""
        return {got[0]: got[1] for got in self.streams(keys).values() if got is not None}

    def streams(
        self, keys: Iterable[StreamKey]
    ) -> dict[StreamKey, tuple[StreamKey, Counters, float] | None]:
        """The entries `keys` found, by the key that found each: (original tuple, counters,
        seconds left), or None for an entry that is not IPv4 UDP. A key absent from the
        result found no entry: there is nothing to delete for it."""
        found: dict[StreamKey, tuple[StreamKey, Counters, float] | None] = {}
        pending: dict[int, StreamKey] = {}
        for key in keys:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            pending[self._seq] = key
            if len(pending) == GET_BATCH:
                self._get(pending, found, _decode_stream)
                pending = {}
        if pending:
            self._get(pending, found, _decode_stream)
        return found

    def stream_counters(self) -> dict[bytes, tuple[int, int, int, int, int]]:
        """Every UDP entry of the namespace, by `raw_key` of its original tuple:
        (packets_orig, bytes_orig, packets_reply, bytes_reply, seconds left).

        A whole-table dump, for on-demand listings: run it in a worker thread with its own
        ConntrackTable, never on the event loop. Keys are bytes and values tuples of ints
        on purpose: 50k entries as Endpoint objects would hand the cyclic GC hundreds of
        thousands of objects to track, and a full collection stalls the event loop.
        """
        found: dict[bytes, tuple[int, int, int, int, int]] = {}
        for message in self._dump():
            attrs = _attrs(message, _NLMSGHDR.size + 4, len(message))
            span = attrs.get(CTA_TUPLE_ORIG)
            key = _raw_tuple(message, span) if span is not None else None
            if key is None:
                continue
            counters = decode_counters(message, attrs) or Counters()
            found[key] = (
                counters.packets_orig,
                counters.bytes_orig,
                counters.packets_reply,
                counters.bytes_reply,
                int(_timeout(message, 0, len(message))),
            )
        return found

    def _get(
        self,
        pending: dict[int, StreamKey],
        found: dict[StreamKey, Any],
        decode: Callable[[bytes | bytearray, int, int], Any] | None = None,
    ) -> None:
        decode = decode or _timeout
        refused = 0
        try:
            self._drain()
            self._sock.send(
                b"".join(encode_get(sender, relay, seq) for seq, (sender, relay) in pending.items())
            )
            while pending:
                # The kernel answers GETs inside `send`: whatever is not queued now was lost.
                size = self._sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
                offset = 0
                while offset + _NLMSGHDR.size <= size:
                    length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(
                        self._buffer, offset
                    )
                    key = pending.get(seq)
                    if key is not None and msg_type == NLMSG_ERROR:
                        (error,) = _NLMSGERR.unpack_from(self._buffer, offset + _NLMSGHDR.size)
                        del pending[seq]
                        if error not in (0, -errno.ENOENT):
                            refused = refused or error
                    elif key is not None and msg_type == _CT_NEW:
                        found[key] = decode(self._buffer, offset, min(offset + length, size))
                    offset += max((length + 3) & ~3, _NLMSGHDR.size)
        except BlockingIOError:
            raise KernelError(f"conntrack get: {len(pending)} replies lost") from None
        except OSError as exc:
            raise KernelError(f"conntrack get failed: {exc}") from exc
        if refused:
            raise KernelError(f"conntrack get refused: {errno.errorcode.get(-refused, refused)}")

    def lookup(self, sender: Endpoint, relay: Endpoint) -> tuple[ConntrackEntry, float] | None:
        """The entry with the tuple sender -> relay in either direction, and the seconds
        left before it expires (whole seconds, rounded down); None if there is none."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        try:
            self._drain()
            self._sock.send(encode_get(sender, relay, seq))
            found = None
            while True:
                # The kernel answers inside `send`: the entry (if any), then the ack.
                size = self._sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
                data = bytes(memoryview(self._buffer)[:size])
                offset = 0
                while offset + _NLMSGHDR.size <= size:
                    length, msg_type, _flags, got, _pid = _NLMSGHDR.unpack_from(data, offset)
                    end = min(offset + length, size)
                    if got == seq and msg_type == _CT_NEW:
                        entry = decode_entry(data[offset:end])
                        if entry is not None:
                            found = (entry, _timeout(data, offset, end))
                    elif got == seq and msg_type == NLMSG_ERROR:
                        (error,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                        if error not in (0, -errno.ENOENT):
                            raise KernelError(
                                f"conntrack get refused: {errno.errorcode.get(-error, error)}"
                            )
                        return found
                    offset += max((length + 3) & ~3, _NLMSGHDR.size)
        except BlockingIOError:
            raise KernelError("conntrack get: the reply was lost") from None
        except OSError as exc:
            raise KernelError(f"conntrack get failed: {exc}") from exc

    def entries(self) -> list[ConntrackEntry]:
        """Every UDP entry of the namespace, with counters where accounting is on.

        The dump goes over this object's own socket, so it reads the namespace the table
        was created in. Replies are decoded by `decode_entry` (struct, ~10x faster than
        pyroute2's decoder, which matters when the node polls 40k entries for activity).
        """
        found: list[ConntrackEntry] = []
        for message in self._dump():
            entry = decode_entry(message)
            if entry is not None:
                found.append(entry)
        return found

    def _dump(self) -> Iterable[bytes]:
        """The messages of a dump of every IPv4 entry, one at a time."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        request = struct.pack(
            "=IHHIIBBH",
            _NLMSGHDR.size + 4,
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            self._seq,
            0,
            socket.AF_INET,
            0,
            0,
        )
        messages: list[bytes] = []
        try:
            self._drain()
            self._sock.send(request)
            while True:
                data = self._sock.recv(1 << 20)
                offset = 0
                while offset + _NLMSGHDR.size <= len(data):
                    length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                    if msg_type == NLMSG_DONE:
                        return messages
                    if msg_type == NLMSG_ERROR:
                        (error,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                        raise KernelError(f"conntrack dump refused: error {error}")
                    messages.append(data[offset : offset + length])
                    offset += max((length + 3) & ~3, _NLMSGHDR.size)
        except OSError as exc:
            raise KernelError(f"conntrack dump failed: {exc}") from exc

    def entries_to(self, relay: Endpoint) -> list[ConntrackEntry]:
        """Entries whose original or reply destination is `relay`."""
        return [e for e in self.entries() if relay in (e.orig_dst, e.reply_dst)]


def _attrs(data: bytes | bytearray, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Netlink attributes in data[start:end]: type -> (payload start, payload end).

    Spans are clipped to `end` and to the data, so a lying length never reaches past them.
    """
    end = min(end, len(data))
    found = {}
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            break
        found[kind & 0x3FFF] = (start + 4, min(start + length, end))
        start += (length + 3) & ~3
    return found


def _field(data: bytes, attrs: dict[int, tuple[int, int]], kind: int, size: int) -> bytes | None:
    """The first `size` bytes of attribute `kind`, or None if it is absent or too short."""
    span = attrs.get(kind)
    if span is None or span[1] - span[0] < size:
        return None
    return data[span[0] : span[0] + size]


def raw_key(key: StreamKey) -> bytes:
    """A (sender, relay) key as `stream_counters` keys it: IPs and big-endian ports."""
    sender, relay = key
    return (
        sender.ip.packed
        + sender.port.to_bytes(2, "big")
        + relay.ip.packed
        + relay.port.to_bytes(2, "big")
    )


def _tuple_fields(
    data: bytes, span: tuple[int, int]
) -> tuple[bytes, bytes, bytes, bytes, int] | None:
    """(src ip, sport, dst ip, dport, protocol) of a CTA_TUPLE_* as raw big-endian bytes;
    None unless it has IPv4 addresses and ports. No objects built (50k-entry dumps)."""
    parts = _attrs(data, *span)
    if CTA_TUPLE_IP not in parts or CTA_TUPLE_PROTO not in parts:
        return None
    ip = _attrs(data, *parts[CTA_TUPLE_IP])
    proto = _attrs(data, *parts[CTA_TUPLE_PROTO])
    number = _field(data, proto, CTA_PROTO_NUM, 1)
    src = _field(data, ip, CTA_IP_V4_SRC, 4)
    dst = _field(data, ip, CTA_IP_V4_DST, 4)
    sport = _field(data, proto, CTA_PROTO_SRC_PORT, 2)
    dport = _field(data, proto, CTA_PROTO_DST_PORT, 2)
    if src is None or dst is None or number is None or sport is None or dport is None:
        return None
    return src, sport, dst, dport, number[0]


def _raw_tuple(data: bytes, span: tuple[int, int]) -> bytes | None:
    """`raw_key` of a CTA_TUPLE_* if it is IPv4 UDP, without building objects."""
    fields = _tuple_fields(data, span)
    if fields is None or fields[4] != IPPROTO_UDP:
        return None
    return b"".join(fields[:4])


def _tuple(data: bytes, span: tuple[int, int]) -> tuple[Endpoint, Endpoint, int] | None:
    """(src, dst, protocol) of a CTA_TUPLE_*; None unless it has IPv4 addresses and ports.

    Protocols without ports (ICMP) and port 0 (a valid UDP port on the wire, not for an
    `Endpoint`) give None rather than an exception: one odd entry must not break a dump.
    """
    fields = _tuple_fields(data, span)
    if fields is None:
        return None
    src, sport, dst, dport, number = fields
    if sport == b"\0\0" or dport == b"\0\0":
        return None
    return (
        Endpoint(IPv4Address(src), int.from_bytes(sport)),
        Endpoint(IPv4Address(dst), int.from_bytes(dport)),
        number,
    )


def _timeout(data: bytes | bytearray, start: int, end: int) -> float:
    """CTA_TIMEOUT of the ctnetlink message data[start:end], in seconds; 0.0 if absent."""
    span = _attrs(data, start + _NLMSGHDR.size + 4, end).get(CTA_TIMEOUT)
    if span is None or span[1] - span[0] < 4:
        return 0.0
    return float(_BE32.unpack_from(data, span[0])[0])


def _packets(data: bytes, attrs: dict[int, tuple[int, int]], kind: int) -> int | None:
    if kind not in attrs:
        return None
    counters = _attrs(data, *attrs[kind])
    if CTA_COUNTERS_PACKETS not in counters:
        return None
    begin = counters[CTA_COUNTERS_PACKETS][0]
    return int.from_bytes(data[begin : begin + 8])


def _counter(data: bytes, attrs: dict[int, tuple[int, int]], kind: int, which: int) -> int:
    if kind not in attrs:
        return 0
    span = _attrs(data, *attrs[kind]).get(which)
    if span is None or span[1] - span[0] < 8:
        return 0
    return int.from_bytes(data[span[0] : span[0] + 8])


def _decode_stream(
    data: bytes | bytearray, start: int, end: int
) -> tuple[StreamKey, Counters, float] | None:
    """(original tuple, counters, seconds left) of the ctnetlink message data[start:end];
    None unless it is an IPv4 UDP entry. Counters are 0 while accounting is off."""
    message = bytes(data[start:end])
    attrs = _attrs(message, _NLMSGHDR.size + 4, len(message))
    if CTA_TUPLE_ORIG not in attrs:
        return None
    orig = _tuple(message, attrs[CTA_TUPLE_ORIG])
    if orig is None or orig[2] != IPPROTO_UDP:
        return None
    return (
        (orig[0], orig[1]),
        decode_counters(message, attrs) or Counters(),
        _timeout(message, 0, len(message)),
    )


def decode_counters(message: bytes, attrs: dict[int, tuple[int, int]]) -> Counters | None:
    """CTA_COUNTERS_ORIG/REPLY of a ctnetlink message whose top-level attributes are
    `attrs`; None if it has neither (accounting off)."""
    if CTA_COUNTERS_ORIG not in attrs and CTA_COUNTERS_REPLY not in attrs:
        return None
    return Counters(
        _counter(message, attrs, CTA_COUNTERS_ORIG, CTA_COUNTERS_PACKETS),
        _counter(message, attrs, CTA_COUNTERS_ORIG, CTA_COUNTERS_BYTES),
        _counter(message, attrs, CTA_COUNTERS_REPLY, CTA_COUNTERS_PACKETS),
        _counter(message, attrs, CTA_COUNTERS_REPLY, CTA_COUNTERS_BYTES),
    )


def decode_entry(message: bytes) -> ConntrackEntry | None:
    """One ctnetlink message (header included) -> ConntrackEntry, or None if not IPv4 UDP."""
    attrs = _attrs(message, _NLMSGHDR.size + 4, len(message))
    if CTA_TUPLE_ORIG not in attrs or CTA_TUPLE_REPLY not in attrs:
        return None
    orig = _tuple(message, attrs[CTA_TUPLE_ORIG])
    reply = _tuple(message, attrs[CTA_TUPLE_REPLY])
    if orig is None or reply is None or orig[2] != IPPROTO_UDP:
        return None
    return ConntrackEntry(
        orig[0],
        orig[1],
        reply[0],
        reply[1],
        _packets(message, attrs, CTA_COUNTERS_ORIG),
        _packets(message, attrs, CTA_COUNTERS_REPLY),
    )
