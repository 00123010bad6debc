"""nf_tables netlink codec of the ruleset watch: requests, replies, garbage (no root needed)."""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl.dataplane import nftwatch as nw
from lrkp_tsl.errors import KernelError

HEADER = Path("/usr/include/linux/netfilter/nf_tables.h")


# -- crafting replies with struct -------------------------------------------------------------


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *children: bytes) -> bytes:
    return nla(kind | 0x8000, b"".join(children))  # NLA_F_NESTED set, as the kernel does


def message(
    msg_type: int, body_attrs: bytes, *, seq: int = 1, flags: int = 0, gen: int = 7, family: int = 2
) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(gen & 0xFFFF)) + body_attrs
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | msg_type, flags, seq, 4242) + body


def done(seq: int = 1, code: int = 0, flags: int = nw.NLM_F_MULTI) -> bytes:
    return struct.pack("=IHHIIi", 20, nw.NLMSG_DONE, flags, seq, 4242, code)


def error(seq: int = 1, code: int = 0) -> bytes:
    # nlmsgerr: error, then the offending request's header (16 bytes, as the kernel echoes).
    return struct.pack("=IHHIIi", 36, nw.NLMSG_ERROR, 0x100, seq, 4242, code) + bytes(16)


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def gen_reply(generation: int, seq: int = 1) -> bytes:
    attrs = nla(1, struct.pack(">I", generation)) + nla(2, struct.pack(">I", 99)) + nla(3, s("nft"))
    return message(nw.NFT_MSG_NEWGEN, attrs, seq=seq, gen=generation)


def table_reply(name: str, handle: int, flags: int = 0, seq: int = 1, gen: int = 7) -> bytes:
    attrs = (
        nla(nw.NFTA_TABLE_NAME, s(name))
        + nla(nw.NFTA_TABLE_FLAGS, struct.pack(">I", flags))
        + nla(3, struct.pack(">I", 15))  # NFTA_TABLE_USE
        + nla(nw.NFTA_TABLE_HANDLE, struct.pack(">Q", handle))
    )
    return message(nw.NFT_MSG_NEWTABLE, attrs, seq=seq, gen=gen)


def chain_reply(
    table: str,
    name: str,
    handle: int,
    *,
    policy: int | None = 1,
    use: int = 0,
    packets: int = 0,
    seq: int = 1,
    gen: int = 7,
) -> bytes:
    attrs = (
        nla(nw.NFTA_CHAIN_TABLE, s(table))
        + nla(nw.NFTA_CHAIN_HANDLE, struct.pack(">Q", handle))
        + nla(nw.NFTA_CHAIN_NAME, s(name))
    )
    if policy is not None:
        hook = nla(1, struct.pack(">I", 0)) + nla(2, struct.pack(">i", -310))
        attrs += nested(nw.NFTA_CHAIN_HOOK, hook)
        attrs += nla(nw.NFTA_CHAIN_POLICY, struct.pack(">I", policy))
        attrs += nla(nw.NFTA_CHAIN_TYPE, s("filter"))
        counters = nla(1, struct.pack(">Q", packets * 60)) + nla(2, struct.pack(">Q", packets))
        attrs += nested(8, counters)  # NFTA_CHAIN_COUNTERS: traffic changes them
    attrs += nla(6, struct.pack(">I", use))  # NFTA_CHAIN_USE
    attrs += nla(nw.NFTA_CHAIN_FLAGS, struct.pack(">I", 1))
    return message(nw.NFT_MSG_NEWCHAIN, attrs, seq=seq, gen=gen, flags=nw.NLM_F_MULTI)


def expression(name: str, data: bytes) -> bytes:
    return nested(nw.NFTA_LIST_ELEM, nla(nw.NFTA_EXPR_NAME, s(name)), nested(2, data))


def counter(packets: int) -> bytes:
    return expression(
        "counter", nla(1, struct.pack(">Q", packets * 100)) + nla(2, struct.pack(">Q", packets))
    )


def cmp(value: int) -> bytes:
    return expression(
        "cmp", nla(1, struct.pack(">I", 1)) + nla(3, nla(1, struct.pack(">I", value)))
    )


def comment_match(text: str) -> bytes:
    info = text.encode().ljust(256, b"\0")
    return expression("match", nla(1, s("comment")) + nla(2, struct.pack(">I", 0)) + nla(3, info))


