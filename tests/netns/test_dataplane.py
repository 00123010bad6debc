"""The kernel fast path, for real: nftables maps + conntrack in the lab's relay namespace."""

from __future__ import annotations

import select
from ipaddress import IPv4Address

import pytest

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.parties import PORTS, SILENCE, WAIT, Party, Peers
from lrkp_tsl.dataplane import DataPlane, fixed_view
from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import CallMedia, Endpoint


def call(
    call_id: str, caller: Party, callee: Party, caller_relay: Endpoint, callee_relay: Endpoint
) -> CallMedia:
    return CallMedia(call_id, caller.endpoint, caller_relay, callee.endpoint, callee_relay)


def exchange(caller: Party, callee: Party, media: CallMedia, tag: bytes) -> None:
    """One packet each way; each party must receive from the relay endpoint it sends to."""
    caller.send(media.caller_relay, b"A>" + tag)
    assert callee.expect(b"A>" + tag) == media.callee_relay
    callee.send(media.callee_relay, b"B>" + tag)
    assert caller.expect(b"B>" + tag) == media.caller_relay


def rtcp_parties(peers: Peers, caller: Party, callee: Party) -> tuple[Party, Party]:
    return (
        peers(caller.host, caller.endpoint.port + 1, caller.endpoint.ip),
        peers(callee.host, callee.endpoint.port + 1, callee.endpoint.ip),
    )


@pytest.mark.parametrize("first", ["caller", "callee"])
def test_rtp_and_rtcp_both_ways(dataplane: DataPlane, peers: Peers, first: str) -> None:
    caller, callee = peers("a", 4000), peers("b", 6000)
    caller_rtcp, callee_rtcp = rtcp_parties(peers, caller, callee)
    media = call(
        "rtp-both@lab", caller, callee, Endpoint(INTERNAL_IP, 20002), Endpoint(INTERNAL_IP, 20000)
    )
    dataplane.commit(media)
    rtcp = CallMedia(
        media.call_id,
        caller_rtcp.endpoint,
        media.caller_relay.offset(1),
        callee_rtcp.endpoint,
        media.callee_relay.offset(1),
    )
    for index in range(3):
        tag = b"%d" % index
        if first == "caller":
            exchange(caller, callee, media, tag)
            exchange(caller_rtcp, callee_rtcp, rtcp, tag)
        else:
            callee.send(media.callee_relay, b"B>" + tag)
            assert caller.expect(b"B>" + tag) == media.caller_relay
            caller.send(media.caller_relay, b"A>" + tag)
            assert callee.expect(b"A>" + tag) == media.callee_relay
            callee_rtcp.send(rtcp.callee_relay, b"b>" + tag)
            assert caller_rtcp.expect(b"b>" + tag) == rtcp.caller_relay


def test_relayed_in_kernel_with_nat_in_conntrack(dataplane: DataPlane, peers: Peers) -> None:
    caller, callee = peers("a", 4100), peers("b", 6100)
    media = call(
        "ct@lab", caller, callee, Endpoint(INTERNAL_IP, 20102), Endpoint(INTERNAL_IP, 20100)
    )
    dataplane.commit(media)
    exchange(caller, callee, media, b"x")
    exchange(caller, callee, media, b"y")
    entries = dataplane.conntrack.entries_to(media.caller_relay)
    assert len(entries) == 1
    entry = entries[0]
    assert (entry.orig_src, entry.orig_dst) == (caller.endpoint, media.caller_relay)
    assert (entry.reply_src, entry.reply_dst) == (callee.endpoint, media.callee_relay)
    assert (entry.packets_orig, entry.packets_reply) == (2, 2)


def test_internal_to_external(dataplane: DataPlane, peers: Peers) -> None:
    caller, callee = peers("a", 4200), peers("x", 6200)
    media = call(
        "bridge@lab", caller, callee, Endpoint(INTERNAL_IP, 20202), Endpoint(EXTERNAL_IP, 20200)
    )
    dataplane.commit(media)
    exchange(caller, callee, media, b"1")
    # and the other way round: an external caller, an internal callee
    caller2, callee2 = peers("x", 4300), peers("b", 6300)
    media2 = call(
        "bridge2@lab", caller2, callee2, Endpoint(EXTERNAL_IP, 20302), Endpoint(INTERNAL_IP, 20300)
    )
    dataplane.commit(media2)
    exchange(caller2, callee2, media2, b"2")


def test_shared_port_mode(dataplane: DataPlane, peers: Peers) -> None:
    caller, callee = peers("a", 4400), peers("b", 6400)
    relay = Endpoint(INTERNAL_IP, 20400)
    media = call("gt1@lab", caller, callee, relay, relay)
    assert media.shared_port
    dataplane.commit(media)
    exchange(caller, callee, media, b"1")
    exchange(caller, callee, media, b"2")


