"""The data plane's encoders, checked without a kernel."""

from __future__ import annotations

import json
import socket
from ipaddress import IPv4Address

from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
    NFCTAttrTuple,
    nfct_msg,
)

from lrkp_tsl.dataplane.conntrack import decode_entry, encode_delete
from lrkp_tsl.dataplane.nft import add_commands, delete_commands, element_comment
from lrkp_tsl.media import ConntrackEntry, Endpoint
from tests.unit.test_media import WORKED


def test_conntrack_delete_matches_pyroute2_encoding() -> None:
    sender = Endpoint(IPv4Address("10.0.0.21"), 4000)
    relay = Endpoint(IPv4Address("10.0.0.10"), 20002)
    reference = nfct_msg.create_from(
        tuple_orig=NFCTAttrTuple(
            saddr="10.0.0.21", daddr="10.0.0.10", sport=4000, dport=20002, proto=17
        )
    )
    reference["nfgen_family"] = socket.AF_INET
    reference["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    reference["header"]["flags"] = 0x1 | 0x4  # request, ack
    reference["header"]["sequence_number"] = 77
    reference.encode()
    assert encode_delete(sender, relay, 77) == bytes(reference.data)


def test_add_commands_key_both_maps_by_exact_flow_with_call_id() -> None:
    commands = add_commands(WORKED.call_id, WORKED.flows()[:1])
    assert json.loads(json.dumps(commands)) == [
        {
            "add": {
                "element": {
                    "family": "ip",
                    "table": "lrkp",
                    "name": "dnat_to",
                    "elem": [
                        [
                            {
                                "elem": {
                                    "val": {"concat": ["10.0.0.21", 4000, "10.0.0.10", 20002]},
                                    "comment": "a84b4c76e66710@10.0.0.21",
                                }
                            },
                            {"concat": ["10.0.1.31", 6000]},
                        ]
                    ],
                }
            }
        },
        {
            "add": {
                "element": {
                    "family": "ip",
                    "table": "lrkp",
                    "name": "snat_to",
                    "elem": [
                        [
                            {
                                "elem": {
                                    "val": {"concat": ["10.0.0.21", 4000, "10.0.0.10", 20002]},
                                    "comment": "a84b4c76e66710@10.0.0.21",
                                }
                            },
                            {"concat": ["10.0.0.10", 20000]},
                        ]
                    ],
                }
            }
        },
    ]


def test_one_transaction_holds_every_flow_of_a_call() -> None:
    commands = add_commands(WORKED.call_id, WORKED.flows())
    assert [len(c["add"]["element"]["elem"]) for c in commands] == [4, 4]
    deletes = delete_commands(WORKED.flows())
    assert [d["delete"]["element"]["name"] for d in deletes] == ["dnat_to", "snat_to"]
    assert [len(d["delete"]["element"]["elem"]) for d in deletes] == [4, 4]
    assert add_commands("x", []) == [] and delete_commands([]) == []


def test_comment_is_printable_unquoted_and_bounded() -> None:
    assert element_comment('a"b\\c\x00d') == "a_b_c_d"
    assert len(element_comment("x" * 300).encode()) == 128
    assert element_comment("é" * 100).encode().__len__() <= 128


def test_conntrack_entry_decoder_reads_pyroute2_encoded_entry() -> None:
    message = nfct_msg()
    message["nfgen_family"] = socket.AF_INET
    message["header"]["type"] = NFNL_SUBSYS_CTNETLINK << 8
    message["attrs"] = [
        [
            "CTA_TUPLE_ORIG",
            {
                "attrs": NFCTAttrTuple(
                    saddr="10.0.0.21", daddr="10.0.0.10", sport=4000, dport=20002, proto=17
                ).attrs()
            },
        ],
        [
            "CTA_TUPLE_REPLY",
            {
                "attrs": NFCTAttrTuple(
                    saddr="10.0.1.31", daddr="10.0.0.10", sport=6000, dport=20000, proto=17
                ).attrs()
            },
        ],
        ["CTA_COUNTERS_ORIG", {"attrs": [["CTA_COUNTERS_PACKETS", 3], ["CTA_COUNTERS_BYTES", 99]]}],
        [
            "CTA_COUNTERS_REPLY",
            {"attrs": [["CTA_COUNTERS_PACKETS", 5], ["CTA_COUNTERS_BYTES", 190]]},
        ],
    ]
    message.encode()
    entry = decode_entry(bytes(message.data))
    assert entry == ConntrackEntry(
        Endpoint(IPv4Address("10.0.0.21"), 4000),
        Endpoint(IPv4Address("10.0.0.10"), 20002),
        Endpoint(IPv4Address("10.0.1.31"), 6000),
        Endpoint(IPv4Address("10.0.0.10"), 20000),
        3,
        5,
    )


def test_conntrack_entry_decoder_skips_non_udp() -> None:
    message = nfct_msg()
    message["nfgen_family"] = socket.AF_INET
    message["attrs"] = [
        [
            "CTA_TUPLE_ORIG",
            {
                "attrs": NFCTAttrTuple(
                    saddr="10.0.0.1", daddr="10.0.0.2", sport=1, dport=2, proto=6
                ).attrs()
            },
        ],
        [
            "CTA_TUPLE_REPLY",
            {
                "attrs": NFCTAttrTuple(
                    saddr="10.0.0.2", daddr="10.0.0.1", sport=2, dport=1, proto=6
                ).attrs()
            },
        ],
    ]
    message.encode()
    assert decode_entry(bytes(message.data)) is None


def test_queue_mark_matches_the_rules_file() -> None:
    from lrkp_tsl.dataplane.queue import QUEUE_MARK, unmarked
    from lrkp_tsl.defaults import DEFAULT_RULES

    rules = DEFAULT_RULES.read_text()
    assert f"meta mark set meta mark | {QUEUE_MARK:#010x}" in rules
    # The node clears exactly that bit when it accepts a queued packet (no unmark chain).
    assert unmarked(0xFFFFFFFF) == 0xFFFFFFFF ^ QUEUE_MARK
    assert unmarked(QUEUE_MARK | 0x5) == 0x5 and unmarked(0x5) == 0x5


def test_parse_udp_reads_addresses_and_refuses_others() -> None:
    from lrkp_tsl.dataplane.queue import parse_udp

    header = bytes.fromhex("45000024000100004011") + b"\0\0" + bytes([10, 0, 0, 21, 10, 0, 0, 10])
    udp = (4000).to_bytes(2, "big") + (20002).to_bytes(2, "big") + b"\0\x10\0\0"
    source, destination = parse_udp(header + udp + b"rtp!") or (None, None)
    assert source == Endpoint(IPv4Address("10.0.0.21"), 4000)
    assert destination == Endpoint(IPv4Address("10.0.0.10"), 20002)
    tcp = header[:9] + b"\x06" + header[10:]
    assert parse_udp(tcp + udp) is None
    assert parse_udp(header[:20]) is None
    assert parse_udp(b"\x60" + header[1:] + udp) is None  # IPv6 version nibble


def test_latching_reachability_rule() -> None:
    from ipaddress import IPv4Network

    from lrkp_tsl.latching import Policy, Rule, initial, reachable

    routed = [IPv4Network("10.201.1.0/24")]
    assert reachable(IPv4Address("203.0.113.9"), []) is False  # documentation range
    assert reachable(IPv4Address("8.8.8.8"), []) is True
    assert reachable(IPv4Address("10.201.1.11"), routed) is True
    for private in ("10.201.3.10", "192.168.1.2", "100.64.0.1", "169.254.1.1", "0.0.0.0"):
        assert reachable(IPv4Address(private), routed) is False
    sdp = Endpoint(IPv4Address("192.168.1.2"), 4000)
    assert initial(Policy.AUTO, sdp, routed) == (Rule.ANYWHERE, None)
    assert initial(Policy.STRICT, sdp, routed) == (Rule.EXACT, sdp)
    assert initial(Policy.IP, sdp, routed) == (Rule.SAME_IP, None)
    public = Endpoint(IPv4Address("8.8.8.8"), 4000)
    assert initial(Policy.AUTO, public, routed) == (Rule.SAME_IP, public)