def rule_reply(
    table: str,
    chain: str,
    handle: int,
    expressions: bytes,
    *,
    userdata: bytes | None = None,
    seq: int = 1,
    gen: int = 7,
    flags: int = nw.NLM_F_MULTI,
) -> bytes:
    attrs = (
        nla(nw.NFTA_RULE_TABLE, s(table))
        + nla(nw.NFTA_RULE_CHAIN, s(chain))
        + nla(nw.NFTA_RULE_HANDLE, struct.pack(">Q", handle))
        + nested(nw.NFTA_RULE_EXPRESSIONS, expressions)
    )
    if userdata is not None:
        attrs += nla(nw.NFTA_RULE_USERDATA, userdata)
    return message(nw.NFT_MSG_NEWRULE, attrs, seq=seq, gen=gen, flags=flags)


def body(data: bytes) -> bytes:
    (only,) = nw.split_messages(data)
    return only.body


# -- constants ------------------------------------------------------------------------------


def enum_members(text: str, name: str) -> list[str]:
    match = re.search(r"enum " + name + r" \{(.*?)\};", text, re.S)
    assert match, f"enum {name} not in {HEADER}"
    body = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)
    return [item.split("=")[0].strip() for item in body.split(",") if item.strip()]


CONSTANTS = {
    "nf_tables_msg_types": [
        "NFT_MSG_NEWTABLE",
        "NFT_MSG_GETTABLE",
        "NFT_MSG_NEWCHAIN",
        "NFT_MSG_GETCHAIN",
        "NFT_MSG_NEWRULE",
        "NFT_MSG_GETRULE",
        "NFT_MSG_NEWGEN",
        "NFT_MSG_GETGEN",
    ],
    "nft_table_attributes": ["NFTA_TABLE_NAME", "NFTA_TABLE_FLAGS", "NFTA_TABLE_HANDLE"],
    "nft_chain_attributes": [
        "NFTA_CHAIN_TABLE",
        "NFTA_CHAIN_HANDLE",
        "NFTA_CHAIN_NAME",
        "NFTA_CHAIN_HOOK",
        "NFTA_CHAIN_POLICY",
        "NFTA_CHAIN_TYPE",
        "NFTA_CHAIN_FLAGS",
        "NFTA_CHAIN_USERDATA",
    ],
    "nft_rule_attributes": [
        "NFTA_RULE_TABLE",
        "NFTA_RULE_CHAIN",
        "NFTA_RULE_HANDLE",
        "NFTA_RULE_EXPRESSIONS",
        "NFTA_RULE_USERDATA",
    ],
    "nft_list_attributes": ["NFTA_LIST_ELEM"],
    "nft_expr_attributes": ["NFTA_EXPR_NAME", "NFTA_EXPR_DATA"],
    "nft_gen_attributes": ["NFTA_GEN_ID"],
}


@pytest.mark.skipif(not HEADER.exists(), reason=f"{HEADER} not installed (pyroute2 check runs)")
@pytest.mark.parametrize("enum", sorted(CONSTANTS))
def test_constants_match_the_kernel_header(enum: str) -> None:
    members = enum_members(HEADER.read_text(), enum)
    for name in CONSTANTS[enum]:
        assert members.index(name) == getattr(nw, name), name


def test_constants_match_pyroute2() -> None:
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
    from pyroute2.netlink.nfnetlink import nftsocket as pr

    assert NFNL_SUBSYS_NFTABLES == nw.NFNL_SUBSYS_NFTABLES
    for name in CONSTANTS["nf_tables_msg_types"]:
        assert getattr(pr, name) == getattr(nw, name), name
    attribute_maps = {
        "NFTA_TABLE_": pr.nft_table_msg,
        "NFTA_CHAIN_": pr.nft_chain_msg,
        "NFTA_RULE_": pr.nft_rule_msg,
        "NFTA_GEN_": pr.nft_gen_msg,
    }
    for prefix, cls in attribute_maps.items():
        names = [entry[0] for entry in cls.nla_map]
        for name in dir(nw):
            if name.startswith(prefix):
                assert names.index(name) == getattr(nw, name), name


# -- requests ---------------------------------------------------------------------------------


