from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from lrkp_tsl.latching import Policy, Rule
from lrkp_tsl.media import CallMedia, Endpoint, Flow, InstalledFlow, Stream
from lrkp_tsl.session import (
    EMPTY,
    Action,
    CallTable,
    KernelView,
    PacketEvent,
    Reason,
    Sync,
    Verdict,
    rebuild,
)

ROUTED = [IPv4Network("10.0.0.0/24"), IPv4Network("10.0.1.0/24")]


def ep(text: str) -> Endpoint:
    ip, port = text.split(":")
    return Endpoint(IPv4Address(ip), int(port))


def media(
    call_id: str, relay_port: int = 20000, callee_port: int = 6000, caller: str = "10.0.0.21:4000"
) -> CallMedia:
    return CallMedia(
        call_id,
        ep(caller),
        ep(f"10.0.0.10:{relay_port + 2}"),
        ep(f"10.0.1.31:{callee_port}"),
        ep(f"10.0.0.10:{relay_port}"),
    )


def apply(table: CallTable, actions: list[Action], now: float = 0) -> list[Action]:
    for action in actions:
        table.applied(action)
    return actions


def never_silent(sender: Endpoint, relay: Endpoint) -> bool:
    return False


def always_silent(sender: Endpoint, relay: Endpoint) -> bool:
    return True


def strict_table(max_lifetime: float = 3600) -> CallTable:
    return CallTable(max_lifetime, Policy.STRICT)


def test_new_call_installs_the_sdp_flows_and_identical_set_is_noop() -> None:
    table = strict_table()
    first = media("c1")
    [sync] = apply(table, table.on_set(first, 60, 0), 0)
    assert (sync.call_id, sync.before, sync.reason) == ("c1", EMPTY, Reason.RELAYING)
    assert sync.after == KernelView(frozenset(first.flows()), frozenset())
    assert table.on_set(first, 60, 1) == []
    assert table.owner(ep("10.0.0.10:20003")) == "c1"


def test_answer_update_moves_call_in_place() -> None:
    table = strict_table()
    early, final = media("c1"), media("c1", callee_port=6100)
    apply(table, table.on_set(early, 60, 0), 0)
    [sync] = table.on_set(final, 60, 5)
    assert sync.reason is Reason.UPDATED
    assert sync.before.flows == frozenset(early.flows())
    assert sync.after.flows == frozenset(final.flows())
    apply(table, [sync], 5)
    call = table.get("c1")
    assert call is not None and call.media == final and call.started == 0
    assert len(table) == 1


def test_relay_ports_of_another_call_replace_it_newest_wins() -> None:
    table = strict_table()
    old, new = media("old"), media("new")
    apply(table, table.on_set(old, 60, 0), 0)
    actions = table.on_set(new, 60, 1)
    assert actions[0] == Sync(
        "old", KernelView(frozenset(old.flows())), None, Reason.REPLACED, "'new'"
    )
    assert actions[0].describe() == "relay ports reassigned to call 'new' (newest wins)"
    assert actions[0].after == EMPTY
    assert actions[1].reason is Reason.RELAYING
    apply(table, actions, 1)
    assert "old" not in table and table.owner(ep("10.0.0.10:20000")) == "new"


def test_moving_a_call_releases_its_old_relay_ports() -> None:
    table = strict_table()
    apply(table, table.on_set(media("c1", relay_port=20000), 60, 0), 0)
    apply(table, table.on_set(media("c1", relay_port=20100), 60, 1), 1)
    assert table.owner(ep("10.0.0.10:20000")) is None
    assert table.owner(ep("10.0.0.10:20100")) == "c1"


def test_delete_removes_and_unknown_delete_is_noop() -> None:
    table = strict_table()
    apply(table, table.on_set(media("c1"), 60, 0), 0)
    assert table.on_delete("nope") == []
    [sync] = apply(table, table.on_delete("c1"), 1)
    assert sync.reason is Reason.DELETED and sync.after == EMPTY
    assert sync.describe() == "deleted by the controlling layer (D)"
    assert len(table) == 0 and table.owner(ep("10.0.0.10:20000")) is None


