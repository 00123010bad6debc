"""Cheap checks that a table, or one foreign rule, is still what the node installed.

Operators break the node's kernel state without meaning to: `systemctl restart nftables`
(Debian's nftables.conf starts with `flush ruleset`), `nft flush ruleset`, `nft delete table
ip lrkp`, `nft flush chain ...`, `iptables -t raw -F`. The daemon checks every half second
and repairs, so a check must cost the same with 200,000 map elements as with none, and must
not spawn a process. libnftables cannot do that (its `list` builds a cache, with elements
for `list chain` and `list table`), so this module speaks nf_tables netlink itself, with
`struct`, over one socket opened in the namespace to watch:

- `generation()`: NFT_MSG_GETGEN, the ruleset generation. Every committed nftables
  transaction bumps it, the node's own map updates included, so an unchanged generation
  means nothing changed (the cheapest check) and a changed one means "look closer".
- `fingerprint(family, table)`: NFT_MSG_GETTABLE for the table, a NFT_MSG_GETCHAIN dump and
  a NFT_MSG_GETRULE dump filtered to the table (the kernel honours NFTA_RULE_TABLE in a rule
  dump; it does not filter chain dumps, so chains of other tables are dropped here). Never
  a set element: its cost follows the number of rules and chains, not of calls.
- `has_rule(family, table, chain, needle)`: a rule dump of one chain, looking for `needle`
  in the rules' expressions and user data (iptables-nft keeps an xt comment inside its match
  expression, so the node's NFQUEUE rule is found by its comment); `chain_rules` gives the
  chain's rules in order, so a caller can see what stands ahead of its own.
- `set_counts(family, table)`: a set dump of the table (metadata, no element): how many
  elements each set holds, where the kernel says (NFTA_SET_COUNT: recent kernels, such as
  the lab's 6.18; older ones do not).
- `has_element(family, table, set, key)`: one element GET (an interval set answers for any
  key inside an interval): whether the node's relay addresses and ports are still there.
- `base_chains(family, table)`: each base chain's hook, priority and type, which the kernel
  will not change in place (a reload that asks for another gets EOPNOTSUPP).

What a fingerprint covers, and why more than (chain, rule handle) pairs: measured on this
kernel, `nft replace rule` keeps the rule's handle, `nft add chain ... { policy drop; }`
changes a base chain in place, and `nft add table ip lrkp { flags dormant; }` switches the
whole table off; none of them changes a handle. So a fingerprint is the table's handle and
flags, each chain's identity and hook/type/policy, and each rule's identity and a digest of
its expressions. Expressions whose dump carries packet-driven state (inline `counter`,
`quota`, `last`) are digested by name only, so traffic never changes a fingerprint.

Every reply carries the low 16 bits of the generation that produced it (nfgenmsg res_id);
a fingerprint whose three replies disagree was read across a transaction and is read again.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from lrkp_tsl.errors import KernelError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNETLINK_V0 = 0

# enum nf_tables_msg_types (linux/netfilter/nf_tables.h)
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFT_MSG_NEWCHAIN = 3
NFT_MSG_GETCHAIN = 4
NFT_MSG_NEWRULE = 6
NFT_MSG_GETRULE = 7
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFT_MSG_GETSET = 10
NFT_MSG_GETSETELEM = 13
NFT_MSG_GETOBJ = 19

# enum nft_table_attributes
NFTA_TABLE_NAME = 1
NFTA_TABLE_FLAGS = 2
NFTA_TABLE_HANDLE = 4
# enum nft_chain_attributes
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_HANDLE = 2
NFTA_CHAIN_NAME = 3
NFTA_CHAIN_HOOK = 4
NFTA_CHAIN_POLICY = 5
NFTA_CHAIN_TYPE = 7
NFTA_CHAIN_FLAGS = 10
NFTA_CHAIN_USERDATA = 12
# enum nft_rule_attributes
NFTA_RULE_TABLE = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_HANDLE = 3
NFTA_RULE_EXPRESSIONS = 4
NFTA_RULE_USERDATA = 7
# enum nft_list_attributes, enum nft_expr_attributes
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
# enum nft_hook_attributes
NFTA_HOOK_HOOKNUM = 1
NFTA_HOOK_PRIORITY = 2
# enum nft_set_attributes: NFTA_SET_COUNT only on recent kernels (absent on older ones)
NFTA_SET_TABLE = 1
NFTA_SET_NAME = 2
NFTA_SET_COUNT = 20
# enum nft_set_elem_list_attributes, nft_set_elem_attributes, nft_data_attributes
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_SET_ELEM_KEY = 1
NFTA_DATA_VALUE = 1
NLA_F_NESTED = 0x8000
# enum nft_gen_attributes
NFTA_GEN_ID = 1

NFTA_OBJ_TABLE = 1
NFTA_OBJ_NAME = 2
NFTA_OBJ_TYPE = 3
NFTA_OBJ_DATA = 4
NFTA_OBJ_HANDLE = 6
NFT_OBJECT_CT_TIMEOUT = 7
NFTA_CT_TIMEOUT_DATA = 3

# Chain attributes that define what a chain does; USE and COUNTERS change on their own.
CHAIN_DEFINING = (
    NFTA_CHAIN_HOOK,
    NFTA_CHAIN_POLICY,
    NFTA_CHAIN_TYPE,
    NFTA_CHAIN_FLAGS,
    NFTA_CHAIN_USERDATA,
)
# Expressions whose dump includes state that packets change: digested by name only.
STATEFUL_EXPRESSIONS = frozenset({b"counter", b"quota", b"last"})

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_TYPE_MASK = 0x3FFF

FAMILIES = {"ip": 2, "ip6": 10, "inet": 1, "arp": 3, "bridge": 7, "netdev": 5}
# enum nf_inet_hooks: the hooks of ip, ip6 and inet base chains
HOOKS = ("prerouting", "input", "forward", "output", "postrouting", "ingress")

# One dump message is at most 32 KiB (the kernel's cap on dump skbs); room to spare.
RECV_SIZE = 1 << 16
# A reply to a request on the same host arrives in microseconds; this only bounds a bug.
REPLY_TIMEOUT = 1.0
# Reads of a fingerprint spanning a transaction are repeated at most this often.
ATTEMPTS = 8

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_S32 = struct.Struct(">i")
_HEADER = _NLMSGHDR.size + _NFGENMSG.size


# -- encoding ------------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def attr_string(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute (NLA_STRING as nf_tables expects it)."""
    return attr(kind, text.encode() + b"\0")