def test_gen_request_bytes() -> None:
    assert nw.gen_request(5) == struct.pack("=IHHIIBBH", 20, 0x0A10, 0x1, 5, 0, 0, 0, 0)


def test_table_request_pads_the_nul_terminated_name() -> None:
    expected = struct.pack("=IHHIIBBH", 32, 0x0A01, 0x1, 7, 0, 2, 0, 0)
    expected += struct.pack("=HH", 9, 1) + b"lrkp\0" + b"\0\0\0"
    assert nw.table_request(7, 2, "lrkp") == expected


def test_rule_dump_request_filters_by_table_and_chain() -> None:
    data = nw.rules_request(9, 2, "raw", "PREROUTING")
    (request,) = nw.split_messages(data)
    assert request.type == 0x0A07
    assert request.flags == nw.NLM_F_REQUEST | nw.NLM_F_DUMP
    attrs = nw.parse_attrs(request.body, 4)
    assert attrs == {nw.NFTA_RULE_TABLE: b"raw\0", nw.NFTA_RULE_CHAIN: b"PREROUTING\0"}
    assert nw.NFTA_RULE_CHAIN not in nw.parse_attrs(
        nw.split_messages(nw.rules_request(9, 2, "raw"))[0].body, 4
    )


def test_chain_dump_request_has_only_the_family() -> None:
    (request,) = nw.split_messages(nw.chains_request(3, 2))
    assert (request.type, request.flags, request.body) == (0x0A04, 0x301, b"\x02\x00\x00\x00")


def test_requests_match_pyroute2_encoder() -> None:
    from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg, nft_table_msg

    for cls, msg_type, flags, attrs, ours in [
        (nft_table_msg, 1, 0x1, [("NFTA_TABLE_NAME", "lrkp")], nw.table_request(7, 2, "lrkp")),
        (
            nft_rule_msg,
            7,
            0x301,
            [("NFTA_RULE_TABLE", "raw"), ("NFTA_RULE_CHAIN", "PREROUTING")],
            nw.rules_request(7, 2, "raw", "PREROUTING"),
        ),
    ]:
        msg = cls()
        msg["header"]["type"] = (10 << 8) | msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = 7
        msg["nfgen_family"] = 2
        msg["attrs"] = attrs
        msg.encode()
        assert bytes(msg.data) == ours


def test_family_names() -> None:
    assert nw.family_number("ip") == socket.AF_INET
    assert nw.family_number("ip6") == socket.AF_INET6
    with pytest.raises(KernelError, match="unknown nftables family 'ipv4'"):
        nw.family_number("ipv4")


# -- replies ----------------------------------------------------------------------------------


def test_decode_generation() -> None:
    data = gen_reply(0x01020304)
    assert nw.decode_gen(body(data)) == 0x01020304
    assert nw.res_id(body(data)) == 0x0304


def test_decode_table() -> None:
    info = nw.decode_table(body(table_reply("lrkp", 1 << 40, flags=1)))
    assert info == nw.TableInfo("lrkp", 1 << 40, 1)


def test_decode_rule_and_its_content() -> None:
    data = rule_reply(
        "raw", "PREROUTING", 2, cmp(0x200000) + comment_match("lrkp-tsl first packets")
    )
    rule = nw.decode_rule(body(data))
    assert (rule.table, rule.chain, rule.handle) == ("raw", "PREROUTING", 2)
    assert b"lrkp-tsl first packets" in rule.content
    commented = nw.decode_rule(body(rule_reply("t", "c", 3, cmp(1), userdata=b"\x00\x05hello")))
    assert b"hello" in commented.content


def test_decode_rule_matches_pyroute2_decoder() -> None:
    from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

    data = rule_reply("lrkp", "guard", 16, cmp(5) + counter(3))
    msg = nft_rule_msg(data)
    msg.decode()
    assert msg.get_attr("NFTA_RULE_HANDLE") == nw.decode_rule(body(data)).handle == 16
    assert msg.get_attr("NFTA_RULE_CHAIN") == "guard"


