"""Hostile and stale input against the real daemon: nothing a packet or a command does
reaches another call.

The node serves relay ports 20000-21999 on 10.201.1.1 (internal) and 10.201.2.1
(external); Kamailio's stand-in sends from 10.201.1.5.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrkp_lab.calls import CONTROL, NODE_ARGS, Call, Stream, burst, running_node
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.parties import Peers
from lrkp_lab.processes import rss_kib
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.media import Endpoint
from lrkp_tsl.protocol import NodeConfig

ARGS = (*NODE_ARGS, "--log-level", "info")


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    with running_node(lab, *ARGS) as running:
        yield running


def s_body(call_id: str, port: int, caller: str = "10.201.1.10", callee: str = "10.201.1.11",
           relay: str = str(INTERNAL_IP), verb: str = "S") -> bytes:  # fmt: skip
    return set_command(verb, caller, relay, relay, callee, 4000, port, port + 2, 6000, call_id)


def counters(node: Node) -> dict[str, int]:
    """The counters the node logs when it stops."""
    node.stop(signal.SIGTERM)
    found = re.search(r"counters: (.*)", node.output())
    assert found, node.output()
    return {k: int(v) for k, v in (item.split("=") for item in found.group(1).split(", "))}


# -- every command is checked against the node ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (s_body("foreign@lab", 20000, relay="8.8.8.8"), b"foreign-relay"),
        (s_body("low@lab", 19998), b"relay-port"),
        (s_body("rtcp@lab", 21997), b"relay-port"),  # caller side 21999, RTCP 22000
        (s_body("mcast@lab", 20000, callee="224.0.0.5"), b"bad-party"),
        (s_body("mine@lab", 20000, caller=str(EXTERNAL_IP)), b"bad-party"),
        (s_body("zero@lab", 20000, caller="0.0.0.0"), b"bad-party"),
        (s_body("abc@h x x 60 1 2", 20000), b"field-count"),
        (s_body("c" * 129, 20000), b"bad-call-id"),
    ],
)
def test_each_refusal_is_an_error_reply_and_changes_nothing(
    lab: Lab, node: Node, kamailio: Controller, body: bytes, code: bytes
) -> None:
    before = lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout
    reply = kamailio.command(body, CONTROL)
    assert reply is not None and reply.startswith(b"E " + code + b" "), reply
    assert lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout == before
    assert kamailio.command(b"P", CONTROL) == b"P PONG"


@pytest.mark.parametrize("cookie", [b"4242_17", b"-1804289383_846930886"], ids=["5.6", "6.x"])
def test_every_command_kamailio_sends_gets_its_answer(
    lab: Lab, node: Node, kamailio: Controller, cookie: bytes
) -> None:
    """Cookies as 5.6 (pid_seq) and 6.x (random, may be negative) make them; D with the
    empty fields 5.7+ sends before an answer; retransmissions of each."""
    commands = [
        (b"P", b"P PONG"),
        (s_body("k@lab", 20800), None),
        (s_body("k@lab", 20800, verb="D"), None),
        (b"D  10.201.1.1    20900   60 cancelled@lab ", None),
    ]
    for body, expected in commands:
        datagram = cookie + b" " + body
        for _ in range(2):  # the first copy and a retransmission
            kamailio.send(datagram, CONTROL)
            reply = kamailio.receive()
            assert reply == cookie + b" " + (expected or body + b"OK"), reply
    kamailio.send(cookie + b" G", CONTROL)
    reply = kamailio.receive()
    assert reply is not None and len(reply) == len(cookie) + 2 + NodeConfig.SIZE + 1


# -- G keeps Kamailio off live ports ---------------------------------------------------------


def test_g_points_past_1000_live_calls_and_a_block_at_the_end_fits(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    node.close()  # this test needs room for 1,000 calls (and not the control port 22333)
    wide = Node(lab, "relay", *ARGS[:4], "--ports", "23000-32998", *ARGS[6:])
    try:
        wide.wait_ready(CONTROL, kamailio)
        g_after_many_calls(kamailio, peers)
    finally:
        wide.close()


def g_after_many_calls(kamailio: Controller, peers: Peers) -> None:
    for index in range(1000):
        body = s_body(f"many-{index}@lab", 23000 + 4 * index)
        assert kamailio.command(body, CONTROL) == body + b"OK"
    reply = kamailio.command(b"G", CONTROL)
    assert reply is not None
    config = NodeConfig.unpack(reply[2:])
    assert (config.start_port, config.current_port, config.end_port) == (23000, 27000, 32992)
    caller, callee = peers("a", 4990), peers("b", 6990)
    body = set_command("S", "10.201.1.10", str(INTERNAL_IP), str(INTERNAL_IP), "10.201.1.11",
                       4990, config.end_port, config.end_port + 2, 6990, "last@lab")  # fmt: skip
    assert kamailio.command(body, CONTROL) == body + b"OK"
    caller_relay = Endpoint(INTERNAL_IP, config.end_port + 2)
    callee_relay = Endpoint(INTERNAL_IP, config.end_port)
    burst(caller, caller_relay, callee, callee_relay, 2, b"A")
    burst(callee, callee_relay, caller, caller_relay, 2, b"B")


# -- port reuse never crosses calls ------------------------------------------------------------


def test_port_reuse_never_delivers_one_calls_audio_into_another(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    """Kamailio wrapped its allocator: call 2 gets call 1's relay ports while call 1's
    parties still stream. Both callers are behind the same port-remapping NAT."""
    caller1, callee1 = peers("c", 4000), peers("b", 6000)
    call1 = Call(kamailio, caller1, callee1, 20000, "first@lab")
    burst(caller1, call1.caller_relay, callee1, call1.callee_relay, 1, b"hello")
    old = [Stream(caller1, call1.caller_relay, callee1, b"A1").start(),
           Stream(callee1, call1.callee_relay, caller1, b"B1").start()]  # fmt: skip
    time.sleep(0.5)
    caller2, callee2 = peers("c", 4100), peers("b", 6100)
    call2 = Call(kamailio, caller2, callee2, 20000, "second@lab")
    assert call2.caller_relay == call1.caller_relay
    new = [Stream(caller2, call2.caller_relay, callee2, b"A2").start(),
           Stream(callee2, call2.callee_relay, caller2, b"B2").start()]  # fmt: skip
    time.sleep(1.5)
    for stream in (*new, *old):
        stream.stop()
    for stream in new:
        assert stream.lost() == [] and stream.foreign == [], (stream.tag, stream.foreign[:3])
    assert new[0].sources == {call2.callee_relay} and new[1].sources == {call2.caller_relay}
    for stream in old:  # call 1 is over: its parties hear nothing of call 2
        assert stream.foreign == [], (stream.tag, stream.foreign[:3])
    log = node.output()
    assert "[first@lab] removed: relay ports reassigned to call 'second@lab'" in log
    assert "[first@lab] its relay ports were reused while it was live" in log
    assert "[second@lab] learned 10.201.1.20:" in log


# -- the queue gives every packet a verdict -----------------------------------------------------


def raw_udp(source: tuple[str, int], to: Endpoint, *, truncate: bool = False) -> bytes:
    """An IPv4 UDP packet, or one whose UDP header is cut after the ports (4 bytes)."""
    udp = struct.pack("!HHHH", source[1], to.port, 8 + 4, 0) + b"rtp!"
    if truncate:
        udp = udp[:4]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                         IPv4Address(source[0]).packed, to.ip.packed)  # fmt: skip
    return header + udp


def test_malformed_queued_packets_never_wedge_the_queue(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("c", 4200), peers("b", 6200)
    call = Call(kamailio, caller, callee, 20200, "after-garbage@lab")  # learning: queued
    with lab.inside("a"):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for index in range(2000):  # > the queue's 1024 slots; below its 2000/s limit
            if index % 2:
                packet = raw_udp(("10.201.1.10", 0), call.caller_relay)  # source port 0
            else:
                packet = raw_udp(("10.201.1.10", 5000), call.caller_relay, truncate=True)
            raw.sendto(packet, (str(call.caller_relay.ip), 0))
            time.sleep(0.001)
    finally:
        raw.close()
    caller.send(call.caller_relay, b"first")
    assert callee.expect(b"first") == call.callee_relay
    burst(callee, call.callee_relay, caller, call.caller_relay, 2, b"B")
    assert counters(node).get("packets.malformed") == 2000


# -- fuzzing the control socket with a live call ----------------------------------------------

LIVE_ID = "live@lab"
LIVE_PORTS = {19999, 20000, 20001, 20002, 20003}  # its ports, and the one whose RTCP is one
EXAMPLES = int(os.environ.get("LRKP_FUZZ_EXAMPLES", "150"))
IPS = ["10.201.1.1", "10.201.2.1", "10.201.1.10", "10.201.1.11", "8.8.8.8", "224.0.0.1",
       "0.0.0.0", "255.255.255.255", "127.0.0.1", "10.201.1.999", "::1", "", "x"]  # fmt: skip
field = st.one_of(
    st.sampled_from(IPS),
    st.integers(0, 70000).map(str),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=12),
    st.sampled_from(["", "60", "-1", "abc@h", "c" * 200]),
)
command = st.builds(
    lambda cookie, verb, fields: (cookie + " " + verb + " " + " ".join(fields) + " ").encode(),
    st.sampled_from(["1_1", "-5_9", "12_34", "x_y", ""]),
    st.sampled_from(["S", "D", "P", "G", "X", "s"]),
    st.lists(field, min_size=0, max_size=12),
)
datagram = st.one_of(command, st.binary(max_size=300), st.binary(min_size=1025, max_size=1500))


def harmless(data: bytes) -> bool:
    """Names neither the live call's Call-ID nor its ports (nor a port whose RTCP is one)."""
    if LIVE_ID.encode() in data:
        return False
    words = set(data.split(b" "))
    return not any(str(port).encode() in words for port in LIVE_PORTS)


