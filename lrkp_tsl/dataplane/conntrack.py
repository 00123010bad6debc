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
deletions in one `send`, reading the acks back. Listing entries, which is rare and not on
the control path, uses pyroute2.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import Endpoint, Flow

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
CTA_TUPLE_ORIG = 1
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

_NLMSGHDR = struct.Struct("=IHHII")
_NLMSGERR = struct.Struct("=i")
# nlmsghdr, nfgenmsg, then CTA_TUPLE_ORIG { CTA_TUPLE_IP { src, dst }, CTA_TUPLE_PROTO
# { num, sport, dport } }, each attribute padded to 4 bytes, as ctnetlink expects.
_DELETE = struct.Struct(
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


def encode_delete(sender: Endpoint, relay: Endpoint, seq: int) -> bytes:
    """A ctnetlink request deleting the UDP entry whose original tuple is sender -> relay."""
    return _DELETE.pack(
        _DELETE.size,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
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


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """What operators and tests need of one UDP entry: both tuples and the counters."""

    orig_src: Endpoint
    orig_dst: Endpoint
    reply_src: Endpoint
    reply_dst: Endpoint
    packets_orig: int | None
    packets_reply: int | None


class ConntrackTable:
    """The conntrack table of the network namespace this object was created in."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._seq = 0

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

    def _send(self, requests: list[bytes]) -> int:
        try:
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

    def entries(self) -> list[ConntrackEntry]:
        """Every UDP entry of the namespace (listing, for operators and tests: not hot).

        The dump goes over this object's own socket, so it reads the namespace the table was
        created in; pyroute2 decodes the replies.
        """
        from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

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
        found: list[ConntrackEntry] = []
        self._sock.send(request)
        while True:
            data = self._sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if msg_type == NLMSG_DONE:
                    return found
                if msg_type == NLMSG_ERROR:
                    (error,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                    raise KernelError(f"conntrack dump refused: error {error}")
                msg = nfct_msg(data[offset : offset + length])
                msg.decode()
                entry = _entry_from_msg(msg)
                if entry is not None:
                    found.append(entry)
                offset += max((length + 3) & ~3, _NLMSGHDR.size)

    def entries_to(self, relay: Endpoint) -> list[ConntrackEntry]:
        """Entries whose original or reply destination is `relay`."""
        return [e for e in self.entries() if relay in (e.orig_dst, e.reply_dst)]


def _entry_from_msg(msg: object) -> ConntrackEntry | None:
    get = msg.get_attr  # type: ignore[attr-defined]
    orig, reply = get("CTA_TUPLE_ORIG"), get("CTA_TUPLE_REPLY")
    if orig is None or reply is None:
        return None
    if orig.get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_NUM") != IPPROTO_UDP:
        return None

    def ends(tuple_msg: object) -> tuple[Endpoint, Endpoint]:
        ip = tuple_msg.get_attr("CTA_TUPLE_IP")  # type: ignore[attr-defined]
        proto = tuple_msg.get_attr("CTA_TUPLE_PROTO")  # type: ignore[attr-defined]
        return (
            Endpoint(
                IPv4Address(ip.get_attr("CTA_IP_V4_SRC")), proto.get_attr("CTA_PROTO_SRC_PORT")
            ),
            Endpoint(
                IPv4Address(ip.get_attr("CTA_IP_V4_DST")), proto.get_attr("CTA_PROTO_DST_PORT")
            ),
        )

    def packets(attr: str) -> int | None:
        counters = get(attr)
        return None if counters is None else int(counters.get_attr("CTA_COUNTERS_PACKETS"))

    orig_src, orig_dst = ends(orig)
    reply_src, reply_dst = ends(reply)
    return ConntrackEntry(
        orig_src,
        orig_dst,
        reply_src,
        reply_dst,
        packets("CTA_COUNTERS_ORIG"),
        packets("CTA_COUNTERS_REPLY"),
    )