def test_rule_digest_ignores_counters_but_not_matches() -> None:
    def digest(expressions: bytes, handle: int = 5) -> bytes:
        return nw.decode_rule(body(rule_reply("lrkp", "guard", handle, expressions))).digest

    assert digest(cmp(1) + counter(0)) == digest(cmp(1) + counter(123456))
    assert digest(cmp(1) + counter(0)) != digest(cmp(2) + counter(0))
    assert digest(cmp(1)) != digest(cmp(1) + counter(0))  # a counter added is a change


def test_chain_digest_ignores_use_and_counters_but_not_policy() -> None:
    def digest(**kwargs: int) -> bytes:
        return nw.decode_chain(body(chain_reply("lrkp", "guard", 1, **kwargs))).digest

    assert digest(use=0, packets=0) == digest(use=3, packets=999)
    assert digest(policy=1) != digest(policy=0)


def fingerprint(*parts: bytes) -> nw.Fingerprint:
    table, chains, rules = None, [], []
    for data in parts:
        for msg in nw.split_messages(data):
            kind = msg.type & 0xFF
            if kind == nw.NFT_MSG_NEWTABLE:
                table = nw.decode_table(msg.body)
            elif kind == nw.NFT_MSG_NEWCHAIN:
                chains.append(nw.decode_chain(msg.body))
            elif kind == nw.NFT_MSG_NEWRULE:
                rules.append(nw.decode_rule(msg.body))
    assert table is not None
    return nw.make_fingerprint(table, chains, rules)


BASE = (
    table_reply("lrkp", 1),
    chain_reply("lrkp", "guard", 1),
    chain_reply("lrkp", "relay_port", 2, policy=None),
    rule_reply("lrkp", "guard", 16, cmp(1)),
    rule_reply("lrkp", "relay_port", 17, cmp(2) + counter(0)),
)


def test_fingerprint_changes_with_structure_only() -> None:
    before = fingerprint(*BASE)
    # Traffic, chain use, and other tables' chains and rules change nothing.
    same = fingerprint(
        table_reply("lrkp", 1),
        chain_reply("lrkp", "guard", 1, packets=50, use=2),
        chain_reply("lrkp", "relay_port", 2, policy=None),
        chain_reply("raw", "PREROUTING", 1),
        rule_reply("lrkp", "guard", 16, cmp(1)),
        rule_reply("lrkp", "relay_port", 17, cmp(2) + counter(77)),
        rule_reply("raw", "PREROUTING", 2, cmp(3)),
    )
    assert same == before
    assert before.differences(same) == []
    recreated = fingerprint(table_reply("lrkp", 9), *BASE[1:])
    assert before.differences(recreated) == ["table recreated (handle 1 -> 9)"]
    dormant = fingerprint(table_reply("lrkp", 1, flags=1), *BASE[1:])
    assert before.differences(dormant) == ["table flags 0x0 -> 0x1"]
    flushed = fingerprint(*BASE[:4])
    assert before.differences(flushed) == ["rule relay_port#17 removed"]
    replaced = fingerprint(*BASE[:3], rule_reply("lrkp", "guard", 16, cmp(4)), BASE[4])
    assert before.differences(replaced) == ["rule guard#16 changed"]
    dropping = fingerprint(BASE[0], chain_reply("lrkp", "guard", 1, policy=0), *BASE[2:])
    assert before.differences(dropping) == ["chain guard#1 changed"]
    added = fingerprint(*BASE, rule_reply("lrkp", "guard", 30, cmp(1)))
    assert before.differences(added) == ["rule guard#30 added"]
    assert before.differences(None) == ["table is gone"]


def test_split_messages_and_errors() -> None:
    data = rule_reply("a", "b", 1, cmp(1), seq=4) + done(seq=4)
    first, last = nw.split_messages(data)
    assert (first.seq, first.flags & nw.NLM_F_MULTI, last.type) == (
        4,
        nw.NLM_F_MULTI,
        nw.NLMSG_DONE,
    )
    assert nw.error_code(last) == 0
    (err,) = nw.split_messages(error(code=-errno.ENOENT))
    assert nw.error_code(err) == -errno.ENOENT


# -- garbage ----------------------------------------------------------------------------------