def test_shared_port_mode_both_parties_on_one_ip(dataplane: DataPlane, peers: Peers) -> None:
    caller, callee = peers("a", 4500), peers("a", 6500)
    relay = Endpoint(INTERNAL_IP, 20500)
    media = call("gt1-same-ip@lab", caller, callee, relay, relay)
    dataplane.commit(media)
    for tag in (b"1", b"2", b"3"):
        exchange(caller, callee, media, tag)
    callee.expect_nothing()
    caller.expect_nothing()


def test_remove_stops_relaying_at_once(dataplane: DataPlane, peers: Peers) -> None:
    caller, callee = peers("a", 4600), peers("b", 6600)
    media = call(
        "remove@lab", caller, callee, Endpoint(INTERNAL_IP, 20602), Endpoint(INTERNAL_IP, 20600)
    )
    dataplane.commit(media)
    exchange(caller, callee, media, b"live")
    assert dataplane.conntrack.entries_to(media.caller_relay)
    dataplane.remove_call(media)
    assert dataplane.conntrack.entries_to(media.caller_relay) == []
    assert dataplane.conntrack.entries_to(media.callee_relay) == []
    caller.send(media.caller_relay, b"after")
    callee.expect_nothing()
    callee.send(media.callee_relay, b"after")
    caller.expect_nothing()
    assert dataplane.nft.flow_keys() == []


def test_packet_to_relay_port_without_call_is_dropped_in_kernel(
    dataplane: DataPlane, lab: Lab, peers: Peers
) -> None:
    # Delivered to a port no socket holds, a packet draws an ICMP port unreachable (a
    # connected sender sees ECONNREFUSED): none coming back proves it was dropped before
    # delivery, and the guard counter that the kernel dropped it before any socket or the
    # queue saw it. (A local socket on a relay port gets its own traffic: test_colocate.py.)
    stranger = peers("a", 4700)
    stranger.sock.connect((str(INTERNAL_IP), 21000))
    before = dataplane.nft.counter_packets("unknown_dropped")
    for _ in range(5):
        stranger.sock.send(b"nobody")
    assert not select.select([stranger.sock], [], [], SILENCE)[0]
    assert dataplane.nft.counter_packets("unknown_dropped") == before + 5
    # Outside the relay port range the node does not interfere: a closed port answers (so
    # the silence above is the guard's), an open one gets its packet.
    stranger.sock.connect((str(INTERNAL_IP), 19998))
    stranger.sock.send(b"closed")
    assert select.select([stranger.sock], [], [], WAIT)[0]
    with pytest.raises(ConnectionRefusedError):
        stranger.sock.recv(100)
    outside, sender = peers("relay", 19999, INTERNAL_IP), peers("a", 4701)
    sender.send(outside.endpoint, b"not ours")
    assert outside.expect(b"not ours") == sender.endpoint


def test_stranger_on_a_live_call_port_is_dropped(dataplane: DataPlane, peers: Peers) -> None:
    caller, callee, stranger = peers("a", 4800), peers("x", 6800), peers("m", 4800)
    media = call(
        "stranger@lab", caller, callee, Endpoint(INTERNAL_IP, 20802), Endpoint(EXTERNAL_IP, 20800)
    )
    dataplane.commit(media)
    before = dataplane.nft.counter_packets("unknown_dropped")
    stranger.send(media.callee_relay, b"inject")
    caller.expect_nothing()
    assert dataplane.nft.counter_packets("unknown_dropped") == before + 1
    exchange(caller, callee, media, b"ok")


def test_recommit_moves_the_stream_to_the_new_target(dataplane: DataPlane, peers: Peers) -> None:
    """183 then 200 with another callee port: the live stream follows the new answer."""
    caller, early, final = peers("a", 4900), peers("b", 6900), peers("b", 6950)
    relay_a, relay_b = Endpoint(INTERNAL_IP, 20902), Endpoint(INTERNAL_IP, 20900)
    first = call("recommit@lab", caller, early, relay_a, relay_b)
    dataplane.commit(first)
    exchange(caller, early, first, b"early")
    second = call("recommit@lab", caller, final, relay_a, relay_b)
    dataplane.commit(second, previous=first)
    exchange(caller, final, second, b"final")
    early.expect_nothing()
    assert [e.reply_src for e in dataplane.conntrack.entries_to(relay_a)] == [final.endpoint]


def test_commit_conflicting_with_another_call_is_refused(
    dataplane: DataPlane, peers: Peers
) -> None:
    caller, callee = peers("a", 5000), peers("b", 7000)
    media = call(
        "first@lab", caller, callee, Endpoint(INTERNAL_IP, 21002), Endpoint(INTERNAL_IP, 21000)
    )
    dataplane.commit(media)
    other = CallMedia(
        "second@lab",
        caller.endpoint,
        media.caller_relay,
        Endpoint(IPv4Address("10.201.1.11"), 7100),
        media.callee_relay,
    )
    with pytest.raises(KernelError, match="second@lab"):
        dataplane.commit(other)
    exchange(caller, callee, media, b"unharmed")


