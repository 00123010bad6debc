"""Kernel-pushed stream activity: ctnetlink NEW and DESTROY events.

Why events: the node must learn that a relayed call went idle in O(changes), not by dumping
the conntrack table. Every relayed stream's entry carries an nft `ct timeout` policy equal
to its call's idle timeout, so the kernel itself times the silence:

- NEW (group NFNLGRP_CONNTRACK_NEW) means a stream started carrying media;
- DESTROY (group NFNLGRP_CONNTRACK_DESTROY) without CTA_TIMEOUT means the entry expired:
  the kernel omits the attribute when no whole second is left, i.e. no packet came for the
  whole idle timeout. With CTA_TIMEOUT > 0 the entry was deleted early (by the node, an
  operator, a flush). An entry deleted in its very last second reads as expired, which is
  what it nearly was.

Events can be lost (ENOBUFS when the receive buffer fills): `read` reports it, the socket
stays usable, and the caller resynchronises (e.g. `ConntrackTable.alive` on the keys it
tracks). Events exist only for entries created while `net.netfilter.nf_conntrack_events`
is 1, or 2 (the default) while some ctnetlink listener exists anywhere on the host (the
kernel's flag is host-wide): under 2, an entry created with no listener never reports its
end, so the node must set 1. A first packet queued to userspace (NFQUEUE, raw or mangle)
and accepted gives NEW at the verdict; a dropped one gives no event at all.

Measured on this kernel (6.18, 2-core VM, lab netns): EXPIRED comes when the conntrack GC
next scans the host-wide table, not at the expiry time. The GC's interval adapts between
1 s and 60 s to the entries' remaining timeouts, biased towards 60 s: on a nearly idle host
one pass reaped every entry at once, late by 40-49 s (2 s policy, 6 entries), 36-51 s
(10 s) and 1-53 s (60 s, 3 entries); with other labs' short-timeout entries on the host
the GC ran more often and the lag was 14-22 s (2 s), 0.2-8.6 s (10 s) and 0.8-2.7 s
(60 s). So EXPIRED may come a minute late: a node that must end idle calls on time asks
`ConntrackTable.alive` for the keys whose deadline has passed, and a GET reaps an expired
entry at once (its EXPIRED event follows immediately) or tells the seconds left.
`decode_event` costs 4-4.6 µs per event (struct only, no pyroute2), `read` about 9 µs per
event with the recv.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct

from lrkp_tsl.dataplane.conntrack import (
    _BE32,
    _NLMSGHDR,
    CTA_TIMEOUT,
    CTA_TUPLE_ORIG,
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_NEW,
    IPPROTO_UDP,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_CTNETLINK,
    _attrs,
    _tuple,
    decode_counters,
)
from lrkp_tsl.errors import KernelError
from lrkp_tsl.kernel import StreamChange, StreamEvent

log = logging.getLogger("lrkp_tsl.dataplane")

# Bind mask of NFNLGRP_CONNTRACK_NEW (1) and NFNLGRP_CONNTRACK_DESTROY (3); not UPDATE (2),
# so every NEW-typed message received is a creation.
GROUPS = (1 << (1 - 1)) | (1 << (3 - 1))
SO_RCVBUFFORCE = 33  # not exported by Python's socket module
# The kernel doubles it: 16 MiB holds about 13,000 events (1,280 bytes each with skb
# overhead, measured), 13 s of a busy node's events while it is busy elsewhere.
RCVBUF = 8 << 20
# Larger than any event message (a DESTROY with counters is a few hundred bytes).
_RECV = 16384

_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE


def decode_event(message: bytes) -> StreamEvent | None:
    """One ctnetlink event message (header included) -> StreamEvent; None if it is not an
    IPv4 UDP NEW or DESTROY, or is malformed. Never raises: input comes from the kernel,
    but one odd message must not stop the node reading the others."""
    if len(message) < _NLMSGHDR.size + 4:
        return None
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(message)
    if length > len(message) or kind not in (_NEW, _DELETE):
        return None  # truncated: a DESTROY cut before CTA_TIMEOUT would read as expired
    if message[_NLMSGHDR.size] != socket.AF_INET:
        return None
    attrs = _attrs(message, _NLMSGHDR.size + 4, length)
    span = attrs.get(CTA_TUPLE_ORIG)
    if span is None:
        return None
    orig = _tuple(message, span)
    if orig is None or orig[2] != IPPROTO_UDP:
        return None
    key = (orig[0], orig[1])
    if kind == _NEW:
        return StreamEvent(StreamChange.STARTED, key)
    timeout = attrs.get(CTA_TIMEOUT)
    counters = decode_counters(message, attrs)
    if (
        timeout is None
        or timeout[1] - timeout[0] < 4
        or not _BE32.unpack_from(message, timeout[0])[0]
    ):
        return StreamEvent(StreamChange.EXPIRED, key, counters)
    return StreamEvent(StreamChange.REMOVED, key, counters)


class ConntrackEvents:
    """Conntrack NEW and DESTROY events of the network namespace this object was created in.

    Non-blocking: register `fileno()` with a selector or event loop and call `read` when it
    is readable.
    """

    def __init__(self, rcvbuf: int = RCVBUF) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER
        )
        try:
            self._set_rcvbuf(rcvbuf)
            self._sock.bind((0, GROUPS))
        except OSError as exc:
            self._sock.close()
            raise KernelError(f"conntrack events: cannot subscribe: {exc}") from exc

    def _set_rcvbuf(self, size: int) -> None:
        """SO_RCVBUFFORCE passes net.core.rmem_max (root only); SO_RCVBUF is capped by it.

        Lost events cost a resynchronisation, so a small buffer is worth a warning."""
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            obtained = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            log.warning(
                "conntrack events: asked for a %d-byte receive buffer, obtained %d "
                "(SO_RCVBUFFORCE needs CAP_NET_ADMIN; SO_RCVBUF is capped by "
                "net.core.rmem_max): a burst may lose events",
                size,
                obtained,
            )

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def read(self, limit: int = 4096) -> tuple[list[StreamEvent], bool]:
        """The IPv4 UDP events waiting, up to `limit` messages, and whether any were lost.

        `overflowed` is True when the kernel dropped events because the receive buffer was
        full (recv raised ENOBUFS): the caller must resynchronise. The socket stays usable
        and the events still queued are read on.
        """
        events: list[StreamEvent] = []
        overflowed = False
        count = 0
        while count < limit:
            try:
                data = self._sock.recv(_RECV)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    overflowed = True
                    continue
                raise KernelError(f"conntrack events: read failed: {exc}") from exc
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                (length,) = struct.unpack_from("=I", data, offset)
                if length < _NLMSGHDR.size:
                    break
                count += 1
                whole = offset == 0 and length == len(data)
                event = decode_event(data if whole else data[offset : offset + length])
                if event is not None:
                    events.append(event)
                offset += (length + 3) & ~3
        return events, overflowed


CTA_MARK = 8
CTA_MARK_MASK = 21
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
# A mark no entry carries: the dump sends nothing back, it only walks the table.
_NO_MARK = 0xFFFFFFFF


def sweep_request(seq: int) -> bytes:
    """A conntrack dump filtered to mark 0xffffffff/0xffffffff: a walk that returns nothing."""
    attrs = struct.pack("=HHI", 8, CTA_MARK, socket.htonl(_NO_MARK)) + struct.pack(
        "=HHI", 8, CTA_MARK_MASK, socket.htonl(_NO_MARK)
    )
    header = struct.pack(
        "=IHHIIBBH",
        _NLMSGHDR.size + 4 + len(attrs),
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        0,
        socket.AF_INET,
        0,
        0,
    )
    return header + attrs


class Reaper:
    """Makes the kernel reap expired conntrack entries now rather than up to a minute late.

    The conntrack GC is lazy (see the module docstring): left alone, EXPIRED events, and so
    idle calls ending, come up to ~60 s late. A dump walks the whole table and evicts every
    expired entry it passes, whatever its filter; with a filter that matches nothing it
    sends nothing back. So `sweep` costs a walk of the table in the kernel (~10 ms for
    262,144 buckets here, measured in the benchmark) and no decoding in Python; the node
    runs it in a worker thread every few seconds, so the event loop never waits for it.
    Its own socket: it must not share one with requests made from the event loop.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._seq = 0

    def sweep(self) -> int:
        """One walk; returns how many entries matched (normally 0)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        matched = 0
        try:
            self._sock.send(sweep_request(self._seq))
            while True:
                data = self._sock.recv(_RECV)
                offset = 0
                while offset + _NLMSGHDR.size <= len(data):
                    length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                    if seq == self._seq:
                        if kind == NLMSG_DONE:
                            return matched
                        if kind == NLMSG_ERROR:
                            (error,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                            if error:
                                raise KernelError(f"conntrack sweep refused: error {-error}")
                            return matched
                        matched += 1
                    offset += max((length + 3) & ~3, _NLMSGHDR.size)
        except OSError as exc:
            raise KernelError(f"conntrack sweep failed: {exc}") from exc

    def close(self) -> None:
        self._sock.close()
