from __future__ import annotations

from ipaddress import IPv4Address

from lrkp_tsl.activity import MediaActivity
from lrkp_tsl.dataplane.conntrack import ConntrackEntry
from lrkp_tsl.media import CallMedia, Endpoint, InstalledFlow
from lrkp_tsl.session import Action, CallTable, Install, Uninstall, adopt


def ep(text: str) -> Endpoint:
    ip, port = text.split(":")
    return Endpoint(IPv4Address(ip), int(port))


def media(call_id: str, relay_port: int = 20000, callee_port: int = 6000) -> CallMedia:
    return CallMedia(
        call_id,
        ep("10.0.0.21:4000"),
        ep(f"10.0.0.10:{relay_port + 2}"),
        ep(f"10.0.1.31:{callee_port}"),
        ep(f"10.0.0.10:{relay_port}"),
    )


def apply(table: CallTable, actions: list[Action], now: float) -> list[Action]:
    for action in actions:
        table.applied(action, now)
    return actions


def test_new_call_installs_and_identical_set_is_noop() -> None:
    table = CallTable(max_lifetime=3600)
    first = media("c1")
    assert apply(table, table.on_set(first, 60), 0) == [Install(first, None, 60)]
    assert table.on_set(first, 60) == []
    assert table.owner(ep("10.0.0.10:20003")) == "c1"


def test_answer_update_moves_call_in_place() -> None:
    table = CallTable(max_lifetime=3600)
    early, final = media("c1"), media("c1", callee_port=6100)
    apply(table, table.on_set(early, 60), 0)
    assert table.on_set(final, 60) == [Install(final, early, 60)]
    apply(table, table.on_set(final, 60), 5)
    call = table.get("c1")
    assert call is not None and call.media == final and call.started == 0
    assert len(table) == 1


def test_relay_ports_of_another_call_replace_it_newest_wins() -> None:
    table = CallTable(max_lifetime=3600)
    old, new = media("old"), media("new")
    apply(table, table.on_set(old, 60), 0)
    actions = table.on_set(new, 60)
    assert actions[0] == Uninstall(old, "relay ports reassigned to call 'new' (newest wins)")
    assert actions[1] == Install(new, None, 60)
    apply(table, actions, 1)
    assert "old" not in table and table.owner(ep("10.0.0.10:20000")) == "new"


def test_moving_a_call_releases_its_old_relay_ports() -> None:
    table = CallTable(max_lifetime=3600)
    apply(table, table.on_set(media("c1", relay_port=20000), 60), 0)
    apply(table, table.on_set(media("c1", relay_port=20100), 60), 1)
    assert table.owner(ep("10.0.0.10:20000")) is None
    assert table.owner(ep("10.0.0.10:20100")) == "c1"


def test_delete_removes_and_unknown_delete_is_noop() -> None:
    table = CallTable(max_lifetime=3600)
    apply(table, table.on_set(media("c1"), 60), 0)
    assert table.on_delete("nope") == []
    assert apply(table, table.on_delete("c1"), 1) == [
        Uninstall(media("c1"), "deleted by the controlling layer (D)")
    ]
    assert len(table) == 0 and table.owner(ep("10.0.0.10:20000")) is None


def test_idle_expiry_is_pushed_back_by_media() -> None:
    table = CallTable(max_lifetime=3600)
    apply(table, table.on_set(media("c1"), 60), 0)
    assert table.next_deadline() == 60
    assert table.on_timer(59.9) == []
    table.on_media("c1", 30)
    assert table.on_timer(60) == []
    assert table.on_timer(90) == [Uninstall(media("c1"), "no media for 60 s")]


def test_maximum_lifetime_bounds_a_busy_call() -> None:
    table = CallTable(max_lifetime=100)
    apply(table, table.on_set(media("c1"), 60), 0)
    for now in range(10, 100, 10):
        table.on_media("c1", now)
        assert table.on_timer(now) == []
    assert table.on_timer(100) == [Uninstall(media("c1"), "reached the maximum lifetime of 100 s")]


def test_media_activity_from_conntrack_counters() -> None:
    table = CallTable(max_lifetime=3600)
    apply(table, table.on_set(media("c1"), 60), 0)
    activity = MediaActivity()

    def entry(packets: int) -> ConntrackEntry:
        return ConntrackEntry(
            ep("10.0.0.21:4000"),
            ep("10.0.0.10:20002"),
            ep("10.0.1.31:6000"),
            ep("10.0.0.10:20000"),
            packets,
            0,
        )

    stranger = ConntrackEntry(
        ep("10.9.9.9:1"), ep("10.0.0.10:30000"), ep("10.0.0.10:30000"), ep("10.9.9.9:1"), 5, 5
    )
    assert activity.observe([entry(3), stranger], table, 10) == 1  # new stream
    assert table.get("c1").last_media == 10  # type: ignore[union-attr]
    assert activity.observe([entry(3)], table, 20) == 0  # counters did not move
    assert table.get("c1").last_media == 10  # type: ignore[union-attr]
    assert activity.observe([entry(4)], table, 30) == 1
    assert table.get("c1").last_media == 30  # type: ignore[union-attr]


def installed(media_: CallMedia, comment: str | None = None) -> list[InstalledFlow]:
    return [
        InstalledFlow(
            media_.call_id if comment is None else comment, f.sender, f.relay, f.target, f.relay_out
        )
        for f in media_.flows()
    ]


def test_adopt_rebuilds_calls_from_kernel_flows() -> None:
    normal = media("c1")
    relay = ep("10.0.0.10:20100")
    shared = CallMedia("gt1", ep("10.0.0.21:4000"), relay, ep("10.0.0.21:6000"), relay)
    calls, orphans = adopt([*installed(normal), *installed(shared)])
    assert orphans == []
    assert {c.call_id for c in calls} == {"c1", "gt1"}
    for call in calls:
        original = normal if call.call_id == "c1" else shared
        assert set(call.flows()) == set(original.flows())


def test_adopt_returns_incomplete_or_ambiguous_groups_as_orphans() -> None:
    broken = installed(media("c1"))
    broken[0] = InstalledFlow("c1", broken[0].sender, broken[0].relay, None, broken[0].relay_out)
    mixed = installed(media("a", relay_port=20200), "same") + installed(
        media("b", relay_port=20300), "same"
    )
    calls, orphans = adopt([*broken, *mixed, *installed(media("ok", relay_port=20400))])
    assert [c.call_id for c in calls] == ["ok"]
    assert len(orphans) == 4 + 8