def encode_request(msg_type: int, flags: int, seq: int, family: int, attrs: bytes = b"") -> bytes:
    """nlmsghdr + nfgenmsg (NFNETLINK_V0, res_id 0) + attributes, for subsystem nftables."""
    return (
        _NLMSGHDR.pack(
            _HEADER + len(attrs),
            (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
            NLM_F_REQUEST | flags,
            seq,
            0,
        )
        + _NFGENMSG.pack(family, NFNETLINK_V0, 0)
        + attrs
    )


def gen_request(seq: int) -> bytes:
    return encode_request(NFT_MSG_GETGEN, 0, seq, 0)


def table_request(seq: int, family: int, table: str) -> bytes:
    return encode_request(NFT_MSG_GETTABLE, 0, seq, family, attr_string(NFTA_TABLE_NAME, table))


def chains_request(seq: int, family: int) -> bytes:
    """A chain dump of one family (the kernel filters chain dumps by family only)."""
    return encode_request(NFT_MSG_GETCHAIN, NLM_F_DUMP, seq, family)


def rules_request(seq: int, family: int, table: str, chain: str | None = None) -> bytes:
    """A rule dump filtered by the kernel to one table, and to one chain if given."""
    attrs = attr_string(NFTA_RULE_TABLE, table)
    if chain is not None:
        attrs += attr_string(NFTA_RULE_CHAIN, chain)
    return encode_request(NFT_MSG_GETRULE, NLM_F_DUMP, seq, family, attrs)


def object_request(seq: int, family: int, table: str, name: str, kind: int) -> bytes:
    """One stateful object (a ct timeout policy, say): a GET, not a dump."""
    attrs = (
        attr_string(NFTA_OBJ_TABLE, table)
        + attr_string(NFTA_OBJ_NAME, name)
        + attr(NFTA_OBJ_TYPE, _U32.pack(kind))
    )
    return encode_request(NFT_MSG_GETOBJ, 0, seq, family, attrs)


def sets_request(seq: int, family: int, table: str) -> bytes:
    """A set dump of one table: each set's metadata (and count), never an element."""
    return encode_request(
        NFT_MSG_GETSET, NLM_F_DUMP, seq, family, attr_string(NFTA_SET_TABLE, table)
    )


def element_request(seq: int, family: int, table: str, name: str, key: bytes) -> bytes:
    """A GET of one element by its key (not a dump). Several keys in one request would get
    one reply each and an error for the first missing one; one key keeps it simple."""
    value = attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, attr(NFTA_DATA_VALUE, key))
    element = attr(NFTA_LIST_ELEM | NLA_F_NESTED, value)
    elements = attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, element)
    attrs = (
        attr_string(NFTA_SET_ELEM_LIST_TABLE, table)
        + attr_string(NFTA_SET_ELEM_LIST_SET, name)
        + elements
    )
    return encode_request(NFT_MSG_GETSETELEM, 0, seq, family, attrs)


