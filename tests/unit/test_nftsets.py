"""nf_tables set-element codec of the startup reader: requests, replies, garbage (no root)."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl.dataplane import nftsets as ns
from lrkp_tsl.dataplane import nftwatch as nw
from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import Endpoint, InstalledFlow
from tests.unit.test_nftwatch import (
    HEADER,
    done,
    enum_members,
    error,
    message,
    mutations,
    nla,
    s,
)

# -- crafting replies with struct -------------------------------------------------------------


def ep(ip: str, port: int) -> Endpoint:
    return Endpoint(IPv4Address(ip), port)


def raw_endpoint(endpoint: Endpoint) -> bytes:
    """ipv4_addr . inet_service in registers: 4 bytes of address, 2 of port, 2 of padding."""
    return struct.pack(">4sH2x", endpoint.ip.packed, endpoint.port)


def flow_key(sender: Endpoint, relay: Endpoint) -> bytes:
    return raw_endpoint(sender) + raw_endpoint(relay)


def udata_comment(text: str, *, before: bytes = b"") -> bytes:
    value = text.encode() + b"\0"
    return before + struct.pack("=BB", ns.NFTNL_UDATA_SET_ELEM_COMMENT, len(value)) + value


def value(kind: int, payload: bytes, *, nested_flag: bool = False) -> bytes:
    flag = 0x8000 if nested_flag else 0
    return nla(kind | flag, nla(ns.NFTA_DATA_VALUE, payload))


def element(
    key: bytes | None,
    data: bytes | None = None,
    *,
    comment: str | None = None,
    udata: bytes | None = None,
    flags: int | None = None,
    shuffled: bool = False,
    nested_flag: bool = False,
) -> bytes:
    """One NFTA_LIST_ELEM as the kernel dumps it: KEY, DATA, FLAGS, USERDATA in this order
    (or reversed, with NLA_F_NESTED, to take the decoder's general path)."""
    parts = []
    if key is not None:
        parts.append(value(ns.NFTA_SET_ELEM_KEY, key, nested_flag=nested_flag))
    if data is not None:
        parts.append(value(ns.NFTA_SET_ELEM_DATA, data, nested_flag=nested_flag))
    if flags is not None:
        parts.append(nla(ns.NFTA_SET_ELEM_FLAGS, struct.pack(">I", flags)))
    if comment is not None:
        udata = udata_comment(comment)
    if udata is not None:
        parts.append(nla(ns.NFTA_SET_ELEM_USERDATA, udata))
    if shuffled:
        parts.reverse()
    flag = 0x8000 if nested_flag else 0
    return nla(nw.NFTA_LIST_ELEM | flag, b"".join(parts))


def setelem_reply(
    name: str,
    *elements: bytes,
    seq: int = 1,
    gen: int = 7,
    flags: int = nw.NLM_F_MULTI,
    table: str = "lrkp",
) -> bytes:
    attrs = (
        nla(ns.NFTA_SET_ELEM_LIST_TABLE, s(table))
        + nla(ns.NFTA_SET_ELEM_LIST_SET, s(name))
        + nla(ns.NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(elements))
    )
    return message(ns.NFT_MSG_NEWSETELEM, attrs, seq=seq, gen=gen, flags=flags)


def body(data: bytes) -> bytes:
    (only,) = nw.split_messages(data)
    return only.body


def decoded(name: str, key_size: int, data_size: int, *replies: bytes) -> ns.SetElements:
    found = ns.SetElements(name, key_size, data_size)
    for reply in replies:
        for msg in nw.split_messages(reply):
            found.add(msg.body)
    return found


A, B = ep("10.201.1.10", 4000), ep("10.201.2.10", 6000)
RA, RB = ep("10.201.1.1", 20000), ep("10.201.2.1", 20000)


# -- constants ------------------------------------------------------------------------------

CONSTANTS = {
    "nf_tables_msg_types": ["NFT_MSG_NEWSETELEM", "NFT_MSG_GETSETELEM"],
    "nft_set_elem_list_attributes": [
        "NFTA_SET_ELEM_LIST_TABLE",
        "NFTA_SET_ELEM_LIST_SET",
        "NFTA_SET_ELEM_LIST_ELEMENTS",
    ],
    "nft_set_elem_attributes": [
        "NFTA_SET_ELEM_KEY",
        "NFTA_SET_ELEM_DATA",
        "NFTA_SET_ELEM_FLAGS",
        "NFTA_SET_ELEM_USERDATA",
    ],
    "nft_data_attributes": ["NFTA_DATA_VALUE", "NFTA_DATA_VERDICT"],
}


@pytest.mark.skipif(not HEADER.exists(), reason=f"{HEADER} not installed (pyroute2 check runs)")
@pytest.mark.parametrize("enum", sorted(CONSTANTS))
def test_constants_match_the_kernel_header(enum: str) -> None:
    members = enum_members(HEADER.read_text(), enum)
    for name in CONSTANTS[enum]:
        assert members.index(name) == getattr(ns, name), name


@pytest.mark.skipif(not HEADER.exists(), reason=f"{HEADER} not installed")
def test_element_flags_match_the_kernel_header() -> None:
    text = HEADER.read_text()
    for name in ("NFT_SET_ELEM_INTERVAL_END", "NFT_SET_ELEM_CATCHALL"):
        found = [line for line in text.splitlines() if line.strip().startswith(name + "\t")]
        assert found, name
        assert int(found[0].split("=")[1].strip(" ,"), 0) == getattr(ns, name)


def test_constants_match_pyroute2() -> None:
    from pyroute2.netlink.nfnetlink import nftsocket as pr

    assert pr.NFT_MSG_NEWSETELEM == ns.NFT_MSG_NEWSETELEM
    assert pr.NFT_MSG_GETSETELEM == ns.NFT_MSG_GETSETELEM
    msg = pr.nft_set_elem_list_msg
    names = [entry[0] for entry in msg.nla_map]
    elem = [entry[0] for entry in msg.set_elem.nla_map]
    data = [entry[0] for entry in msg.set_elem.data_attributes.nla_map]
    for name in dir(ns):
        if name.startswith("NFTA_SET_ELEM_LIST_"):
            assert names.index(name) == getattr(ns, name), name
        elif name.startswith("NFTA_SET_ELEM_"):
            assert elem.index(name) == getattr(ns, name), name
        elif name.startswith("NFTA_DATA_"):
            assert data.index(name) == getattr(ns, name), name
    udata = msg.set_elem.set_elem_udata.udata_types
    assert udata.index("NFTNL_UDATA_SET_ELEM_COMMENT") == ns.NFTNL_UDATA_SET_ELEM_COMMENT


# -- requests ---------------------------------------------------------------------------------


def test_setelems_request_bytes() -> None:
    expected = struct.pack("=IHHIIBBH", 44, 0x0A0D, 0x301, 9, 0, 2, 0, 0)
    expected += struct.pack("=HH", 9, 1) + b"lrkp\0" + b"\0\0\0"
    expected += struct.pack("=HH", 12, 2) + b"dnat_to\0"
    assert ns.setelems_request(9, 2, "lrkp", "dnat_to") == expected


def test_setelems_request_matches_pyroute2_encoder() -> None:
    from pyroute2.netlink.nfnetlink.nftsocket import nft_set_elem_list_msg

    msg = nft_set_elem_list_msg()
    msg["header"]["type"] = (10 << 8) | ns.NFT_MSG_GETSETELEM
    msg["header"]["flags"] = 0x301
    msg["header"]["sequence_number"] = 3
    msg["nfgen_family"] = 2
    msg["attrs"] = [("NFTA_SET_ELEM_LIST_TABLE", "lrkp"), ("NFTA_SET_ELEM_LIST_SET", "learning")]
    msg.encode()
    assert bytes(msg.data) == ns.setelems_request(3, 2, "lrkp", "learning")


# -- replies ----------------------------------------------------------------------------------


def test_key_layout_pads_each_field_to_a_register() -> None:
    # As the kernel dumped `1.2.3.4 . 5000 . 10.201.1.1 . 20000 : 6.7.8.9 . 7000`.
    key = flow_key(ep("1.2.3.4", 5000), ep("10.201.1.1", 20000))
    assert key.hex() == "01020304138800000ac901014e200000"
    assert raw_endpoint(ep("6.7.8.9", 7000)).hex() == "060708091b580000"


def test_map_reply_with_and_without_comments() -> None:
    data = setelem_reply(
        "dnat_to",
        element(flow_key(A, RA), raw_endpoint(B), comment="call-1"),
        element(flow_key(B, RB), raw_endpoint(A)),
        element(flow_key(ep("1.1.1.1", 1), RA), raw_endpoint(B), comment="odd \u00e9\u65e5 'x' {}"),
    )
    found = decoded("dnat_to", 16, 8, data)
    assert found.values == {
        flow_key(A, RA): raw_endpoint(B),
        flow_key(B, RB): raw_endpoint(A),
        flow_key(ep("1.1.1.1", 1), RA): raw_endpoint(B),
    }
    assert {key: ns.element_comment(u) for key, u in found.userdata.items()} == {
        flow_key(A, RA): "call-1",
        flow_key(ep("1.1.1.1", 1), RA): "odd \u00e9\u65e5 'x' {}",
    }
    assert found.generations == {7}


def test_general_path_decodes_like_the_fast_path() -> None:
    plain = [
        element(flow_key(A, RA), raw_endpoint(B), comment="c1"),
        element(flow_key(B, RB), raw_endpoint(A)),
    ]
    odd = [
        element(flow_key(A, RA), raw_endpoint(B), comment="c1", shuffled=True, nested_flag=True),
        element(flow_key(B, RB), raw_endpoint(A), flags=0),
    ]
    fast = decoded("dnat_to", 16, 8, setelem_reply("dnat_to", *plain))
    general = decoded("dnat_to", 16, 8, setelem_reply("dnat_to", *odd))
    assert (fast.values, fast.userdata) == (general.values, general.userdata)


def test_elements_across_messages_and_datagrams() -> None:
    first = setelem_reply("learning", element(raw_endpoint(RA), comment="a"), seq=4)
    second = setelem_reply(
        "learning", element(raw_endpoint(RB)), element(raw_endpoint(RA.offset(1))), seq=4
    )
    empty = setelem_reply("learning", seq=4)  # the kernel ends a dump with an empty message
    found = decoded("learning", 8, 0, first + second, empty + done(4))
    assert set(found.values) == {raw_endpoint(e) for e in (RA, RB, RA.offset(1))}
    assert set(found.values.values()) == {b""}
    assert ns.endpoint_set(found) == frozenset({RA, RB, RA.offset(1)})


def test_interval_ends_and_catchall_are_skipped() -> None:
    data = setelem_reply(
        "learning",
        element(raw_endpoint(RA)),
        element(raw_endpoint(RB), flags=ns.NFT_SET_ELEM_INTERVAL_END),
        element(None, flags=ns.NFT_SET_ELEM_CATCHALL),
        element(raw_endpoint(RB.offset(1)), flags=0),
    )
    assert ns.endpoint_set(decoded("learning", 8, 0, data)) == frozenset({RA, RB.offset(1)})
    # A map's interval end carries no data: skipped, not an error.
    end = setelem_reply("dnat_to", element(flow_key(A, RA), None, flags=1))
    assert decoded("dnat_to", 16, 8, end).values == {}


def test_comment_user_data() -> None:
    assert ns.element_comment(udata_comment("call-1")) == "call-1"
    assert ns.element_comment(b"") == ""
    flags_first = struct.pack("=BBI", 1, 4, 1)  # NFTNL_UDATA_SET_ELEM_FLAGS, then the comment
    assert ns.element_comment(udata_comment("x", before=flags_first)) == "x"
    assert ns.element_comment(flags_first) == ""
    longest = "\u00e9" * 64  # 128 bytes, the most nftables keeps
    assert ns.element_comment(udata_comment(longest)) == longest
    with pytest.raises(KernelError, match="user data"):
        ns.element_comment(b"\x00\x09call")
    with pytest.raises(KernelError, match="user data"):
        ns.element_comment(b"\x00")


def test_comment_matches_pyroute2_decoder() -> None:
    from pyroute2.netlink.nfnetlink.nftsocket import nft_set_elem_list_msg

    udata = nft_set_elem_list_msg.set_elem.set_elem_udata
    raw = udata_comment("call-\u00e9", before=struct.pack("=BBI", 1, 4, 1))
    assert udata.udata_decode(raw)[-1] == ("NFTNL_UDATA_SET_ELEM_COMMENT", "call-é".encode())
    assert ns.element_comment(raw) == "call-\u00e9"


def test_merge_flows_as_installed_reads_them() -> None:
    both, dnat_only, snat_only, quiet = (
        flow_key(A, RA),
        flow_key(B, RB),
        flow_key(ep("1.1.1.1", 1), RA),
        flow_key(ep("2.2.2.2", 2), RB),
    )
    dnat = decoded(
        "dnat_to",
        16,
        8,
        setelem_reply(
            "dnat_to",
            element(both, raw_endpoint(B), comment="c-both"),
            element(dnat_only, raw_endpoint(A), comment="c-dnat"),
            element(quiet, raw_endpoint(A)),
        ),
    )
    snat = decoded(
        "snat_to",
        16,
        8,
        setelem_reply(
            "snat_to",
            element(both, raw_endpoint(RB), comment="ignored"),
            element(snat_only, raw_endpoint(RB), comment="c-snat"),
            element(quiet, raw_endpoint(RA), comment="from-snat"),
        ),
    )
    flows = ns.merge_flows(dnat, snat)
    assert sorted(flows, key=repr) == sorted(
        [
            InstalledFlow("c-both", A, RA, B, RB),
            InstalledFlow("c-dnat", B, RB, A, None),
            InstalledFlow("c-snat", ep("1.1.1.1", 1), RA, None, RB),
            InstalledFlow("from-snat", ep("2.2.2.2", 2), RB, A, RA),
        ],
        key=repr,
    )
    # Endpoints are shared, not rebuilt per element.
    by_sender = {flow.sender: flow for flow in flows}
    assert by_sender[A].target is by_sender[B].sender
    assert by_sender[A].relay_out is by_sender[B].relay


def test_bad_elements_are_kernel_errors() -> None:
    cases = {
        "with a key of 8 bytes": setelem_reply("dnat_to", element(raw_endpoint(A), b"\0" * 8)),
        "with no bytes of data": setelem_reply("dnat_to", element(flow_key(A, RA))),
        "with 4 bytes of data": setelem_reply("dnat_to", element(flow_key(A, RA), b"\0" * 4)),
        "with a key of no bytes": setelem_reply("dnat_to", element(None, raw_endpoint(A))),
        "elements of set b'snat_to'": setelem_reply("snat_to", element(flow_key(A, RA), b"1")),
    }
    for match, data in cases.items():
        with pytest.raises(KernelError, match=match):
            decoded("dnat_to", 16, 8, data)
    with pytest.raises(KernelError, match="is a map, read as a set"):
        decoded("learning", 8, 0, setelem_reply("learning", element(raw_endpoint(A), b"1" * 8)))
    verdict = nla(nw.NFTA_LIST_ELEM, value(1, flow_key(A, RA)) + nla(2, nla(2, bytes(8))))
    with pytest.raises(KernelError, match="verdict"):
        decoded("dnat_to", 16, 8, setelem_reply("dnat_to", verdict))


def test_port_zero_is_a_kernel_error() -> None:
    zero = struct.pack(">4sH2x", A.ip.packed, 0)
    found = decoded("learning", 8, 0, setelem_reply("learning", element(zero)))
    with pytest.raises(KernelError, match="port 0"):
        ns.endpoint_set(found)


# -- garbage ----------------------------------------------------------------------------------


def decode_everything(data: bytes) -> None:
    """Run every decoder the reader runs on `data`; only KernelError may escape."""
    for key_size, data_size in ((16, 8), (8, 0)):
        with contextlib.suppress(KernelError):
            ns.SetElements("dnat_to", key_size, data_size).add(data)
        try:
            messages = nw.split_messages(data)
        except KernelError:
            continue
        for msg in messages:
            with contextlib.suppress(KernelError):
                found = ns.SetElements("dnat_to", key_size, data_size)
                found.add(msg.body)
                if data_size:
                    ns.merge_flows(found, ns.SetElements("snat_to", 16, 8))
                else:
                    ns.endpoint_set(found)
    with contextlib.suppress(KernelError):
        ns.element_comment(data)


VALID = [
    setelem_reply(
        "dnat_to",
        element(flow_key(A, RA), raw_endpoint(B), comment="call-1"),
        element(flow_key(B, RB), raw_endpoint(A), shuffled=True, flags=0),
    ),
    setelem_reply("dnat_to", element(raw_endpoint(RA), comment="x"), element(raw_endpoint(RB))),
]


def test_every_truncation_and_byte_flip_of_valid_replies() -> None:
    for data in mutations(VALID):
        decode_everything(data)


@settings(max_examples=400, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_kernel_error(data: bytes) -> None:
    decode_everything(data)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(VALID), st.binary(max_size=40), st.integers(min_value=0, max_value=300))
def test_spliced_garbage_raises_only_kernel_error(valid: bytes, junk: bytes, where: int) -> None:
    decode_everything(valid[:where] + junk + valid[where:])


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.binary(max_size=60), max_size=6))
def test_garbage_elements_in_a_valid_frame_raise_only_kernel_error(elements: list[bytes]) -> None:
    frame = setelem_reply("dnat_to", *(nla(nw.NFTA_LIST_ELEM, junk) for junk in elements))
    decode_everything(frame)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(
            st.binary(min_size=16, max_size=16),
            st.binary(min_size=8, max_size=8),
            st.none() | st.text(max_size=40).filter(lambda t: "\0" not in t),
        ),
        max_size=20,
    )
)
def test_decoded_elements_round_trip(items: list[tuple[bytes, bytes, str | None]]) -> None:
    data = setelem_reply("dnat_to", *(element(k, d, comment=c) for k, d, c in items))
    found = decoded("dnat_to", 16, 8, data)
    expected = {k: (d, c or "") for k, d, c in items}
    assert {
        k: (d, ns.element_comment(found.userdata.get(k, b""))) for k, d in found.values.items()
    } == (expected)


