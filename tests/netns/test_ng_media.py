"""ng calls through the real daemon and the real kernel: the node serves rtpengine's ng on
its `--ng` socket, and an ng call's media takes exactly the kernel path of an lrkproxy
call's (map elements, first-packet learning, conntrack), across a SIGKILL too; hostile
ng datagrams reach no live call.

The node: relay 10.201.1.1 (internal) / 10.201.2.1 (external), ports 20000-21999, lrkproxy
on 10.201.1.1:22333 and ng on 10.201.1.1:2223, Kamailio's stand-in at 10.201.1.5.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from functools import partial

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrkp_lab.calls import CONTROL, KAMAILIO_IP, NODE_ARGS, Call, Stream, burst, running_node
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.ngcalls import NAT_OUTSIDE, NgCall, kamailio_ng, ok, sdp
from lrkp_lab.ngpeer import UdpNgPeer
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.parties import Party, Peers
from lrkp_lab.processes import rss_kib
from lrkp_lab.waiting import wait_for
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.media import Endpoint
from lrkp_tsl.ng.bencode import Encodable, encode

NG = (str(INTERNAL_IP), 2223)
ARGS = (*NODE_ARGS, "--ng", f"udp:{NG[0]}:{NG[1]}", "--log-level", "info")
CTL = (sys.executable, "-m", "lrkp_tsl.ctl")


def ctl(lab: Lab, *args: str) -> tuple[int, str, str]:
    result = lab.run("relay", *CTL, *args, check=False)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    with running_node(lab, *ARGS) as running:
        yield running


@pytest.fixture
def kamailio(lab: Lab, node: Node) -> Iterator[UdpNgPeer]:
    with kamailio_ng(lab, "node", NG) as peer:
        yield peer


def counter(lab: Lab, name: str) -> int:
    out = lab.run("relay", "nft", "-j", "list", "counter", "ip", TABLE, name).stdout
    found = [item["counter"] for item in json.loads(out)["nftables"] if "counter" in item]
    return int(found[0]["packets"])


def entries(lab: Lab, relay: Endpoint) -> int:
    out = lab.run("relay", "conntrack", "-L", "-p", "udp", "--dport", str(relay.port),
                  check=False).stdout  # fmt: skip
    return sum(1 for line in out.splitlines() if f"dst={relay.ip} " in line)


def party_pair(peers: Peers, caller_port: int, callee_port: int) -> tuple[list[Party], list[Party]]:
    """The NAT'd caller `c` and the external callee `x`, a socket per stream and kind:
    [audio RTP, audio RTCP, video RTP, video RTCP] each."""
    caller = [peers("c", caller_port + offset) for offset in range(4)]
    callee = [peers("x", callee_port + offset) for offset in range(4)]
    return caller, callee


def test_a_two_stream_call_is_relayed_by_the_kernel_both_ways(
    lab: Lab, node: Node, kamailio: UdpNgPeer, peers: Peers
) -> None:
    """Audio and video, RTP and RTCP, both ways: the NAT'd caller is learned from its first
    packet on each, then the kernel relays everything else (conntrack, no queue)."""
    caller, callee = party_pair(peers, 4000, 6000)
    call = NgCall(kamailio, caller[0], callee[0], "av@lab")
    assert len(call.caller_relays) == len(call.callee_relays) == 2
    assert all(relay.ip == INTERNAL_IP for relay in call.caller_relays)
    assert all(relay.ip == EXTERNAL_IP for relay in call.callee_relays)
    relays = [(call.caller_relays[i].offset(d), call.callee_relays[i].offset(d))
              for i in (0, 1) for d in (0, 1)]  # fmt: skip
    # received-from named the caller's NAT: a stranger who sends first is not learned.
    stranger = peers("a", 4999)
    stranger.send(relays[0][0], b"stranger")
    callee[0].expect_nothing()
    queued = counter(lab, "queued")
    # The caller's first packet on each of the four: learned through the queue, delivered.
    sources = []
    for (to_caller_side, _to_callee_side), sender, receiver in zip(
        relays, caller, callee, strict=True
    ):
        sender.send(to_caller_side, b"first")
        assert receiver.expect(b"first").ip == EXTERNAL_IP
        sources.append(sender)
    assert counter(lab, "queued") - queued == 4
    relayed = counter(lab, "relayed")
    for (to_caller_side, to_callee_side), a, b in zip(relays, caller, callee, strict=True):
        reply_from = to_caller_side  # the callee hears the caller from the caller's relay
        burst(a, to_caller_side, b, to_callee_side, 20, b"ab")
        burst(b, to_callee_side, a, reply_from, 20, b"ba")
    assert counter(lab, "queued") - queued == 4  # nothing more went to userspace
    assert counter(lab, "relayed") - relayed >= 4 * 40 - 4  # the kernel relayed the rest
    for to_caller_side, _to_callee_side in relays:
        assert entries(lab, to_caller_side) == 1  # one conntrack entry per stream
    # lrkp-ctl shows the ng call, its tags, both streams and what the caller's NAT taught it.
    code, text, err = ctl(lab, "show", "av@lab", "--json")
    assert code == 0, err
    shown = json.loads(text)
    assert shown["protocol"] == "ng" and shown["about"] == {"tags": ["caller-tag", "callee-tag"]}
    assert [s["caller"]["learned"].split(":")[0] for s in shown["media_streams"]] == [
        NAT_OUTSIDE,
        NAT_OUTSIDE,
    ]
    code, text, err = ctl(lab, "sessions")
    assert code == 0 and "av@lab [ng, tags caller-tag/callee-tag]" in text, text
    assert "  stream 2" in text
    summary = call.delete()
    assert summary["result"] == "ok"
    caller[0].send(relays[0][0], b"after")
    callee[0].expect_nothing()
    log = node.output()
    line = next(text for text in log.splitlines() if "[av@lab] removed:" in text)
    assert "learned stream 1 caller 10.201.1.20:" in line, line
    assert "; stream 2 caller 10.201.1.20:" in line
    assert line.endswith("ng call, tags caller-tag/callee-tag"), line
    assert "deleted by the controlling layer (ng delete)" in line


def test_live_ng_calls_keep_their_media_across_a_sigkill_and_the_restarted_node_knows_them(
    lab: Lab, node: Node, kamailio: UdpNgPeer, peers: Peers
) -> None:
    """A two-stream call streaming both ways and an offer still ringing, then SIGKILL and a
    start: no packet lost; the restarted node answers the ringing call's answer and ends
    the live one on its delete (the ng table and its ports came back from the store)."""
    caller, callee = party_pair(peers, 4100, 6100)
    call = NgCall(kamailio, caller[0], callee[0], "killed@lab")
    audio_a, audio_b = call.caller_relays[0], call.callee_relays[0]
    caller[0].send(audio_a, b"learn")  # the NAT'd caller, learned before the kill
    callee[0].expect(b"learn")
    streams = [Stream(caller[0], audio_a, callee[0], b"A").start(),
               Stream(callee[0], audio_b, caller[0], b"B").start()]  # fmt: skip
    ringing_sdp = sdp(caller[2], ("audio", 4102))
    ok(kamailio.request({"command": "offer", "call-id": "ringing@lab", "from-tag": "r",
                         "sdp": ringing_sdp, "ICE": "remove"}))  # fmt: skip
    time.sleep(0.5)
    again = node.restart(signal.SIGKILL)
    try:
        client = Controller(lab, "sip", KAMAILIO_IP)
        again.wait_ready(CONTROL, client)
        client.close()
        time.sleep(1.0)  # media meanwhile, through the restored kernel state
        for stream in streams:
            stream.stop()
            assert stream.lost() == [] and stream.foreign == [], stream.tag
        answered = kamailio.request({"command": "answer", "call-id": "ringing@lab",
                                     "from-tag": "r", "to-tag": "t", "ICE": "remove",
                                     "sdp": sdp(callee[2], ("audio", 6102))})  # fmt: skip
        assert answered["result"] == "ok", answered
        call.delete()
        caller[0].send(audio_a, b"after")
        callee[0].expect_nothing()
        ok(kamailio.request({"command": "delete", "call-id": "ringing@lab", "from-tag": "r"}))
        assert "restored 2 calls from the store: 2 intact" in again.output()
    finally:
        again.close()


# -- self-repair with an ng call and an lrkproxy call live -----------------------------------

REPAIRED = "repaired:"
REPAIR_WAIT = 10.0  # a repair comes within a check interval or two (selfheal.CHECK_INTERVAL)
DAMAGES = (
    f"flush map ip {TABLE} dnat_to; flush map ip {TABLE} snat_to",  # every call's flows
    "flush ruleset",  # the table, its maps and sets, the queue rule: everything
)


def repaired(node: Node, times: int) -> bool:
    return node.output().count(REPAIRED) >= times


@pytest.mark.parametrize(
    ("kinds", "attributes"),
    [(("audio", "video"), ()), (("audio",), ("rtcp-mux",))],
    ids=["audio+video", "audio-rtcp-mux"],
)
def test_an_ng_call_and_an_lrkproxy_call_come_back_after_emptied_maps_and_a_flushed_ruleset(
    lab: Lab,
    node: Node,
    kamailio: UdpNgPeer,
    peers: Peers,
    kinds: tuple[str, ...],
    attributes: tuple[str, ...],
) -> None:
    """Both calls' media resumes after each repair (what is sent once the node logged the
    repair arrives), no call is lost, and the ng call is still ended by ng's delete."""
    caller, callee = party_pair(peers, 4200, 6200)
    ng_call = NgCall(kamailio, caller[0], callee[0], "repaired-ng@lab", kinds, attributes)
    if attributes:
        assert "a=rtcp-mux" in ng_call.answer["sdp"]  # both sides mux: no RTCP legs
    indexes = range(len(kinds))
    for index in indexes:  # the NAT'd caller, learned on each stream
        burst(caller[2 * index], ng_call.caller_relays[index], callee[2 * index],
              ng_call.callee_relays[index], 1, b"learn")  # fmt: skip
    stand_in = Controller(lab, "sip", KAMAILIO_IP)
    lrkp_a, lrkp_b = peers("a", 4400), peers("b", 6400)
    lrkproxy = Call(stand_in, lrkp_a, lrkp_b, 20400, "repaired-lrkp@lab")
    streams = [
        stream
        for index in indexes
        for stream in (
            Stream(
                caller[2 * index],
                ng_call.caller_relays[index],
                callee[2 * index],
                b"ng-%d-a" % index,
            ),
            Stream(
                callee[2 * index],
                ng_call.callee_relays[index],
                caller[2 * index],
                b"ng-%d-b" % index,
            ),
        )
    ]
    streams += [
        Stream(lrkp_a, lrkproxy.caller_relay, lrkp_b, b"lrkp-a"),
        Stream(lrkp_b, lrkproxy.callee_relay, lrkp_a, b"lrkp-b"),
    ]
    for stream in streams:
        stream.start()
    windows: list[tuple[list[int], list[int]]] = []  # per damage: sent, then and at repair
    try:
        for done, damage in enumerate(DAMAGES, start=1):
            time.sleep(0.5)
            damaged_at = [len(stream.sent) for stream in streams]
            lab.run("relay", "nft", damage)
            wait_for(f"repair {done}", partial(repaired, node, done), REPAIR_WAIT)
            windows.append((damaged_at, [len(stream.sent) for stream in streams]))
            time.sleep(1.0)
    finally:
        for stream in streams:
            stream.stop()
    for index, stream in enumerate(streams):
        lost = stream.lost()
        print(f"{stream.tag!r}: lost {len(lost)} of {len(stream.sent)}")
        # Lost only between a damage and its repair (and what was in flight then).
        outside = [
            seq
            for seq in lost
            if not any(then[index] - 2 <= seq <= at[index] + 2 for then, at in windows)
        ]
        assert outside == [], (stream.tag, outside, windows)
        assert stream.foreign == []
        assert stream.sources == {s.to for s in streams if s.sender is stream.receiver}, (
            stream.tag
        )  # the call's own relay endpoints
    code, text, err = ctl(lab, "sessions", "--json")
    assert code == 0, err
    rows = {row["call_id"]: row["protocol"] for row in map(json.loads, text.splitlines())}
    assert rows == {ng_call.call_id: "ng", lrkproxy.call_id: "lrkproxy"}  # no call lost
    # The ng call is still ng's: delete ends it (both streams), the lrkproxy call goes on.
    ng_call.delete()
    for index in indexes:
        caller[2 * index].send(ng_call.caller_relays[index], b"after delete")
        callee[2 * index].send(ng_call.callee_relays[index], b"after delete")
    for index in indexes:
        caller[2 * index].expect_nothing()
        callee[2 * index].expect_nothing()
    burst(lrkp_a, lrkproxy.caller_relay, lrkp_b, lrkproxy.callee_relay, 3, b"still")
    lrkproxy.delete(stand_in)
    stand_in.close()