def decode_everything(data: bytes) -> None:
    """Run every decoder the watch runs on `data`; only KernelError may escape."""
    for decoder in (nw.decode_gen, nw.decode_table, nw.decode_chain, nw.decode_rule, nw.res_id):
        with contextlib.suppress(KernelError):
            decoder(data)
    try:
        messages = nw.split_messages(data)
    except KernelError:
        return
    for msg in messages:
        for decoder in (nw.decode_gen, nw.decode_table, nw.decode_chain, nw.decode_rule):
            with contextlib.suppress(KernelError):
                decoder(msg.body)
        if msg.type in (nw.NLMSG_ERROR, nw.NLMSG_DONE):
            with contextlib.suppress(KernelError):
                nw.error_code(msg)


VALID = [
    gen_reply(3),
    table_reply("lrkp", 4),
    chain_reply("lrkp", "guard", 1),
    rule_reply("raw", "PREROUTING", 2, cmp(1) + comment_match("x") + counter(1), userdata=b"u"),
]


def mutations(valid: list[bytes]) -> Iterator[bytes]:
    """Every truncation of each reply, and each byte set to 0x00, 0xFF, 0x03 and 0x80: the
    damage a decoder of netlink replies must survive (shared with test_nftsets)."""
    for data in valid:
        for cut in range(len(data)):
            yield data[:cut]
        for index in range(len(data)):
            for value in (0x00, 0xFF, 0x03, 0x80):
                yield data[:index] + bytes([value]) + data[index + 1 :]


def test_every_truncation_and_byte_flip_of_valid_replies() -> None:
    for data in mutations(VALID):
        decode_everything(data)


@settings(max_examples=400, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_kernel_error(data: bytes) -> None:
    decode_everything(data)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(VALID), st.binary(max_size=40), st.integers(min_value=0, max_value=400))
def test_spliced_garbage_raises_only_kernel_error(valid: bytes, junk: bytes, where: int) -> None:
    decode_everything(valid[:where] + junk + valid[where:])


def test_bad_utf8_name_is_a_kernel_error() -> None:
    data = message(nw.NFT_MSG_NEWTABLE, nla(1, b"\xff\xfe\0") + nla(4, bytes(8)))
    with pytest.raises(KernelError, match="not UTF-8"):
        nw.decode_table(body(data))


# -- the exchange, over a scripted socket ---------------------------------------------------


class ScriptedSocket:
    """Stands in for the netlink socket: each send queues the next scripted answer."""

    def __init__(self, answers: list[list[bytes | BaseException]]) -> None:
        self.answers = answers
        self.queue: list[bytes | BaseException] = []
        self.sent: list[bytes] = []
        self.drained = 0

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        if self.answers:
            self.queue += self.answers.pop(0)
        return len(data)

    def recvmsg(self, size: int) -> tuple[bytes, list[object], int, object]:
        if not self.queue:
            raise TimeoutError("timed out")
        reply = self.queue.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        flags = socket.MSG_TRUNC if len(reply) > size else 0
        return reply[:size], [], flags, None

    def recv(self, size: int) -> bytes:
        if not self.queue:
            raise BlockingIOError
        self.drained += 1
        reply = self.queue.pop(0)
        assert isinstance(reply, bytes)
        return reply

    def setblocking(self, flag: bool) -> None:
        pass

    def settimeout(self, value: float) -> None:
        pass

    def close(self) -> None:
        pass


def watch(*answers: list[bytes | BaseException]) -> tuple[nw.RulesetWatch, ScriptedSocket]:
    sock = ScriptedSocket(list(answers))
    made = object.__new__(nw.RulesetWatch)
    made._sock = sock  # type: ignore[assignment]
    made._seq = 0
    made._dirty = False
    made.bytes_received = 0
    return made, sock


def test_generation_skips_stale_replies() -> None:
    made, sock = watch([gen_reply(99, seq=12345) + gen_reply(41, seq=1)])
    assert made.generation() == 41
    assert sock.sent == [nw.gen_request(1)]


def test_missing_table_is_none_and_other_errors_name_the_errno() -> None:
    made, _ = watch([error(seq=1, code=-errno.ENOENT)])
    assert made.fingerprint("ip", "lrkp") is None
    made, _ = watch([error(seq=1, code=-errno.EPERM)])
    with pytest.raises(KernelError, match=r"EPERM.*CAP_NET_ADMIN"):
        made.fingerprint("ip", "lrkp")


def dump(seq: int, *parts: bytes) -> list[bytes | BaseException]:
    return [b"".join(parts), done(seq)]