# -- decoding (pure: every malformed input is a KernelError) --------------------------------


class Message(NamedTuple):
    """One netlink message: header fields and the bytes after nlmsghdr."""

    type: int
    flags: int
    seq: int
    body: bytes


def split_messages(data: bytes) -> list[Message]:
    """The messages of one datagram, framing checked."""
    messages = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise KernelError(f"nf_tables reply: {len(data) - offset} trailing bytes")
        length, msg_type, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise KernelError(
                f"nf_tables reply: message length {length} at offset {offset} "
                f"of a {len(data)}-byte datagram"
            )
        messages.append(
            Message(msg_type, flags, seq, data[offset + _NLMSGHDR.size : offset + length])
        )
        offset += (length + 3) & ~3
    return messages


def error_code(message: Message) -> int:
    """The (negative, or 0 for an ack) errno of an NLMSG_ERROR or NLMSG_DONE message."""
    if len(message.body) < _ERRNO.size:
        # A DONE without payload (some kernels) means success.
        if message.type == NLMSG_DONE:
            return 0
        raise KernelError("nf_tables reply: truncated error message")
    (code,) = _ERRNO.unpack_from(message.body)
    return int(code)


def parse_attrs(data: bytes, start: int = 0, end: int | None = None) -> dict[int, bytes]:
    """Attributes in data[start:end]: type (flags masked) -> payload. Last one wins."""
    end = len(data) if end is None else end
    found: dict[int, bytes] = {}
    while start < end:
        if end - start < _NLATTR.size:
            raise KernelError(f"nf_tables reply: {end - start} trailing attribute bytes")
        length, kind = _NLATTR.unpack_from(data, start)
        if length < _NLATTR.size or start + length > end:
            raise KernelError(f"nf_tables reply: attribute {kind} of bad length {length}")
        found[kind & NLA_TYPE_MASK] = data[start + _NLATTR.size : start + length]
        start += (length + 3) & ~3
    return found