# -- ng and lrkproxy calls from one port range -----------------------------------------------

SMALL_PORTS = (20000, 20099)  # 50 ng pairs, 25 lrkproxy blocks: both wrap within the test
WINDOW = 6  # live calls of each protocol at a time (older ones are deleted)
ROUNDS = 60


def relay_ports_of_call(endpoints: list[Endpoint]) -> set[Endpoint]:
    """RTP and RTCP of each relay endpoint."""
    return {relay.offset(delta) for relay in endpoints for delta in (0, 1)}


def test_ng_and_lrkproxy_calls_allocated_alternately_never_share_a_relay_port(
    lab: Lab, peers: Peers
) -> None:
    """Kamailio's lrkproxy module allocates from its own counter (from `G`'s current_port,
    4 ports a call, wrapping blindly at end_port); ng calls get theirs from the node. Both
    wrap the small range twice, alternately, with WINDOW calls of each live: no call ever
    gets a relay endpoint another live call holds (an `S` that lands on an ng call's ports
    is refused, never given them), and a delete of one protocol's call leaves the other's
    relaying."""
    args = (*ARGS, "--ports", f"{SMALL_PORTS[0]}-{SMALL_PORTS[1]}")
    with running_node(lab, *args) as node, kamailio_ng(lab, "node", NG) as kamailio:
        stand_in = Controller(lab, "sip", KAMAILIO_IP)
        try:
            config = stand_in.command(b"G", CONTROL)
            assert config is not None
            start, end, current = (int.from_bytes(config[2 + 4 * i : 6 + 4 * i], sys.byteorder)
                                   for i in range(3))  # fmt: skip
            assert (start, end) == (SMALL_PORTS[0], SMALL_PORTS[1] - 3)
            ng_a, ng_x = peers("a", 4500), peers("x", 6500)
            lrkp_a, lrkp_b = peers("a", 4600), peers("b", 6600)
            live: dict[str, tuple[str, set[Endpoint], object]] = {}  # call-id: protocol, ...
            order: dict[str, list[str]] = {"ng": [], "lrkproxy": []}
            refused = 0
            ng_ports_seen: set[int] = set()
            counter = current
            for round_ in range(ROUNDS):
                for protocol in ("ng", "lrkproxy"):
                    call_id = f"{protocol}-{round_}@lab"
                    if protocol == "ng":
                        made: object = NgCall(kamailio, ng_a, ng_x, call_id, kinds=("audio",))
                        assert isinstance(made, NgCall)
                        relays = relay_ports_of_call(made.caller_relays + made.callee_relays)
                        ng_ports_seen |= {relay.port for relay in relays}
                    else:
                        port, counter = counter, (start if counter >= end else counter + 4)
                        body = set_command("S", str(lrkp_a.endpoint.ip), str(INTERNAL_IP),
                                           str(INTERNAL_IP), str(lrkp_b.endpoint.ip),
                                           lrkp_a.endpoint.port, port, port + 2,
                                           lrkp_b.endpoint.port, call_id)  # fmt: skip
                        reply = stand_in.command(body, CONTROL)
                        assert reply is not None
                        if reply != body + b"OK":
                            # Kamailio's counter landed on ports the node gave an ng call.
                            assert reply.startswith(b"E relay-port "), reply
                            assert b"held by ng call" in reply, reply
                            refused += 1
                            # ...and the ng call holding them relays as before.
                            owner = reply.split(b"held by ng call '")[1].split(b"'")[0]
                            _relays_both_ways(live[owner.decode()][2], ng_a, ng_x, lrkp_a, lrkp_b)
                            continue
                        made = (Endpoint(INTERNAL_IP, port + 2), Endpoint(INTERNAL_IP, port))
                        relays = relay_ports_of_call(list(made))
                    for other, (_protocol, held, _made) in live.items():
                        assert not relays & held, (call_id, other, relays & held)
                    live[call_id] = (protocol, relays, made)
                    order[protocol].append(call_id)
                    if len(order[protocol]) > WINDOW:
                        _end(live, order[protocol].pop(0), kamailio, stand_in)
                        # The other protocol's calls, oldest and newest, still relay.
                        others = order["lrkproxy" if protocol == "ng" else "ng"]
                        for other in {others[0], others[-1]} if others else set():
                            _relays_both_ways(live[other][2], ng_a, ng_x, lrkp_a, lrkp_b)
            print(f"{ROUNDS} rounds: {refused} lrkproxy S refused (landed on ng ports); "
                  f"ng used {len(ng_ports_seen)} of {SMALL_PORTS[1] - SMALL_PORTS[0] + 1} "
                  "ports")  # fmt: skip
            # ng wrapped the range (it allocated every pair at least once) and the node holds
            # exactly the calls the test left live.
            assert len(ng_ports_seen) >= SMALL_PORTS[1] - SMALL_PORTS[0] + 1 - 4 * WINDOW
            code, text, err = ctl(lab, "sessions", "--json")
            assert code == 0, err
            assert {json.loads(line)["call_id"] for line in text.splitlines()} == set(live)
            for call_id in list(live):
                _end(live, call_id, kamailio, stand_in)
            assert "internal error" not in node.output()
        finally:
            stand_in.close()