def test_expire_removes_a_call_with_the_engines_reason() -> None:
    table = strict_table()
    apply(table, table.on_set(media("c1"), 60, 0), 0)
    [sync] = table.on_expire("c1", Reason.IDLE, "60 s")
    assert sync.after == EMPTY and sync.describe() == "no media for 60 s"
    assert table.on_expire("unknown", Reason.IDLE) == []


# -- latching -----------------------------------------------------------------------------

NATED = media("nat", caller="192.168.1.20:4000")  # the caller's SDP: a private LAN
CALLER_RELAY, CALLEE_RELAY = NATED.caller_relay, NATED.callee_relay
NAT_RTP, NAT_RTCP = ep("10.0.0.99:55316"), ep("10.0.0.99:41234")  # remapped, not +1


def auto_table() -> CallTable:
    table = CallTable(3600, Policy.AUTO, ROUTED)
    apply(table, table.on_set(NATED, 60, 0), 0)
    return table


def test_auto_trusts_a_reachable_sdp_address_and_learns_an_unreachable_one() -> None:
    table = auto_table()
    call = table.get("nat")
    assert call is not None
    assert [(leg.rule, leg.latched) for leg in call.caller] == [(Rule.ANYWHERE, None)] * 2
    assert [(leg.rule, leg.latched) for leg in call.callee] == [
        (Rule.SAME_IP, ep("10.0.1.31:6000")),
        (Rule.SAME_IP, ep("10.0.1.31:6001")),
    ]
    view = call.view()
    assert view.flows == frozenset()  # no stream has both ends yet
    assert view.learning == NATED.relay_endpoints()


def test_first_packet_from_the_nat_latches_and_is_accepted() -> None:
    table = auto_table()
    decision = table.on_packet(NAT_RTP, CALLER_RELAY, never_silent)
    assert (decision.verdict, decision.event) == (Verdict.ACCEPT, PacketEvent.LEARNED)
    [sync] = apply(table, decision.actions, 1)
    assert sync.after.flows == {
        Flow(Stream.RTP, NAT_RTP, CALLER_RELAY, ep("10.0.1.31:6000"), CALLEE_RELAY),
        Flow(Stream.RTP, ep("10.0.1.31:6000"), CALLEE_RELAY, NAT_RTP, CALLER_RELAY),
    }
    # RTCP is learned on its own: the NAT gave it an unrelated port.
    rtcp = table.on_packet(NAT_RTCP, CALLER_RELAY.offset(1), never_silent)
    assert (rtcp.verdict, rtcp.event) == (Verdict.ACCEPT, PacketEvent.LEARNED)
    [sync] = apply(table, rtcp.actions, 2)
    assert len(sync.after.flows) == 4
    assert (
        Flow(
            Stream.RTCP,
            NAT_RTCP,
            CALLER_RELAY.offset(1),
            ep("10.0.1.31:6001"),
            CALLEE_RELAY.offset(1),
        )
        in sync.after.flows
    )


def test_callee_sending_first_is_held_until_the_caller_is_known() -> None:
    table = auto_table()
    decision = table.on_packet(ep("10.0.1.31:6000"), CALLEE_RELAY, never_silent)
    assert (decision.verdict, decision.actions, decision.event) == (
        Verdict.HOLD,
        [],
        PacketEvent.HELD,
    )


def test_a_stranger_cannot_take_a_reachable_partys_place() -> None:
    table = auto_table()
    decision = table.on_packet(ep("10.0.0.66:6000"), CALLEE_RELAY, always_silent)
    assert (decision.verdict, decision.event) == (Verdict.DROP, PacketEvent.STRANGER)
    # The same IP on another port is the party behind a port-remapping NAT: learned.
    decision = table.on_packet(ep("10.0.1.31:7777"), CALLEE_RELAY, always_silent)
    assert decision.event == PacketEvent.RELEARNED


def test_latched_leg_is_relearned_only_after_silence() -> None:
    table = auto_table()
    apply(table, table.on_packet(NAT_RTP, CALLER_RELAY, never_silent).actions, 1)
    rebound = ep("10.0.0.99:60000")
    busy = table.on_packet(rebound, CALLER_RELAY, never_silent)
    assert (busy.verdict, busy.event) == (Verdict.DROP, PacketEvent.STRANGER)
    quiet = table.on_packet(rebound, CALLER_RELAY, always_silent)
    assert (quiet.verdict, quiet.event) == (Verdict.ACCEPT, PacketEvent.RELEARNED)
    [sync] = quiet.actions
    assert {f.sender for f in sync.after.flows} == {rebound, ep("10.0.1.31:6000")}
    assert NAT_RTP in {f.sender for f in sync.before.flows}


