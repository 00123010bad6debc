"""Map and set element changes as one nf_tables netlink batch, encoded here with `struct`.

Why not libnftables: a JSON `add element` transaction cost ~370 µs of the ~600 µs an `S`
took (parsing JSON, fetching the table's cache over netlink, building the batch). The same
batch, encoded directly, is one sendmsg of a few hundred bytes; the kernel processes it
before sendmsg returns, so the replies (errors only: no message asks for an ack) are
already queued when it does, and a non-blocking read collects them.

A batch holds the changes of one or several calls (group commit): each call's messages are
tagged with its index, and an error names the message (by sequence number) that caused it,
so a failure is pinned on one call. nf_tables applies a batch all or nothing: when some
call fails, the batch is sent again without it (`Batch.commit`); the others still commit
together, and the failed call gets its own error.

Deleting an element that is gone is not an error for the node (an operator, or an earlier
failure, removed it): each deletion is its own message, so an ENOENT names exactly the
missing element, which is dropped from the batch before it is sent again.

Element layout (the same as nftsets.py reads): flow key ip(4) port(2) pad(2) ip(4)
port(2) pad(2); endpoint ip(4) port(2) pad(2); the comment is libnftnl's user data TLV
(type NFTNL_UDATA_SET_ELEM_COMMENT, length, NUL-terminated text).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lrkp_tsl.dataplane.nftwatch import (
    _NFGENMSG,
    _NLMSGHDR,
    NFNETLINK_V0,
    NFNL_SUBSYS_NFTABLES,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    attr,
    attr_string,
    error_code,
    nf_tables_socket,
    split_messages,
)
from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import Endpoint

NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0

RECV_SIZE = 1 << 16
RCVBUF = 4 << 20
SO_RCVBUFFORCE = 33  # linux/asm-generic/socket.h (not in Python's socket module)
# A batch that keeps failing for a new reason on every attempt is given up (bounds a bug).
MAX_ROUNDS = 8

_PORT = struct.Struct(">H2x")
_BEGIN_RES_ID = struct.Struct(">H")


@functools.lru_cache(maxsize=1 << 16)
def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """ip(4) port(2) pad(2): one `ipv4_addr . inet_service` in nf_tables registers."""
    return endpoint.ip.packed + _PORT.pack(endpoint.port)


def _nested(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload)


def comment_udata(comment: str) -> bytes:
    text = comment.encode()[:254] + b"\0"
    return bytes((NFTNL_UDATA_SET_ELEM_COMMENT, len(text))) + text


_HEADER = struct.Struct("=HH")


def _value_head(kind: int, size: int) -> bytes:
    """The 8 header bytes of `kind { NFTA_DATA_VALUE (size bytes) }` (size a multiple of 4)."""
    return _HEADER.pack(8 + size, kind | NLA_F_NESTED) + _HEADER.pack(4 + size, NFTA_DATA_VALUE)


_KEY_HEADS = {size: _value_head(NFTA_SET_ELEM_KEY, size) for size in (8, 16)}
_DATA_HEADS = {size: _value_head(NFTA_SET_ELEM_DATA, size) for size in (8, 16)}


def comment_attr(comment: str) -> bytes:
    """NFTA_SET_ELEM_USERDATA holding `comment` ("" for none): encoded once per call."""
    return attr(NFTA_SET_ELEM_USERDATA, comment_udata(comment)) if comment else b""


def element(key: bytes, data: bytes | None = None, note: bytes = b"") -> bytes:
    """One NFTA_LIST_ELEM: key, data (maps), `note` (a `comment_attr`). Keys and data are
    8 or 16 bytes (the node's concatenations), so their headers are precomputed."""
    body = _KEY_HEADS[len(key)] + key
    if data is not None:
        body += _DATA_HEADS[len(data)] + data
    body += note
    return _HEADER.pack(4 + len(body), NFTA_LIST_ELEM | NLA_F_NESTED) + body


@dataclass(slots=True)
class Message:
    """One NEWSETELEM/DELSETELEM message of a batch, before its header is added."""

    owner: int  # index of the call (command) it belongs to
    msg_type: int
    set_name: str
    elements: bytes  # concatenated NFTA_LIST_ELEMs
    deletion: bool = False
    # A deletion's elements one by one: nf_tables refuses the whole message (ENOENT) if
    # one of them is gone, without saying which, so `commit` then deletes them singly.
    pieces: tuple[bytes, ...] = ()

    def singly(self) -> list[Message]:
        return [Message(self.owner, self.msg_type, self.set_name, p, True) for p in self.pieces]


@dataclass(slots=True)
class Changes:
    """The messages of one call's change."""

    messages: list[Message] = field(default_factory=list)
    missing: int = 0  # deletions of elements that were already gone


def encode_batch(
    family: int, table: str, messages: Sequence[Message], seq: int, *, raw: bool = False
) -> tuple[bytes, dict[int, Message]]:
    """BATCH_BEGIN, the messages, BATCH_END; and the message of each sequence number.

    `raw`: each message's `elements` are its whole attributes (not a set element list)."""
    parts: list[bytes] = []
    by_seq: dict[int, Message] = {}
    table_attr = attr_string(NFTA_SET_ELEM_LIST_TABLE, table)

    def header(msg_type: int, flags: int, number: int, fam: int, res_id: int, size: int) -> bytes:
        length = _NLMSGHDR.size + _NFGENMSG.size + size
        return _NLMSGHDR.pack(length, msg_type, flags, number, 0) + (
            struct.pack("=BB", fam, NFNETLINK_V0) + _BEGIN_RES_ID.pack(res_id)
        )

    parts.append(header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, 0))
    number = seq
    for message in messages:
        number += 1
        by_seq[number] = message
        attrs = (
            message.elements
            if raw
            else table_attr
            + attr_string(NFTA_SET_ELEM_LIST_SET, message.set_name)
            + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, message.elements)
        )
        flags = NLM_F_REQUEST | (0 if message.deletion else NLM_F_CREATE)
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | message.msg_type
        parts.append(header(msg_type, flags, number, family, 0, len(attrs)) + attrs)
    number += 1
    parts.append(header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, number, 0, NFNL_SUBSYS_NFTABLES, 0))
    return b"".join(parts), by_seq