# -- the exchange, over scripted sockets ----------------------------------------------------


class ScriptedSocket:
    """Stands in for the netlink socket: each send queues the next scripted answer."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.queue: list[bytes] = []
        self.sent: list[bytes] = []
        self.lock = threading.Lock()

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        if self.answers:
            self.queue += self.answers.pop(0)
        return len(data)

    def recvmsg_into(self, buffers: list[bytearray]) -> tuple[int, list[object], int, object]:
        if not self.queue:
            raise TimeoutError("timed out")
        reply = self.queue.pop(0)
        size = min(len(reply), len(buffers[0]))
        buffers[0][:size] = reply[:size]
        return size, [], socket.MSG_TRUNC if len(reply) > size else 0, None

    def recv(self, size: int) -> bytes:
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop(0)

    def setblocking(self, flag: bool) -> None:
        pass

    def settimeout(self, value: float) -> None:
        pass

    def close(self) -> None:
        pass


def scripted(cls: type[ns.SetDump], answers: list[list[bytes]]) -> ns.SetDump:
    made = object.__new__(cls)
    made._sock = ScriptedSocket(answers)  # type: ignore[assignment]
    made._seq = 0
    made._dirty = False
    made.bytes_received = 0
    made._buffer = bytearray(ns.RECV_BUFFER)
    return made


def reader(
    first: list[list[bytes]], second: list[list[bytes]] | None = None
) -> tuple[ns.SetReader, ScriptedSocket, ScriptedSocket]:
    made = scripted(ns.SetReader, first)
    assert isinstance(made, ns.SetReader)
    made._peer = scripted(ns.SetDump, second or [])
    return made, made._sock, made._peer._sock  # type: ignore[return-value]


def dump(seq: int, *replies: bytes) -> list[bytes]:
    return [*replies, done(seq)]


def test_read_flows_merges_the_two_dumps() -> None:
    made, first, second = reader(
        [
            dump(
                1,
                setelem_reply("dnat_to", element(flow_key(A, RA), raw_endpoint(B), comment="c")),
                setelem_reply("dnat_to", element(flow_key(B, RB), raw_endpoint(A), comment="c")),
            )
        ],
        [dump(1, setelem_reply("snat_to", element(flow_key(A, RA), raw_endpoint(RB))))],
    )
    flows = made.read_flows()
    assert sorted(flows, key=repr) == sorted(
        [InstalledFlow("c", A, RA, B, RB), InstalledFlow("c", B, RB, A, None)], key=repr
    )
    (request,) = nw.split_messages(first.sent[0])
    assert request.type == (10 << 8) | ns.NFT_MSG_GETSETELEM
    assert nw.parse_attrs(request.body, 4)[ns.NFTA_SET_ELEM_LIST_SET] == b"dnat_to\0"
    assert nw.parse_attrs(nw.split_messages(second.sent[0])[0].body, 4)[2] == b"snat_to\0"


def test_interrupted_dump_is_read_again() -> None:
    intr = nw.NLM_F_MULTI | nw.NLM_F_DUMP_INTR
    made, first, _ = reader(
        [
            dump(1, setelem_reply("learning", element(raw_endpoint(RA)), seq=1, flags=intr)),
            dump(2, setelem_reply("learning", element(raw_endpoint(RB)), seq=2)),
        ]
    )
    assert made.read_learning() == frozenset({RB})
    assert len(first.sent) == 2


def test_a_dump_across_generations_is_read_again() -> None:
    made, first, _ = reader(
        [
            dump(
                1,
                setelem_reply("learning", element(raw_endpoint(RA)), seq=1, gen=7),
                setelem_reply("learning", element(raw_endpoint(RB)), seq=1, gen=8),
            ),
            dump(2, setelem_reply("learning", element(raw_endpoint(RB)), seq=2, gen=8)),
        ]
    )
    assert made.read_learning() == frozenset({RB})
    assert len(first.sent) == 2


def test_maps_of_different_generations_are_read_again() -> None:
    dnat = element(flow_key(A, RA), raw_endpoint(B))
    snat = element(flow_key(A, RA), raw_endpoint(RB))
    made, first, second = reader(
        [
            dump(1, setelem_reply("dnat_to", dnat, seq=1, gen=7)),
            dump(2, setelem_reply("dnat_to", dnat, seq=2, gen=8)),
        ],
        [
            dump(1, setelem_reply("snat_to", snat, seq=1, gen=8)),
            dump(2, setelem_reply("snat_to", snat, seq=2, gen=8)),
        ],
    )
    assert made.read_flows() == [InstalledFlow("", A, RA, B, RB)]
    assert (len(first.sent), len(second.sent)) == (2, 2)


def test_a_set_that_never_holds_still_is_a_kernel_error() -> None:
    answers = [
        dump(
            n + 1,
            setelem_reply("learning", seq=n + 1, gen=n),
            setelem_reply("learning", seq=n + 1, gen=n + 1),
        )
        for n in range(nw.ATTEMPTS)
    ]
    made, _, _ = reader(answers)
    with pytest.raises(KernelError, match="changed during each of"):
        made.read_learning()


def test_missing_set_and_failures_are_kernel_errors() -> None:
    made, _, _ = reader([[error(1, -errno.ENOENT)]])
    with pytest.raises(KernelError, match="no such table or set"):
        made.read_learning()
    made, _, _ = reader([[error(1, -errno.EPERM)]])
    with pytest.raises(KernelError, match="EPERM"):
        made.read_learning()
    made, _, _ = reader([[setelem_reply("learning", seq=1)]])  # and then silence
    with pytest.raises(KernelError, match="did not answer"):
        made.read_learning()
    made, _, _ = reader([[b"\0" * (ns.RECV_BUFFER + 1)]])
    with pytest.raises(KernelError, match="did not fit"):
        made.read_learning()


def test_a_failing_map_fails_read_flows_after_both_dumps_end() -> None:
    made, _, second = reader(
        [dump(1, setelem_reply("dnat_to", element(flow_key(A, RA), raw_endpoint(B))))],
        [[error(1, -errno.ENOENT)]],
    )
    with pytest.raises(KernelError, match="snat_to: no such table or set"):
        made.read_flows()
    made, _, second = reader(
        [[error(1, -errno.ENOENT)]],
        [dump(1, setelem_reply("snat_to", element(flow_key(A, RA), raw_endpoint(B))))],
    )
    with pytest.raises(KernelError, match="dnat_to: no such table or set"):
        made.read_flows()
    assert not second.queue  # the peer's dump was read to its end before the error


def test_garbled_dump_is_drained_before_the_next_read() -> None:
    made, first, _ = reader(
        [
            [b"\xff" * 20, setelem_reply("learning", seq=1), done(1)],
            dump(2, setelem_reply("learning", element(raw_endpoint(RA)), seq=2)),
        ]
    )
    with pytest.raises(KernelError):
        made.read_learning()
    assert made.read_learning() == frozenset({RA})
    assert len(first.sent) == 2 and not first.queue


def test_read_state_returns_the_first_consistent_attempt_alone() -> None:
    intr = nw.NLM_F_MULTI | nw.NLM_F_DUMP_INTR
    made, _, _ = reader(
        [
            dump(
                1, setelem_reply("dnat_to", element(flow_key(A, RA), raw_endpoint(B)), flags=intr)
            ),
            dump(2, setelem_reply("learning", element(raw_endpoint(RA)), seq=2)),
            dump(3, setelem_reply("dnat_to", element(flow_key(B, RB), raw_endpoint(A)), seq=3)),
            dump(4, setelem_reply("learning", seq=4)),
        ],
        [dump(1, setelem_reply("snat_to", seq=1)), dump(2, setelem_reply("snat_to", seq=2))],
    )
    state = made.read_state()
    assert state.consistent
    assert state.flows == (InstalledFlow("", B, RB, A, None),)
    assert state.learning == frozenset()


def test_read_state_merges_what_every_attempt_saw_when_none_is_consistent() -> None:
    made, first, _ = reader(
        [
            dump(1, setelem_reply("dnat_to", element(flow_key(A, RA), raw_endpoint(B)), gen=7)),
            dump(2, setelem_reply("learning", element(raw_endpoint(RA)), seq=2, gen=8)),
            dump(
                3, setelem_reply("dnat_to", element(flow_key(B, RB), raw_endpoint(A)), seq=3, gen=9)
            ),
            dump(4, setelem_reply("learning", seq=4, gen=10)),
        ],
        [dump(1, setelem_reply("snat_to", seq=1, gen=7)), dump(2, setelem_reply("snat_to", seq=2))],
    )
    state = made.read_state(attempts=2)
    assert not state.consistent  # generations 7-10: never one snapshot, and never an error
    assert sorted(state.flows, key=repr) == sorted(
        [InstalledFlow("", A, RA, B, None), InstalledFlow("", B, RB, A, None)], key=repr
    )
    assert state.learning == frozenset({RA})
    assert len(first.sent) == 4