def _list(data: bytes) -> Iterator[bytes]:
    """Payloads of a nested NLA list (NFTA_LIST_ELEM entries), in order."""
    start = 0
    while start < len(data):
        if len(data) - start < _NLATTR.size:
            raise KernelError("nf_tables reply: truncated list element")
        length, kind = _NLATTR.unpack_from(data, start)
        if length < _NLATTR.size or start + length > len(data):
            raise KernelError(f"nf_tables reply: list element of bad length {length}")
        if kind & NLA_TYPE_MASK == NFTA_LIST_ELEM:
            yield data[start + _NLATTR.size : start + length]
        start += (length + 3) & ~3


def _body_attrs(body: bytes) -> dict[int, bytes]:
    if len(body) < _NFGENMSG.size:
        raise KernelError("nf_tables reply: no nfgenmsg")
    return parse_attrs(body, _NFGENMSG.size)


def res_id(body: bytes) -> int:
    """nfgenmsg res_id of a reply: nf_tables puts the generation's low 16 bits there."""
    if len(body) < _NFGENMSG.size:
        raise KernelError("nf_tables reply: no nfgenmsg")
    return int.from_bytes(body[2:4], "big")


def _string(attrs: dict[int, bytes], kind: int, what: str) -> str:
    if kind not in attrs:
        raise KernelError(f"nf_tables reply: {what} without a name")
    raw = attrs[kind]
    raw = raw[: raw.index(0)] if 0 in raw else raw
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise KernelError(f"nf_tables reply: {what} name is not UTF-8: {raw!r}") from exc


def _int(attrs: dict[int, bytes], kind: int, codec: struct.Struct, what: str) -> int:
    raw = attrs.get(kind)
    if raw is None or len(raw) != codec.size:
        raise KernelError(f"nf_tables reply: {what} missing or not {codec.size} bytes")
    (value,) = codec.unpack(raw)
    return int(value)


def decode_gen(body: bytes) -> int:
    """NFT_MSG_NEWGEN reply body -> the generation id."""
    return _int(_body_attrs(body), NFTA_GEN_ID, _U32, "generation id")


class TableInfo(NamedTuple):
    name: str
    handle: int
    flags: int


def decode_table(body: bytes) -> TableInfo:
    attrs = _body_attrs(body)
    flags = _int(attrs, NFTA_TABLE_FLAGS, _U32, "table flags") if NFTA_TABLE_FLAGS in attrs else 0
    return TableInfo(
        _string(attrs, NFTA_TABLE_NAME, "table"),
        _int(attrs, NFTA_TABLE_HANDLE, _U64, "table handle"),
        flags,
    )


class ChainInfo(NamedTuple):
    table: str
    name: str
    handle: int
    digest: bytes  # of hook, policy, type, flags, user data


def decode_chain(body: bytes) -> ChainInfo:
    attrs = _body_attrs(body)
    digest = hashlib.blake2b(digest_size=16)
    for kind in CHAIN_DEFINING:
        if kind in attrs:
            digest.update(_NLATTR.pack(len(attrs[kind]), kind) + attrs[kind])
    return ChainInfo(
        _string(attrs, NFTA_CHAIN_TABLE, "chain's table"),
        _string(attrs, NFTA_CHAIN_NAME, "chain"),
        _int(attrs, NFTA_CHAIN_HANDLE, _U64, "chain handle"),
        digest.digest(),
    )


class BaseChain(NamedTuple):
    """What the kernel will not change in a base chain in place."""

    hook: str
    priority: int
    type: str

    def __str__(self) -> str:
        return f"{self.type} {self.hook} priority {self.priority}"