def test_reload_keeps_live_calls(dataplane: DataPlane, lab: Lab, peers: Peers) -> None:
    caller, callee = peers("a", 5100), peers("b", 7100)
    media = call(
        "reload@lab", caller, callee, Endpoint(INTERNAL_IP, 21102), Endpoint(INTERNAL_IP, 21100)
    )
    dataplane.commit(media)
    exchange(caller, callee, media, b"before")
    with lab.inside("relay"):
        restarted = DataPlane()
        restarted.start([INTERNAL_IP, EXTERNAL_IP], PORTS, 60)
    restarted.close()
    exchange(caller, callee, media, b"after")
    assert dataplane.nft.listing().count("jump relay_port") == 1


def test_shutdown_keeps_or_flushes(dataplane: DataPlane, lab: Lab, peers: Peers) -> None:
    caller, callee = peers("a", 5200), peers("b", 7200)
    media = call(
        "shutdown@lab", caller, callee, Endpoint(INTERNAL_IP, 21202), Endpoint(INTERNAL_IP, 21200)
    )
    dataplane.commit(media)
    exchange(caller, callee, media, b"before")
    with lab.inside("relay"):
        keeper = DataPlane()
    keeper.shutdown(flush=False)
    assert dataplane.nft.exists()
    exchange(caller, callee, media, b"kept")
    with lab.inside("relay"):
        flusher = DataPlane()
    flusher.shutdown(flush=True)
    assert not dataplane.nft.exists()
    assert dataplane.conntrack.entries_to(media.caller_relay) == []
    caller.send(media.caller_relay, b"gone")
    callee.expect_nothing()


def test_ten_thousand_calls_commit_and_remove(dataplane: DataPlane) -> None:
    calls = []
    caller_ip, callee_ip = IPv4Address("10.201.1.10"), IPv4Address("10.201.2.10")
    for index in range(10_000):
        relay_port = PORTS.start + 4 * index
        calls.append(
            CallMedia(
                f"call-{index}@scale",
                Endpoint(caller_ip, 2000 + 2 * (index % 30000)),
                Endpoint(INTERNAL_IP, relay_port + 2),
                Endpoint(callee_ip, 2000 + 2 * (index % 30000)),
                Endpoint(EXTERNAL_IP, relay_port),
            )
        )
    for media in calls:
        dataplane.commit(media)
    listing = dataplane.nft.listing()
    assert listing.count('comment "call-') == 10_000 * 4 * 2
    for index in (0, 4999, 9999):
        assert f'comment "call-{index}@scale"' in listing
    assert len(dataplane.nft.flow_keys()) == 40_000
    for media in calls:
        dataplane.remove_call(media)
    assert dataplane.nft.flow_keys() == []


def test_the_idle_timeout_policy_follows_the_config(lab: Lab, dataplane: DataPlane) -> None:
    """Read over netlink (libnftables would list every element first); replaced only when
    the configured value changes."""
    assert dataplane.nft.idle_policy() == 60
    with lab.inside("relay"):
        dataplane.nft.load([INTERNAL_IP, EXTERNAL_IP], PORTS, 45)
    assert dataplane.nft.idle_policy() == 45
    listing = lab.run("relay", "nft", "list", "ct", "timeout", "ip", "lrkp", "relay_idle").stdout
    assert "unreplied : 45, replied : 45" in listing


def test_repair_puts_a_call_back_whole_over_whatever_its_keys_hold(
    lab: Lab, dataplane: DataPlane, peers: Peers
) -> None:
    """What the startup comparison does with a call an inconsistent read saw only in part:
    its keys are deleted and its view added in one transaction, right whether each element
    was there as it should be, there with another target, or gone."""
    caller, callee = peers("a", 4900), peers("b", 6900)
    media = call(
        "repair@lab", caller, callee, Endpoint(INTERNAL_IP, 20902), Endpoint(INTERNAL_IP, 20900)
    )
    dataplane.commit(media)
    view = fixed_view(media)
    flows = sorted(view.flows, key=lambda f: (f.relay.port, str(f.sender)))
    wrong, gone = flows[0], flows[1]
    key = f"{wrong.sender.ip} . {wrong.sender.port} . {wrong.relay.ip} . {wrong.relay.port}"
    lab.run("relay", "nft", "delete", "element", "ip", "lrkp", "dnat_to", f"{{ {key} }}")
    lab.run("relay", "nft", "add", "element", "ip", "lrkp", "dnat_to",
            f"{{ {key} : 10.201.1.66 . 9 }}")  # fmt: skip
    gone_key = f"{gone.sender.ip} . {gone.sender.port} . {gone.relay.ip} . {gone.relay.port}"
    for name in ("dnat_to", "snat_to"):
        lab.run("relay", "nft", "delete", "element", "ip", "lrkp", name, f"{{ {gone_key} }}")
    keys = frozenset((f.sender, f.relay) for f in view.flows)
    with lab.inside("relay"):
        assert dataplane.repair([("repair@lab", keys, frozenset(), view)]) == [None]
        found = {(f.sender, f.relay, f.target, f.relay_out) for f in dataplane.state().flows}
    assert found == {(f.sender, f.relay, f.target, f.relay_out) for f in view.flows}
    exchange(caller, callee, media, b"after repair")