def _end(
    live: dict[str, tuple[str, set[Endpoint], object]],
    call_id: str,
    kamailio: UdpNgPeer,
    stand_in: Controller,
) -> None:
    protocol, _relays, made = live.pop(call_id)
    if protocol == "ng":
        assert isinstance(made, NgCall)
        made.delete()
    else:
        assert isinstance(made, tuple)
        body = b"D" + b" " * 8 + f" 60 {call_id} ".encode()
        assert stand_in.command(body, CONTROL) == body + b"OK"


def _relays_both_ways(made: object, ng_a: Party, ng_x: Party, lrkp_a: Party, lrkp_b: Party) -> None:
    if isinstance(made, NgCall):
        to_callee, to_caller = made.caller_relays[0], made.callee_relays[0]
        burst(ng_a, to_callee, ng_x, to_caller, 1, b"ng")
        burst(ng_x, to_caller, ng_a, to_callee, 1, b"ng-back")
    else:
        assert isinstance(made, tuple)
        to_callee, to_caller = made
        burst(lrkp_a, to_callee, lrkp_b, to_caller, 1, b"lrkp")
        burst(lrkp_b, to_caller, lrkp_a, to_callee, 1, b"lrkp-back")


# -- hostile ng datagrams with a live ng call ----------------------------------------------