def test_fingerprint_over_three_exchanges() -> None:
    table, guard, _relay, rule16, _rule17 = BASE
    answers: list[list[bytes | BaseException]] = [
        [table_reply("lrkp", 1, seq=1)],
        dump(2, chain_reply("lrkp", "guard", 1, seq=2), chain_reply("raw", "PREROUTING", 1, seq=2)),
        dump(3, rule_reply("lrkp", "guard", 16, cmp(1), seq=3)),
    ]
    size = sum(len(d) for answer in answers for d in answer if isinstance(d, bytes))
    made, sock = watch(*answers)
    assert made.fingerprint("ip", "lrkp") == fingerprint(table, guard, rule16)
    assert [nw.split_messages(d)[0].type & 0xFF for d in sock.sent] == [1, 4, 7]
    assert made.bytes_received == size


def test_fingerprint_read_across_a_transaction_is_read_again() -> None:
    made, sock = watch(
        [table_reply("lrkp", 1, seq=1, gen=7)],
        dump(2, chain_reply("lrkp", "guard", 1, seq=2, gen=8)),
        dump(3, rule_reply("lrkp", "guard", 16, cmp(1), seq=3, gen=8)),
        [table_reply("lrkp", 1, seq=4, gen=8)],
        dump(5, chain_reply("lrkp", "guard", 1, seq=5, gen=8)),
        dump(6, rule_reply("lrkp", "guard", 16, cmp(1), seq=6, gen=8)),
    )
    assert made.fingerprint("ip", "lrkp") is not None
    assert len(sock.sent) == 6


def test_a_ruleset_that_never_holds_still_is_a_kernel_error() -> None:
    answers: list[list[bytes | BaseException]] = []
    for attempt in range(nw.ATTEMPTS):
        seq = attempt * 3
        answers += [
            [table_reply("lrkp", 1, seq=seq + 1, gen=attempt)],
            dump(seq + 2, chain_reply("lrkp", "guard", 1, seq=seq + 2, gen=attempt + 1)),
            dump(seq + 3),
        ]
    made, _ = watch(*answers)
    with pytest.raises(KernelError, match="changed during each of"):
        made.fingerprint("ip", "lrkp")


def test_interrupted_dump_is_read_again() -> None:
    intr = nw.NLM_F_MULTI | nw.NLM_F_DUMP_INTR
    made, sock = watch(
        dump(1, rule_reply("raw", "PREROUTING", 2, comment_match("no"), seq=1, flags=intr)),
        dump(2, rule_reply("raw", "PREROUTING", 3, comment_match("needle"), seq=2)),
    )
    assert made.matching_rules("ip", "raw", "PREROUTING", b"needle") == [3]
    assert len(sock.sent) == 2


def test_has_rule_on_an_empty_dump_is_false() -> None:
    made, _ = watch([done(1)])
    assert made.has_rule("ip", "raw", "PREROUTING", b"lrkp-tsl first packets") is False


def test_failed_dump_is_a_kernel_error() -> None:
    made, _ = watch([done(1, code=-errno.EINTR)])
    with pytest.raises(KernelError, match="dump failed: EINTR"):
        made.has_rule("ip", "raw", "PREROUTING", b"x")


def test_abandoned_exchange_is_drained_before_the_next() -> None:
    # A garbled datagram mid-dump: the rest of that dump is read away before the next request.
    made, sock = watch(
        [b"\xff" * 20, rule_reply("raw", "PREROUTING", 2, cmp(1), seq=1), done(1)],
        [gen_reply(5, seq=2)],
    )
    with pytest.raises(KernelError, match=r"trailing bytes|message length"):
        made.has_rule("ip", "raw", "PREROUTING", b"x")
    assert made.generation() == 5
    assert sock.drained == 2


def test_timeout_truncation_and_socket_errors_are_kernel_errors() -> None:
    made, _ = watch()
    with pytest.raises(KernelError, match="did not answer within"):
        made.generation()
    made, _ = watch([b"x" * (nw.RECV_SIZE + 1)])
    with pytest.raises(KernelError, match="did not fit"):
        made.generation()
    made, _ = watch([OSError(errno.ENOBUFS, "No buffer space available")])
    with pytest.raises(KernelError, match="No buffer space"):
        made.generation()