class BatchSocket:
    """One nf_tables netlink socket for element batches, in the namespace it was opened in."""

    def __init__(self, family: int, table: str) -> None:
        self.family = family
        self.table = table
        self._sock = nf_tables_socket()
        self._sock.setblocking(False)
        # Room for the error replies of a whole group (each quotes its request); as root,
        # past rmem_max. If they still overflow, `send` reports the batch as not committed.
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, option, RCVBUF)
                break
            except OSError:
                continue
        self._seq = 0
        self._overflowed = False

    def close(self) -> None:
        self._sock.close()

    def _drain(self) -> list[bytes]:
        data = []
        while True:
            try:
                data.append(self._sock.recv(RECV_SIZE))
            except BlockingIOError:
                return data
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._overflowed = True  # replies were lost; the rest is still read

    def send(
        self, messages: Sequence[Message], *, raw: bool = False
    ) -> dict[int, list[tuple[Message | None, int]]]:
        """Send one batch; the errors per owner, (message or None for the batch, -errno).

        An empty result means the batch committed. The kernel handles the whole batch
        inside sendmsg, so its error replies are queued when it returns.
        """
        self._drain()  # nothing of an earlier batch may be taken for this one's
        seq = self._seq + 1
        data, by_seq = encode_batch(self.family, self.table, messages, seq, raw=raw)
        self._seq = (seq + len(messages) + 1) & 0x7FFFFFFF
        try:
            self._sock.sendmsg([data])
        except OSError as exc:
            raise KernelError(f"sending an nf_tables batch: {exc}") from exc
        errors: dict[int, list[tuple[Message | None, int]]] = {}
        self._overflowed = False
        replies = self._drain()
        if self._overflowed:
            # Error replies were lost: there were errors, so nf_tables aborted the batch,
            # but which message caused them is unknown. Not pinned on anyone: `commit`
            # sends each call alone.
            errors[-1] = [(None, -errno.ENOBUFS)]
        for datagram in replies:
            for reply in split_messages(datagram):
                if reply.type != NLMSG_ERROR:
                    continue
                code = error_code(reply)
                if code == 0:
                    continue
                message = by_seq.get(reply.seq)
                owner = message.owner if message is not None else -1
                errors.setdefault(owner, []).append((message, code))
        return errors


NFT_MSG_DELCHAIN = 5
NFT_MSG_DELSET = 11
# NFTA_CHAIN_TABLE / NFTA_SET_TABLE, NFTA_CHAIN_NAME / NFTA_SET_NAME
_OBJECT_NAMES = {NFT_MSG_DELCHAIN: (1, 3), NFT_MSG_DELSET: (1, 2)}


