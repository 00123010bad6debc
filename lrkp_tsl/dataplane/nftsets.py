"""Set and map elements of nf_tables, read over netlink: the node's flows at startup.

At startup the node reads every element of `dnat_to`, `snat_to` and `learning` to reconcile
them with its store. libnftables' `list map` takes seconds for 100,000s of elements and keeps
its whole listing cached in C memory afterwards; this module instead dumps each set with
NFT_MSG_GETSETELEM (NLM_F_DUMP) over the socket, framing and error handling of nftwatch's
`RulesetWatch`, and decodes the replies with `struct` as they arrive.

It is separate from nftwatch on purpose: nftwatch runs every half second and promises to
read no set element (its cost follows rules and chains, not calls); reading elements is
O(elements), happens once at startup, and decodes into the node's media types.

What a dump carries, per element (checked against `nft -j list map` on this kernel): a
NFTA_LIST_ELEM holding NFTA_SET_ELEM_KEY and, in a map, NFTA_SET_ELEM_DATA (each a nested
NFTA_DATA_VALUE), NFTA_SET_ELEM_FLAGS if any, and NFTA_SET_ELEM_USERDATA if nftables gave
the element a comment. A concatenation's fields each fill a 4-byte register, so:

    flow key  ip(4) port(2) pad(2) ip(4) port(2) pad(2)   16 bytes, network order
    endpoint  ip(4) port(2) pad(2)                          8 bytes (map data, `learning`)

User data is libnftnl's TLV list (one-byte type, one-byte length, value; no padding); the
comment is type NFTNL_UDATA_SET_ELEM_COMMENT (0), a NUL-terminated string.

Decoding keeps raw bytes until the end (keys are the dict keys), then builds each Endpoint
once through a cache keyed by its 8 raw bytes: one call's elements share endpoints (a flow's
target is another flow's sender, its relay_out another flow's relay).

Where the time goes at scale: the kernel fills one dump message (at most 32 KiB, some 250
elements with the node's comments) per recvmsg, and for each one walks the set's hash table
again from its first element, skipping those already sent. A dump therefore costs
O(elements^2 / 250) in the kernel: 0.08 s for 40,000 elements, 3.9 s for 200,000 (measured
on 6.18), whatever the reader; libnftables pays it too, on top of its own cost. The walk runs
inside recvmsg, without the GIL, so `read_flows` dumps the two maps on two sockets at once.

Every transaction in the namespace (on any table) interrupts a dump (NLM_F_DUMP_INTR); it is
read again, at most ATTEMPTS times, so a ruleset that changes more often than a dump lasts
makes a read fail with a KernelError rather than return a partial map.

The startup reconciliation cannot wait for a quiet ruleset: the node's own commands commit a
transaction each (100 a second on a busy node), while a dump of 50,000 calls lasts seconds.
So `read_state` never fails for a changing ruleset: it returns a `Snapshot` that says
whether it is *consistent* (every message of the three sets from one generation, none
interrupted). What an inconsistent snapshot holds is still true in one way, and the engine
relies on that way only: each element it holds was in the kernel at some instant of the
read (the kernel dumps only committed elements). What it lacks proves nothing: the kernel
resumes a dump by counting elements from the start of the set again for every message, so
an element deleted behind the cursor makes the next one be skipped (and a resize of the
hash table reorders everything). Attempts are merged, so an element is missing only if
every attempt skipped it.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from ipaddress import IPv4Address

from lrkp_tsl.dataplane.nftwatch import (
    _NLATTR,
    ATTEMPTS,
    NFTA_LIST_ELEM,
    NLA_TYPE_MASK,
    NLM_F_DUMP,
    RulesetWatch,
    _Interrupted,
    attr_string,
    encode_request,
    family_number,
)
from lrkp_tsl.errors import KernelError, MediaError
from lrkp_tsl.kernel import KernelState
from lrkp_tsl.media import Endpoint, InstalledFlow

# enum nf_tables_msg_types (linux/netfilter/nf_tables.h)
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
# enum nft_set_elem_list_attributes
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
# enum nft_set_elem_attributes
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_FLAGS = 3
NFTA_SET_ELEM_USERDATA = 6
# enum nft_data_attributes
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
# enum nft_set_elem_flags
NFT_SET_ELEM_INTERVAL_END = 0x1
NFT_SET_ELEM_CATCHALL = 0x2
# libnftnl's enum nftnl_udata_set_elem_types (libnftnl/udata.h)
NFTNL_UDATA_SET_ELEM_COMMENT = 0

# Register layout of the node's concatenations (see the module docstring).
FLOW_KEY_SIZE = 16
ENDPOINT_SIZE = 8

# The kernel caps a dump datagram at 32 KiB; a 1 MiB buffer leaves any future kernel room.
RECV_BUFFER = 1 << 20
# `read_state`: reads of the three sets before an inconsistent snapshot is returned.
SNAPSHOT_ATTEMPTS = 3

_U32 = struct.Struct(">I")
_SKIP = NFT_SET_ELEM_INTERVAL_END | NFT_SET_ELEM_CATCHALL


def setelems_request(seq: int, family: int, table: str, name: str) -> bytes:
    """A dump of every element of set (or map) `name` of `table`."""
    attrs = attr_string(NFTA_SET_ELEM_LIST_TABLE, table) + attr_string(NFTA_SET_ELEM_LIST_SET, name)
    return encode_request(NFT_MSG_GETSETELEM, NLM_F_DUMP, seq, family, attrs)


# -- decoding (pure: every malformed input is a KernelError) --------------------------------


class SetElements:
    """The raw elements of one set or map, filled by `add` from the bodies of a dump.

    `values` maps each key (key_size bytes) to its data (data_size bytes; b"" in a set);
    `userdata` holds the NFTA_SET_ELEM_USERDATA of the elements that have some.
    `generations` are the res_ids (ruleset generation, low 16 bits) of the replies.
    """

    __slots__ = (
        "_data_head",
        "_fast",
        "_key_head",
        "data_size",
        "generations",
        "key_size",
        "name",
        "userdata",
        "values",
    )

    def __init__(self, name: str, key_size: int, data_size: int = 0) -> None:
        self.name = name
        self.key_size = key_size
        self.data_size = data_size
        self.values: dict[bytes, bytes] = {}
        self.userdata: dict[bytes, bytes] = {}
        self.generations: set[int] = set()
        # The usual element starts with KEY{VALUE} (and DATA{VALUE}) in this order, without
        # NLA_F_NESTED: one unpack and two compares decode it. Anything else takes the
        # attribute-by-attribute path.
        self._key_head = _nested_value_head(NFTA_SET_ELEM_KEY, key_size)
        self._data_head = _nested_value_head(NFTA_SET_ELEM_DATA, data_size)
        fmt = f"=8s{key_size}s" + (f"8s{data_size}s" if data_size else "")
        self._fast = struct.Struct(fmt)

    def __len__(self) -> int:
        return len(self.values)

    def merge(self, other: SetElements) -> None:
        """Add what `other` (a later read of the same set) holds: its values win."""
        self.values.update(other.values)
        for key in other.values:
            udata = other.userdata.get(key)
            if udata is None:
                self.userdata.pop(key, None)
            else:
                self.userdata[key] = udata
        self.generations |= other.generations

    def add(self, body: bytes) -> None:
        """Decode one NFT_MSG_NEWSETELEM reply body (nfgenmsg + attributes) into self."""
        if len(body) < 4:
            raise KernelError("nf_tables reply: no nfgenmsg")
        self.generations.add(int.from_bytes(body[2:4], "big"))
        start, end = self._elements_span(body)
        unpack_attr = _NLATTR.unpack_from
        unpack_fast = self._fast.unpack_from
        fast_size = self._fast.size
        key_head, data_head = self._key_head, self._data_head
        is_map = self.data_size != 0
        values, userdata = self.values, self.userdata
        pos = start
        while pos < end:
            if end - pos < 4:
                raise KernelError("nf_tables reply: truncated set element")
            length, kind = unpack_attr(body, pos)
            stop = pos + length
            if length < 4 or stop > end:
                raise KernelError(f"nf_tables reply: set element of bad length {length}")
            if kind & NLA_TYPE_MASK == NFTA_LIST_ELEM:
                inner = pos + 4
                rest = inner + fast_size
                if rest <= stop:
                    parts = unpack_fast(body, inner)
                    if parts[0] == key_head and (not is_map or parts[2] == data_head):
                        key = parts[1]
                        if rest == stop:
                            values[key] = parts[3] if is_map else b""
                            userdata.pop(key, None)  # a key dumped twice: the last one wins
                            pos = stop + (-length & 3)
                            continue
                        # Only the user data after it (the comment): the usual case.
                        if stop - rest >= 4:
                            ulen, ukind = unpack_attr(body, rest)
                            if (
                                ukind & NLA_TYPE_MASK == NFTA_SET_ELEM_USERDATA
                                and ulen >= 4
                                and rest + ((ulen + 3) & ~3) == stop
                            ):
                                values[key] = parts[3] if is_map else b""
                                userdata[key] = body[rest + 4 : rest + ulen]
                                pos = stop + (-length & 3)
                                continue
                self._element(body, inner, stop)
            pos = stop + (-length & 3)

    def _elements_span(self, body: bytes) -> tuple[int, int]:
        """Offsets of NFTA_SET_ELEM_LIST_ELEMENTS' payload; (0, 0) if the message has none."""
        span = (0, 0)
        pos, end = 4, len(body)
        while pos < end:
            if end - pos < 4:
                raise KernelError(f"nf_tables reply: {end - pos} trailing attribute bytes")
            length, kind = _NLATTR.unpack_from(body, pos)
            if length < 4 or pos + length > end:
                raise KernelError(f"nf_tables reply: attribute {kind} of bad length {length}")
            kind &= NLA_TYPE_MASK
            if kind == NFTA_SET_ELEM_LIST_ELEMENTS:
                span = (pos + 4, pos + length)
            elif kind == NFTA_SET_ELEM_LIST_SET:
                name = body[pos + 4 : pos + length].split(b"\0", 1)[0]
                if name != self.name.encode():
                    raise KernelError(
                        f"nf_tables reply: elements of set {name!r}, expected {self.name!r}"
                    )
            pos += (length + 3) & ~3
        return span

    def _element(self, body: bytes, pos: int, end: int) -> None:
        """One element's attributes in body[pos:end], in any order (the general path)."""
        key = data = udata = None
        flags = 0
        while pos < end:
            if end - pos < 4:
                raise KernelError("nf_tables reply: truncated set element attribute")
            length, kind = _NLATTR.unpack_from(body, pos)
            if length < 4 or pos + length > end:
                raise KernelError(f"nf_tables reply: element attribute {kind} of bad length")
            kind &= NLA_TYPE_MASK
            if kind == NFTA_SET_ELEM_KEY:
                key = _data_value(body, pos + 4, pos + length, "key")
            elif kind == NFTA_SET_ELEM_DATA:
                data = _data_value(body, pos + 4, pos + length, "data")
            elif kind == NFTA_SET_ELEM_FLAGS:
                if length != 8:
                    raise KernelError("nf_tables reply: set element flags not 4 bytes")
                (flags,) = _U32.unpack_from(body, pos + 4)
            elif kind == NFTA_SET_ELEM_USERDATA:
                udata = body[pos + 4 : pos + length]
            pos += (length + 3) & ~3
        if flags & _SKIP:
            return  # the end of an interval, or the catch-all element: no key of its own
        if key is None or len(key) != self.key_size:
            raise KernelError(
                f"nf_tables reply: element of {self.name} with a key of "
                f"{'no' if key is None else len(key)} bytes, expected {self.key_size}"
            )
        if self.data_size:
            if data is None or len(data) != self.data_size:
                raise KernelError(
                    f"nf_tables reply: element of map {self.name} with "
                    f"{'no' if data is None else len(data)} bytes of data, "
                    f"expected {self.data_size}"
                )
        elif data is not None:
            raise KernelError(f"nf_tables reply: {self.name} is a map, read as a set")
        self.values[key] = data or b""
        if udata is not None:
            self.userdata[key] = udata
        else:
            self.userdata.pop(key, None)