def decode_base_chain(body: bytes) -> tuple[str, str, BaseChain | None]:
    """(table, chain, its hook/priority/type or None for a regular chain)."""
    attrs = _body_attrs(body)
    table = _string(attrs, NFTA_CHAIN_TABLE, "chain's table")
    name = _string(attrs, NFTA_CHAIN_NAME, "chain")
    if NFTA_CHAIN_HOOK not in attrs:
        return table, name, None
    hook = parse_attrs(attrs[NFTA_CHAIN_HOOK])
    number = _int(hook, NFTA_HOOK_HOOKNUM, _U32, "hook number")
    return (
        table,
        name,
        BaseChain(
            HOOKS[number] if number < len(HOOKS) else f"hook {number}",
            _int(hook, NFTA_HOOK_PRIORITY, _S32, "hook priority"),
            _string(attrs, NFTA_CHAIN_TYPE, "chain type") if NFTA_CHAIN_TYPE in attrs else "?",
        ),
    )


def decode_set_count(body: bytes) -> tuple[str, str, int | None]:
    """(table, set, elements in it, or None where the kernel does not say)."""
    attrs = _body_attrs(body)
    count = _int(attrs, NFTA_SET_COUNT, _U32, "set count") if NFTA_SET_COUNT in attrs else None
    return (
        _string(attrs, NFTA_SET_TABLE, "set's table"),
        _string(attrs, NFTA_SET_NAME, "set"),
        count,
    )


class RuleInfo(NamedTuple):
    table: str
    chain: str
    handle: int
    digest: bytes  # of expressions (stateful ones by name only) and user data
    content: bytes  # raw expressions + user data, for needle searches


@functools.lru_cache(maxsize=1024)
def rule_digest(expressions: bytes, userdata: bytes) -> bytes:
    """Digest of a rule's expressions (stateful ones by name only) and user data.

    Cached: a table's rules come back byte for byte at every check (parsing each expression
    is most of a fingerprint's cost); a rule with a counter misses and is parsed.
    """
    digest = hashlib.blake2b(digest_size=16)
    for element in _list(expressions):
        expr = parse_attrs(element)
        name = expr.get(NFTA_EXPR_NAME, b"")
        digest.update(_NLATTR.pack(len(name), NFTA_EXPR_NAME) + name)
        if name.rstrip(b"\0") not in STATEFUL_EXPRESSIONS:
            data = expr.get(NFTA_EXPR_DATA, b"")
            digest.update(_NLATTR.pack(len(data), NFTA_EXPR_DATA) + data)
    digest.update(_NLATTR.pack(len(userdata), NFTA_RULE_USERDATA) + userdata)
    return digest.digest()


def decode_rule(body: bytes) -> RuleInfo:
    attrs = _body_attrs(body)
    expressions = attrs.get(NFTA_RULE_EXPRESSIONS, b"")
    userdata = attrs.get(NFTA_RULE_USERDATA, b"")
    return RuleInfo(
        _string(attrs, NFTA_RULE_TABLE, "rule's table"),
        _string(attrs, NFTA_RULE_CHAIN, "rule's chain"),
        _int(attrs, NFTA_RULE_HANDLE, _U64, "rule handle"),
        rule_digest(expressions, userdata),
        expressions + userdata,
    )


@dataclass(frozen=True)
class Fingerprint:
    """What a table is made of, without its set and map elements.

    Equal fingerprints: same table instance (handle), same flags, same chains with the same
    hooks and policies, same rules with the same expressions. Element changes and traffic
    leave it unchanged.
    """

    table_handle: int
    table_flags: int
    chains: frozenset[tuple[str, int, bytes]]  # (name, handle, digest)
    rules: frozenset[tuple[str, int, bytes]]  # (chain, handle, digest)

    def differences(self, other: Fingerprint | None) -> list[str]:
        """What changed from `self` (the state remembered) to `other` (the state read now),
        for a log line; empty exactly when the two are equal. Call it on the remembered
        one: `known.differences(current)` says "rule guard#16 removed" where the reverse
        call would say "added"."""
        if other is None:
            return ["table is gone"]
        found = []
        if other.table_handle != self.table_handle:
            found.append(f"table recreated (handle {self.table_handle} -> {other.table_handle})")
        if other.table_flags != self.table_flags:
            found.append(f"table flags {self.table_flags:#x} -> {other.table_flags:#x}")
        found += _set_changes("chain", self.chains, other.chains)
        found += _set_changes("rule", self.rules, other.rules)
        return found