LIVE_ID = "live-ng@lab"
EXAMPLES = int(os.environ.get("LRKP_FUZZ_EXAMPLES", "150"))
CALL_IDS = ["other@lab", "", "x" * 200, "c" * 128, "a b", "\\x00", "fuzz@lab"]
SDPS = [
    "v=0\r\no=- 1 1 IN IP4 10.201.1.10\r\ns=-\r\nc=IN IP4 10.201.1.10\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 0\r\n",
    "v=0\r\nc=IN IP6 ::1\r\nm=audio 4000 RTP/SAVP 0\r\n",
    "garbage",
    "v=0\r\nm=audio 99999 RTP/AVP 0\r\n",
]
atom: st.SearchStrategy[Encodable] = st.one_of(
    st.sampled_from(["offer", "answer", "delete", "query", "list", "ping", "statistics",
                     "play media", "internal", "external", "IP4", "10.201.1.10", "remove",
                     "force", *CALL_IDS, *SDPS]),
    st.binary(max_size=24),
    st.integers(-5, 70000),
)  # fmt: skip
value: st.SearchStrategy[Encodable] = st.recursive(
    atom, lambda inner: st.lists(inner, max_size=4), max_leaves=6
)
keys = st.sampled_from(["command", "call-id", "from-tag", "to-tag", "sdp", "flags", "replace",
                        "direction", "received-from", "ICE", "delete-delay", "rtcp-mux",
                        "transport-protocol", "via-branch", "label", "supports", "limit",
                        "media-address", "SDES", "garbage"])  # fmt: skip