def _nested_value_head(kind: int, size: int) -> bytes:
    """The 8 header bytes of `kind { NFTA_DATA_VALUE (size bytes) }`, as the kernel dumps."""
    return _NLATTR.pack(8 + size, kind) + _NLATTR.pack(4 + size, NFTA_DATA_VALUE)


def _data_value(body: bytes, pos: int, end: int, what: str) -> bytes:
    """The NFTA_DATA_VALUE inside a nested nft_data attribute in body[pos:end]."""
    while pos < end:
        if end - pos < 4:
            raise KernelError(f"nf_tables reply: truncated element {what}")
        length, kind = _NLATTR.unpack_from(body, pos)
        if length < 4 or pos + length > end:
            raise KernelError(f"nf_tables reply: element {what} of bad length {length}")
        kind &= NLA_TYPE_MASK
        if kind == NFTA_DATA_VALUE:
            return body[pos + 4 : pos + length]
        if kind == NFTA_DATA_VERDICT:
            raise KernelError(f"nf_tables reply: element {what} is a verdict, not a value")
        pos += (length + 3) & ~3
    raise KernelError(f"nf_tables reply: element {what} without a value")


def element_comment(udata: bytes) -> str:
    """The comment in an element's user data (libnftnl TLVs), or "" if it has none."""
    pos, end = 0, len(udata)
    while pos < end:
        if end - pos < 2:
            raise KernelError("nf_tables reply: truncated element user data")
        kind, length = udata[pos], udata[pos + 1]
        value_end = pos + 2 + length
        if value_end > end:
            raise KernelError(f"nf_tables reply: element user data {kind} of bad length")
        if kind == NFTNL_UDATA_SET_ELEM_COMMENT:
            value = udata[pos + 2 : value_end]
            # nftables stores it NUL-terminated; libnftables prints what precedes the NUL.
            return value.split(b"\0", 1)[0].decode(errors="replace")
        pos = value_end
    return ""