def _set_changes(
    what: str, before: frozenset[tuple[str, int, bytes]], after: frozenset[tuple[str, int, bytes]]
) -> list[str]:
    old = {(name, handle): digest for name, handle, digest in before}
    new = {(name, handle): digest for name, handle, digest in after}
    changes = []
    for key in sorted(old.keys() - new.keys()):
        changes.append(f"{what} {key[0]}#{key[1]} removed")
    for key in sorted(new.keys() - old.keys()):
        changes.append(f"{what} {key[0]}#{key[1]} added")
    for key in sorted(old.keys() & new.keys()):
        if old[key] != new[key]:
            changes.append(f"{what} {key[0]}#{key[1]} changed")
    return changes


def make_fingerprint(
    table: TableInfo, chains: Iterable[ChainInfo], rules: Iterable[RuleInfo]
) -> Fingerprint:
    """The fingerprint of `table` from decoded replies (chains/rules of other tables ignored)."""
    return Fingerprint(
        table.handle,
        table.flags,
        frozenset((c.name, c.handle, c.digest) for c in chains if c.table == table.name),
        frozenset((r.chain, r.handle, r.digest) for r in rules if r.table == table.name),
    )


def family_number(family: str) -> int:
    try:
        return FAMILIES[family]
    except KeyError:
        raise KernelError(
            f"unknown nftables family {family!r} (one of {', '.join(FAMILIES)})"
        ) from None


# -- the socket ------------------------------------------------------------------------------