def test_strict_and_ip_policies() -> None:
    strict = CallTable(3600, Policy.STRICT, ROUTED)
    apply(strict, strict.on_set(NATED, 60, 0), 0)
    assert strict.get("nat").view().learning == frozenset()  # type: ignore[union-attr]
    by_ip = CallTable(3600, Policy.IP, ROUTED)
    apply(by_ip, by_ip.on_set(NATED, 60, 0), 0)
    assert by_ip.on_packet(NAT_RTP, CALLER_RELAY, never_silent).event == PacketEvent.STRANGER
    same_ip = ep("192.168.1.20:5555")
    assert by_ip.on_packet(same_ip, CALLER_RELAY, never_silent).event == PacketEvent.LEARNED


def test_shared_port_learns_both_parties_on_one_relay_port() -> None:
    relay = ep("10.0.0.10:20000")
    shared = CallMedia("gt1", ep("192.168.1.20:4000"), relay, ep("192.168.7.7:6000"), relay)
    table = CallTable(3600, Policy.ANY, ROUTED)
    apply(table, table.on_set(shared, 60, 0), 0)
    first = table.on_packet(ep("10.0.0.99:1000"), relay, never_silent)
    assert (first.verdict, first.event) == (Verdict.HOLD, PacketEvent.LEARNED)
    apply(table, first.actions, 1)
    second = table.on_packet(ep("10.0.0.99:2000"), relay, never_silent)
    assert (second.verdict, second.event) == (Verdict.ACCEPT, PacketEvent.LEARNED)
    [sync] = apply(table, second.actions, 2)
    assert {(f.sender, f.target) for f in sync.after.flows} == {
        (ep("10.0.0.99:1000"), ep("10.0.0.99:2000")),
        (ep("10.0.0.99:2000"), ep("10.0.0.99:1000")),
    }


def test_packet_for_no_call_is_dropped() -> None:
    table = auto_table()
    decision = table.on_packet(NAT_RTP, ep("10.0.0.10:30000"), never_silent)
    assert (decision.verdict, decision.event) == (Verdict.DROP, PacketEvent.NO_CALL)


# -- re-adoption --------------------------------------------------------------------------


def installed(flows: frozenset[Flow] | tuple[Flow, ...], comment: str) -> list[InstalledFlow]:
    return [InstalledFlow(comment, f.sender, f.relay, f.target, f.relay_out) for f in flows]


def test_rebuild_calls_from_kernel_flows_including_learned_ones() -> None:
    table = auto_table()
    apply(table, table.on_packet(NAT_RTP, CALLER_RELAY, never_silent).actions, 1)
    apply(table, table.on_packet(NAT_RTCP, CALLER_RELAY.offset(1), never_silent).actions, 1)
    learned = table.get("nat").view().flows  # type: ignore[union-attr]
    relay = ep("10.0.0.10:20100")
    shared = CallMedia("gt1", ep("10.0.0.21:4000"), relay, ep("10.0.0.21:6000"), relay)
    calls, orphans = rebuild([*installed(learned, "nat"), *installed(shared.flows(), "gt1")], 60, 5)
    assert orphans == []
    by_id = {call.call_id: call for call in calls}
    assert by_id["nat"].view() == KernelView(learned, frozenset())
    assert by_id["gt1"].view() == KernelView(frozenset(shared.flows()), frozenset())


def test_rebuild_returns_incomplete_or_ambiguous_groups_as_orphans() -> None:
    broken = installed(media("c1").flows(), "c1")
    broken[0] = InstalledFlow("c1", broken[0].sender, broken[0].relay, None, broken[0].relay_out)
    mixed = installed(media("a", relay_port=20200).flows(), "same") + installed(
        media("b", relay_port=20300).flows(), "same"
    )
    ok = installed(media("ok", relay_port=20400).flows(), "ok")
    calls, orphans = rebuild([*broken, *mixed, *ok], 60, 0)
    assert [c.call_id for c in calls] == ["ok"]
    assert len(orphans) == 4 + 8