class Endpoints:
    """Builds Endpoints from 8 raw bytes (ip, port, pad), each distinct one once."""

    __slots__ = ("_addresses", "cache")

    def __init__(self) -> None:
        self.cache: dict[bytes, Endpoint] = {}
        self._addresses: dict[bytes, IPv4Address] = {}

    def new(self, raw: bytes) -> Endpoint:
        """The Endpoint of `raw` (after a miss in `cache`, which callers try first)."""
        packed = raw[:4]
        ip = self._addresses.get(packed)
        if ip is None:
            ip = self._addresses[packed] = IPv4Address(packed)
        try:
            endpoint = Endpoint(ip, (raw[4] << 8) | raw[5])
        except MediaError as exc:
            raise KernelError(f"nf_tables element: {exc.reason}") from None
        self.cache[raw] = endpoint
        return endpoint


def merge_flows(dnat: SetElements, snat: SetElements) -> list[InstalledFlow]:
    """The flows of both maps, merged by key, as NftTable.installed() reads them.

    A key in only one map gives a flow with the other side None; the comment is dnat_to's
    if it has one, else snat_to's. Order: dnat_to's elements, then snat_to's own.
    """
    endpoints = Endpoints()
    cache_get, new = endpoints.cache.get, endpoints.new
    comments: dict[bytes, str] = {}
    flows: list[InstalledFlow] = []
    append = flows.append
    snat_values, dnat_values = snat.values, dnat.values
    dnat_udata, snat_udata = dnat.userdata, snat.userdata

    def comment(raw: bytes) -> str:
        text = comments.get(raw)
        if text is None:
            text = comments[raw] = element_comment(raw)
        return text

    for key, target in dnat_values.items():
        raw = dnat_udata.get(key)
        text = "" if raw is None else comments.get(raw) or comment(raw)
        if not text:
            raw = snat_udata.get(key)
            if raw is not None:
                text = comments.get(raw) or comment(raw)
        sender, relay = key[:8], key[8:]
        relay_out = snat_values.get(key)
        append(
            InstalledFlow(
                text,
                cache_get(sender) or new(sender),
                cache_get(relay) or new(relay),
                cache_get(target) or new(target),
                None if relay_out is None else cache_get(relay_out) or new(relay_out),
            )
        )
    for key, relay_out in snat_values.items():
        if key in dnat_values:
            continue
        raw = snat_udata.get(key)
        sender, relay = key[:8], key[8:]
        append(
            InstalledFlow(
                "" if raw is None else comment(raw),
                cache_get(sender) or new(sender),
                cache_get(relay) or new(relay),
                None,
                cache_get(relay_out) or new(relay_out),
            )
        )
    return flows