def delete_object(sock: BatchSocket, msg_type: int, name: str) -> bool:
    """Delete one chain (NFT_MSG_DELCHAIN) or set (NFT_MSG_DELSET) of the socket's table,
    alone in its transaction; False if it did not exist. For what an older release's
    rules file had and a reload (`flush table` keeps chains and sets) would leave behind."""
    table_attr, name_attr = _OBJECT_NAMES[msg_type]
    attrs = attr_string(table_attr, sock.table) + attr_string(name_attr, name)
    errors = sock.send([Message(0, msg_type, "", attrs, deletion=True)], raw=True)
    codes = [code for errs in errors.values() for _m, code in errs]
    if any(code != -errno.ENOENT for code in codes):
        raise KernelError(f"deleting {name}: nft said: {', '.join(map(strerror, codes))}")
    return not codes


def strerror(code: int) -> str:
    return f"{errno.errorcode.get(-code, str(code))}: {os.strerror(-code)}"


def commit(
    sock: BatchSocket, changes: Sequence[Changes], what: Sequence[str]
) -> list[KernelError | None]:
    """Commit every call's changes in as few batches as possible; per call, None or its error.

    A call whose message fails (other than deleting a missing element) is taken out and
    the rest sent again; an error the kernel does not pin on one message (the commit as a
    whole) makes each call go alone, so one bad call never refuses the others.
    """
    results: list[KernelError | None] = [None] * len(changes)
    pending = [i for i, change in enumerate(changes) if change.messages]
    for _round in range(MAX_ROUNDS):
        if not pending:
            return results
        messages = [m for i in pending for m in changes[i].messages]
        errors = sock.send(messages)
        if not errors:
            return results
        if -1 in errors or any(m is None for errs in errors.values() for m, _ in errs):
            codes = ", ".join(strerror(c) for errs in errors.values() for _, c in errs)
            if len(pending) == 1:
                results[pending[0]] = KernelError(f"{what[pending[0]]}: nft said: {codes}")
                return results
            for i in pending:
                results[i] = commit(sock, [changes[i]], [what[i]])[0]
            return results
        for owner, errs in errors.items():
            change = changes[owner]
            # A deletion that found nothing makes nf_tables process the rest of the batch
            # without the elements it did delete: an addition of one of those keys (another
            # target for the same flow) then clashes (EEXIST). So while any deletion of the
            # change is missing, its other errors are only judged once that one is fixed.
            missing = [m for m, c in errs if m is not None and m.deletion and c == -errno.ENOENT]
            if missing:
                gone = {id(m) for m in missing}
                kept: list[Message] = []
                for m in change.messages:
                    if id(m) not in gone:
                        kept.append(m)
                    elif len(m.pieces) > 1:
                        kept += m.singly()  # which of them is gone is found one by one
                    else:
                        change.missing += 1
                change.messages = kept
            else:
                codes = ", ".join(strerror(c) for _, c in errs)
                results[owner] = KernelError(f"{what[owner]}: nft said: {codes}")
                pending.remove(owner)
    if pending:
        for i in pending:
            results[i] = KernelError(f"{what[i]}: nf_tables batch failed {MAX_ROUNDS} times")
    return results


def call_changes(
    owner: int,
    comment: str,
    *,
    add: Iterable[tuple[bytes, bytes, bytes]],
    delete: Iterable[bytes],
    learn: Iterable[bytes],
    unlearn: Iterable[bytes],
    displace: Iterable[bytes],
) -> Changes:
    """The messages of one call: one per set and kind (deletions first).

    `add`: (flow key, dnat data, snat data); the others are raw keys. Deleting an element
    that is already gone is not an error (`commit` counts it in `missing`).
    """
    messages: list[Message] = []
    gone = tuple(element(key) for key in delete)
    if gone:
        joined = b"".join(gone)
        for name in ("dnat_to", "snat_to"):
            messages.append(Message(owner, NFT_MSG_DELSETELEM, name, joined, True, gone))
    unlearned = tuple(element(key) for key in unlearn)
    if unlearned:
        messages.append(
            Message(owner, NFT_MSG_DELSETELEM, "learning", b"".join(unlearned), True, unlearned)
        )
    note = comment_attr(comment)
    dnat = b""
    snat = b""
    for key, target, relay_out in add:
        dnat += element(key, target, note)
        snat += element(key, relay_out, note)
    if dnat:
        messages.append(Message(owner, NFT_MSG_NEWSETELEM, "dnat_to", dnat))
        messages.append(Message(owner, NFT_MSG_NEWSETELEM, "snat_to", snat))
    learning = b"".join(element(key, None, note) for key in learn)
    if learning:
        messages.append(Message(owner, NFT_MSG_NEWSETELEM, "learning", learning))
    displaced = b"".join(element(key) for key in displace)
    if displaced:
        messages.append(Message(owner, NFT_MSG_NEWSETELEM, "displaced", displaced))
    return Changes(messages)