def test_fuzzed_control_socket_leaves_the_live_call_untouched(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    caller, callee = peers("c", 4300), peers("b", 6300)
    call = Call(kamailio, caller, callee, 20000, LIVE_ID)
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")
    streams = [Stream(caller, call.caller_relay, callee, b"A").start(),
               Stream(callee, call.callee_relay, caller, b"B").start()]  # fmt: skip
    rss_before = rss_kib(node.proc.pid)
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.lists(datagram.filter(harmless), min_size=1, max_size=40))
    def fuzz(batch: list[bytes]) -> None:
        nonlocal sent
        for data in batch:
            kamailio.send(data, CONTROL)
            sent += 1
        while kamailio.receive(0.005) is not None:
            pass

    fuzz()
    assert kamailio.command(b"P", CONTROL) == b"P PONG"
    for stream in streams:
        stream.stop()
        assert stream.lost() == [] and stream.foreign == []
    assert node.proc.poll() is None
    assert rss_kib(node.proc.pid) - rss_before < 48 * 1024  # the caches' budgets, and slack
    assert sent >= EXAMPLES
    log_lines = node.output().count("\n")
    assert log_lines < 400, f"{log_lines} log lines for {sent} datagrams"


def test_a_stale_delete_from_before_a_re_invite_leaves_the_call_relayed(
    node: Node, kamailio: Controller, peers: Peers
) -> None:
    """`D` matches its call by Call-ID. One built from the call's state before a re-INVITE
    moved it (the callee's answer changed its media port) names the old addresses: it must
    not cut the media of the call as it is now. A `D` naming the current state ends it."""
    caller, callee, moved = peers("a", 4500), peers("b", 6500), peers("b", 6600)
    call = Call(kamailio, caller, callee, 21100, "reinvite@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"before")
    reinvite = set_command(
        "S", str(caller.endpoint.ip), str(INTERNAL_IP), str(INTERNAL_IP),
        str(moved.endpoint.ip), caller.endpoint.port, 21100, 21102, moved.endpoint.port,
        "reinvite@lab",
    )  # fmt: skip
    assert kamailio.command(reinvite, CONTROL) == reinvite + b"OK"
    burst(caller, call.caller_relay, moved, call.callee_relay, 2, b"moved")
    stale = b"D" + call.body[1:]  # the addresses of the call before its re-INVITE
    assert kamailio.command(stale, CONTROL) == stale + b"OK"
    burst(caller, call.caller_relay, moved, call.callee_relay, 3, b"after stale D")
    burst(moved, call.callee_relay, caller, call.caller_relay, 3, b"back")
    assert "[reinvite@lab] D from 10.201.1.5" in node.output()
    assert "ignored: it names dnat_port 6500, the call is at dnat_port 6600" in node.output()
    current = b"D" + reinvite[1:]
    assert kamailio.command(current, CONTROL) == current + b"OK"
    caller.send(call.caller_relay, b"after D")
    moved.expect_nothing()
    assert "[reinvite@lab] removed: deleted by the controlling layer (D)" in node.output()
    assert counters(node)["command.delete.stale"] == 1