def endpoint_set(elements: SetElements) -> frozenset[Endpoint]:
    """The Endpoints of a set of `ipv4_addr . inet_service` elements."""
    endpoints = Endpoints()
    cache_get, new = endpoints.cache.get, endpoints.new
    return frozenset(cache_get(key) or new(key) for key in elements.values)


# -- the sockets -----------------------------------------------------------------------------


class SetDump(RulesetWatch):
    """One nf_tables socket, in the namespace it was created in, that dumps set elements."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = bytearray(RECV_BUFFER)

    def _receive(self, what: str) -> bytes:
        # The kernel sizes each dump message by the largest read so far (at most 32 KiB):
        # fewer, fuller messages are what keeps the kernel's side of a dump cheap.
        size, _ancdata, msg_flags, _address = self._sock.recvmsg_into([self._buffer])
        if msg_flags & socket.MSG_TRUNC:
            raise KernelError(f"{what}: a reply did not fit in {RECV_BUFFER} bytes")
        return bytes(memoryview(self._buffer)[:size])

    def elements(
        self, family: str, table: str, name: str, key_size: int, data_size: int = 0
    ) -> SetElements:
        """Every element of set (or map) `name`, read in one consistent dump.

        A dump that crossed a transaction (NLM_F_DUMP_INTR, or replies of two generations)
        is read again, at most ATTEMPTS times. A missing table or set is a KernelError.
        """
        for _attempt in range(ATTEMPTS):
            found, consistent = self.dump_once(family, table, name, key_size, data_size)
            if consistent:
                return found
        what = f"reading set {family} {table} {name}"
        raise KernelError(f"{what}: the ruleset changed during each of {ATTEMPTS} reads")

    def dump_once(
        self, family: str, table: str, name: str, key_size: int, data_size: int = 0
    ) -> tuple[SetElements, bool]:
        """One dump of set `name`, whatever happens meanwhile: (elements, consistent).

        Not consistent when it crossed a transaction: then every element it holds was in
        the set at some instant of the dump, but some that were there may be missing
        (see the module docstring). A missing table or set is a KernelError.
        """
        number = family_number(family)
        what = f"reading set {family} {table} {name}"
        found = SetElements(name, key_size, data_size)
        try:
            replies = self._exchange(
                lambda seq: setelems_request(seq, number, table, name), what, found.add
            )
        except _Interrupted:
            return found, False
        if replies is None:
            raise KernelError(f"{what}: no such table or set")
        return found, len(found.generations) <= 1


class SetReader(SetDump):
    """The node's flows and learning endpoints, read from nf_tables of the namespace this
    was created in (two sockets: the two flow maps are dumped in parallel)."""

    def __init__(self) -> None:
        super().__init__()
        try:
            self._peer = SetDump()
        except KernelError:
            super().close()
            raise

    def close(self) -> None:
        self._peer.close()
        super().close()

    def __enter__(self) -> SetReader:
        return self

    def read_flows(
        self,
        family: str = "ip",
        table: str = "lrkp",
        maps: tuple[str, str] = ("dnat_to", "snat_to"),
    ) -> list[InstalledFlow]:
        """Every flow of the (dnat, snat) maps, merged by key: see `merge_flows`.

        The kernel restarts its walk of a set from the first element for every 32 KiB
        dump message, so a dump costs O(elements^2) in the kernel (seconds at 200,000):
        the second map is dumped on the second socket by a thread meanwhile (the kernel
        work runs in recvmsg, without the GIL). Both maps are read from the same ruleset
        generation (read again otherwise).
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nftsets") as pool:
            for _attempt in range(ATTEMPTS):
                pending = pool.submit(
                    self._peer.elements, family, table, maps[1], FLOW_KEY_SIZE, ENDPOINT_SIZE
                )
                try:
                    dnat = self.elements(family, table, maps[0], FLOW_KEY_SIZE, ENDPOINT_SIZE)
                except BaseException:
                    wait([pending])
                    raise
                snat = pending.result()
                if len(dnat.generations | snat.generations) <= 1:
                    with _gc_paused():
                        return merge_flows(dnat, snat)
        raise KernelError(
            f"reading maps {family} {table} {' and '.join(maps)}: the ruleset changed "
            f"between them during each of {ATTEMPTS} reads"
        )

    def read_learning(
        self, family: str = "ip", table: str = "lrkp", name: str = "learning"
    ) -> frozenset[Endpoint]:
        """The endpoints of set `learning` (`ipv4_addr . inet_service`)."""
        elements = self.elements(family, table, name, ENDPOINT_SIZE)
        with _gc_paused():
            return endpoint_set(elements)

    def read_state(
        self,
        family: str = "ip",
        table: str = "lrkp",
        maps: tuple[str, str] = ("dnat_to", "snat_to"),
        learning: str = "learning",
        attempts: int = SNAPSHOT_ATTEMPTS,
    ) -> KernelState:
        """The flows of both maps and the learning endpoints, as one snapshot.

        Consistent (`KernelState.consistent`) when the three dumps of one attempt were
        neither interrupted nor of more than one ruleset generation. While commands keep
        changing the ruleset no attempt may be: after `attempts`, what they all read is
        merged and returned as an inconsistent snapshot (never an error; see the module
        docstring for what it can be trusted with). A missing table or set is a
        KernelError.
        """
        union: list[SetElements] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nftsets") as pool:
            for _attempt in range(max(1, attempts)):
                pending = pool.submit(
                    self._peer.dump_once, family, table, maps[1], FLOW_KEY_SIZE, ENDPOINT_SIZE
                )
                try:
                    dnat, dnat_ok = self.dump_once(
                        family, table, maps[0], FLOW_KEY_SIZE, ENDPOINT_SIZE
                    )
                    ends, ends_ok = self.dump_once(family, table, learning, ENDPOINT_SIZE)
                except BaseException:
                    wait([pending])
                    raise
                snat, snat_ok = pending.result()
                read = [dnat, snat, ends]
                generations = dnat.generations | snat.generations | ends.generations
                if dnat_ok and snat_ok and ends_ok and len(generations) <= 1:
                    return _state(read, consistent=True)
                if union is None:
                    union = read
                else:
                    for merged, later in zip(union, read, strict=True):
                        merged.merge(later)
        assert union is not None
        return _state(union, consistent=False)


def _state(sets: list[SetElements], *, consistent: bool) -> KernelState:
    dnat, snat, learning = sets
    with _gc_paused():
        return KernelState(tuple(merge_flows(dnat, snat)), endpoint_set(learning), consistent)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while building 100,000s of objects that hold no cycles (~25% faster)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