def nf_tables_socket() -> socket.socket:
    """A bound NETLINK_NETFILTER socket in the current network namespace."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
    except OSError as exc:
        raise KernelError(f"cannot open an nf_tables netlink socket: {exc}") from exc
    return sock


class _Interrupted(Exception):
    """A dump crossed a transaction (NLM_F_DUMP_INTR): read it again."""


class RulesetWatch:
    """nf_tables of the network namespace this object was created in, read over netlink."""

    def __init__(self) -> None:
        self._sock = nf_tables_socket()
        self._sock.settimeout(REPLY_TIMEOUT)
        self._seq = 0
        # Set when an exchange was abandoned: replies (or a dump) may still be queued.
        self._dirty = False
        self.bytes_received = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RulesetWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ---------------------------------------------------------------------------

    def generation(self) -> int:
        """The ruleset generation: changes on every committed nftables transaction."""
        replies = self._exchange(gen_request, "reading the ruleset generation")
        if replies is None or not replies:
            raise KernelError("reading the ruleset generation: no answer")
        return decode_gen(replies[0])

    def fingerprint(self, family: str, table: str) -> Fingerprint | None:
        """The table's fingerprint, or None if it does not exist. Reads no set element."""
        number = family_number(family)
        for _attempt in range(ATTEMPTS):
            try:
                return self._fingerprint_once(number, family, table)
            except _Interrupted:
                continue
        raise KernelError(
            f"fingerprint of table {family} {table}: the ruleset changed during each of "
            f"{ATTEMPTS} reads"
        )

    def _fingerprint_once(self, number: int, family: str, table: str) -> Fingerprint | None:
        what = f"reading table {family} {table}"
        tables = self._exchange(lambda seq: table_request(seq, number, table), what)
        if tables is None:
            return None
        if not tables:
            raise KernelError(f"{what}: no answer")
        info = decode_table(tables[0])
        chains = self._exchange(lambda seq: chains_request(seq, number), what)
        rules = self._exchange(lambda seq: rules_request(seq, number, table), what)
        # Each reply names the generation it was built from: all must agree.
        generations = {res_id(body) for body in (tables[0], *(chains or ()), *(rules or ()))}
        if len(generations) > 1:
            raise _Interrupted
        return make_fingerprint(
            info, (decode_chain(b) for b in chains or ()), (decode_rule(b) for b in rules or ())
        )

    def chain_rules(self, family: str, table: str, chain: str) -> list[RuleInfo]:
        """The rules of `chain`, in the order packets meet them (the dump's order).

        A missing table or chain has no rules (an empty list, not an error).
        """
        number = family_number(family)
        what = f"reading chain {family} {table} {chain}"
        replies = self._dump(lambda seq: rules_request(seq, number, table, chain), what)
        rules = (decode_rule(body) for body in replies or ())
        return [r for r in rules if r.table == table and r.chain == chain]

    def matching_rules(self, family: str, table: str, chain: str, needle: bytes) -> list[int]:
        """Handles of the rules of `chain` whose expressions or user data contain `needle`.

        A missing table or chain has no rules (an empty list, not an error).
        """
        return [r.handle for r in self.chain_rules(family, table, chain) if needle in r.content]

    def base_chains(self, family: str, table: str) -> dict[str, BaseChain]:
        """The table's base chains: name -> hook, priority, type (chains of other tables of
        the family, which the kernel's chain dump includes, are left out)."""
        number = family_number(family)
        what = f"reading the chains of table {family} {table}"
        found = {}
        for body in self._dump(lambda seq: chains_request(seq, number), what) or ():
            owner, name, base = decode_base_chain(body)
            if owner == table and base is not None:
                found[name] = base
        return found

    def set_counts(self, family: str, table: str) -> dict[str, int | None] | None:
        """How many elements each set of the table holds: set -> count, or None per set on
        kernels that do not report it (older ones); None if there is no such table.

        One dump of set metadata: its cost follows the number of sets, not of elements."""
        number = family_number(family)
        what = f"reading the sets of table {family} {table}"
        replies = self._dump(lambda seq: sets_request(seq, number, table), what)
        if replies is None:
            return None
        counts: dict[str, int | None] = {}
        for body in replies:
            owner, name, count = decode_set_count(body)
            if owner == table:
                counts[name] = count
        return counts

    def has_element(self, family: str, table: str, name: str, key: bytes) -> bool:
        """Whether the set holds `key` (in an interval set: an interval containing it);
        False if the set or table is gone. `key` is the element's key as nf_tables holds
        it (an ipv4_addr: 4 bytes; an inet_service: 2 bytes, network order)."""
        number = family_number(family)
        what = f"reading set {family} {table} {name}"
        replies = self._exchange(lambda seq: element_request(seq, number, table, name, key), what)
        return replies is not None

    def object_handle(self, family: str, table: str, name: str, kind: int) -> int | None:
        """The handle of a stateful object (None if there is none): a new handle means the
        object was deleted and created again, and lost what referred to it."""
        number = family_number(family)
        what = f"reading object {family} {table} {name}"
        replies = self._exchange(lambda seq: object_request(seq, number, table, name, kind), what)
        if replies is None:
            return None
        if not replies:
            raise KernelError(f"{what}: no answer")
        return _int(_body_attrs(replies[0]), NFTA_OBJ_HANDLE, _U64, "object handle")

    def ct_timeout(self, family: str, table: str, name: str) -> dict[int, int] | None:
        """A ct timeout policy: conntrack state number -> seconds (for UDP, 1 unreplied and
        2 replied); None if there is no such object. libnftables would fetch every set
        element of the table to answer this (9 s and 700 MB at 50k calls)."""
        number = family_number(family)
        what = f"reading ct timeout {family} {table} {name}"
        replies = self._exchange(
            lambda seq: object_request(seq, number, table, name, NFT_OBJECT_CT_TIMEOUT), what
        )
        if replies is None:
            return None
        if not replies:
            raise KernelError(f"{what}: no answer")
        data = _body_attrs(replies[0]).get(NFTA_OBJ_DATA)
        policy = parse_attrs(data).get(NFTA_CT_TIMEOUT_DATA) if data is not None else None
        if policy is None:
            raise KernelError(f"{what}: no policy in the answer")
        return {
            state: _int({state: value}, state, _U32, what)
            for state, value in parse_attrs(policy).items()
        }

    def has_rule(self, family: str, table: str, chain: str, needle: bytes) -> bool:
        """Whether some rule of `chain` contains `needle`; False if table or chain is gone."""
        return bool(self.matching_rules(family, table, chain, needle))

    # -- the exchange ------------------------------------------------------------------------

    def _dump(self, build: Callable[[int], bytes], what: str) -> list[bytes] | None:
        """`_exchange`, read again while a dump crosses a transaction (up to ATTEMPTS)."""
        for _attempt in range(ATTEMPTS):
            try:
                return self._exchange(build, what)
            except _Interrupted:
                continue
        raise KernelError(f"{what}: the ruleset changed during each of {ATTEMPTS} reads")

    def _drain(self) -> None:
        """Read whatever an abandoned exchange left queued (each read advances a dump)."""
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            pass
        finally:
            self._sock.settimeout(REPLY_TIMEOUT)
        self._dirty = False

    def _exchange(
        self,
        build: Callable[[int], bytes],
        what: str,
        consume: Callable[[bytes], None] | None = None,
    ) -> list[bytes] | None:
        """Send one request, return the bodies of its replies; None if the kernel said ENOENT.

        With `consume`, each body goes to it as it arrives instead of into the list (which
        is then empty): a dump of many set elements is decoded without being held whole.
        Raises _Interrupted when a dump reports it crossed a transaction.
        """
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        try:
            if self._dirty:
                self._drain()
            self._dirty = True
            self._sock.send(build(seq))
            bodies, interrupted = self._replies(seq, what, consume)
        except TimeoutError as exc:
            raise KernelError(f"{what}: nf_tables did not answer within {REPLY_TIMEOUT} s") from exc
        except OSError as exc:
            raise KernelError(f"{what}: {exc}") from exc
        self._dirty = False
        if interrupted:
            raise _Interrupted
        return bodies

    def _receive(self, what: str) -> bytes:
        """One datagram of a reply."""
        data, _ancdata, msg_flags, _address = self._sock.recvmsg(RECV_SIZE)
        if msg_flags & socket.MSG_TRUNC:
            raise KernelError(f"{what}: a reply did not fit in {RECV_SIZE} bytes")
        return data

    def _replies(
        self, seq: int, what: str, consume: Callable[[bytes], None] | None = None
    ) -> tuple[list[bytes] | None, bool]:
        bodies: list[bytes] = []
        interrupted = False
        while True:
            data = self._receive(what)
            self.bytes_received += len(data)
            for message in split_messages(data):
                if message.seq != seq:
                    continue  # left over from an earlier, abandoned exchange
                interrupted = interrupted or bool(message.flags & NLM_F_DUMP_INTR)
                if message.type == NLMSG_ERROR:
                    code = error_code(message)
                    if code == -errno.ENOENT:
                        return None, interrupted
                    if code != 0:
                        raise KernelError(f"{what}: {_strerror(code)}")
                    return bodies, interrupted
                if message.type == NLMSG_DONE:
                    code = error_code(message)
                    if code != 0:
                        raise KernelError(f"{what}: dump failed: {_strerror(code)}")
                    return bodies, interrupted
                if consume is None:
                    bodies.append(message.body)
                else:
                    consume(message.body)
                if not message.flags & NLM_F_MULTI:
                    return bodies, interrupted


def _strerror(code: int) -> str:
    name = errno.errorcode.get(-code, str(code))
    hint = " (needs CAP_NET_ADMIN in the namespace)" if -code == errno.EPERM else ""
    return f"{name}: {os.strerror(-code)}{hint}"