message = st.dictionaries(keys, value, max_size=8)
cookie = st.sampled_from([b"1_1_1", b"k_2", b"x", b"", b"a" * 70, b"9_9_9"])
ng_datagram = st.one_of(
    st.builds(lambda c, m: c + b" " + encode(m), cookie, message),
    st.builds(lambda c, m: c + b" " + encode(m)[: len(encode(m)) // 2], cookie, message),
    st.binary(max_size=300),
    st.builds(lambda c: c + b' {"command": "offer"}', cookie),
)


def harmless(data: bytes) -> bool:
    """Names not the live call: a delete of it would rightly end it."""
    return LIVE_ID.encode() not in data


def test_fuzzed_ng_socket_leaves_the_live_ng_call_untouched(
    lab: Lab, node: Node, kamailio: UdpNgPeer, peers: Peers
) -> None:
    caller, callee = peers("a", 4300), peers("x", 6300)
    call = NgCall(kamailio, caller, callee, LIVE_ID, kinds=("audio",))
    to_callee, to_caller = call.caller_relays[0], call.callee_relays[0]
    streams = [Stream(caller, to_callee, callee, b"A").start(),
               Stream(callee, to_caller, caller, b"B").start()]  # fmt: skip
    rss_before = rss_kib(node.proc.pid)
    fuzzer = lab.udp_socket("sip", KAMAILIO_IP, 0)
    fuzzer.setblocking(False)
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.lists(ng_datagram.filter(harmless), min_size=1, max_size=40))
    def fuzz(batch: list[bytes]) -> None:
        nonlocal sent
        for data in batch:
            fuzzer.sendto(data, NG)
            sent += 1
        time.sleep(0.005)
        while True:
            try:
                fuzzer.recv(65535)
            except BlockingIOError:
                break

    try:
        fuzz()
    finally:
        fuzzer.close()
    assert kamailio.request({"command": "ping"}) == {"result": "pong"}
    for stream in streams:
        stream.stop()
        assert stream.lost() == [] and stream.foreign == [], stream.tag
    assert node.proc.poll() is None
    assert rss_kib(node.proc.pid) - rss_before < 48 * 1024  # the caches' budgets, and slack
    assert sent >= EXAMPLES
    log_lines = node.output().count("\n")
    assert log_lines < 400, f"{log_lines} log lines for {sent} datagrams"
    assert "internal error" not in node.output()
    live = kamailio.request({"command": "query", "call-id": LIVE_ID})
    assert live["result"] == "ok" and live["totals"]["RTP"]["packets"] > 0
    call.delete()


def test_an_ng_socket_on_a_vip_binds_before_the_vip_arrives(lab: Lab) -> None:
    """Pair mode's case (relay_ips_may_appear_later, which a pair implies): the ng socket on
    an address this host does not have yet is bound with IP_FREEBIND like `control`, and
    answers once the address arrives."""
    vip = "10.201.1.98"
    args = ("--internal-ip", vip, "--external-ip", str(EXTERNAL_IP), "--ports", "20000-21999",
            "--control", f"udp:{vip}:22333", "--ng", f"udp:{vip}", "--allow", KAMAILIO_IP,
            "--relay-ips-may-appear-later", "--flush-on-exit")  # fmt: skip
    node = Node(lab, "relay", *args)
    try:
        deadline = time.monotonic() + 15
        while "node up" not in node.output():
            assert node.proc.poll() is None and time.monotonic() < deadline, node.output()
            time.sleep(0.05)
        assert f"ng: listening on udp:{vip}:2223" in node.output()
        lab.run("relay", "ip", "addr", "add", f"{vip}/24", "dev", "int0")
        with kamailio_ng(lab, "vip", (vip, 2223), 0.5) as peer:
            pong = None
            while pong is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    pong = peer.request({"command": "ping"})
            assert pong == {"result": "pong"}
    finally:
        node.close()
        lab.run("relay", "ip", "addr", "del", f"{vip}/24", "dev", "int0", check=False)


def test_the_allow_list_applies_to_the_ng_socket(lab: Lab, node: Node) -> None:
    """A sender not on `allow` gets nothing, whatever it sends; Kamailio's address does."""
    stranger = UdpNgPeer("stranger", lab.udp_socket("a", "10.201.1.10", 0), NG, 0.5)
    try:
        with pytest.raises(TimeoutError):
            stranger.request({"command": "ping"})
    finally:
        stranger.close()
    assert "not in the allow list" in node.output()
