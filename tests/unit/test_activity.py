"""Media activity from kernel events: live while any stream has an entry, quiet from when."""

from __future__ import annotations

from ipaddress import IPv4Address

from lrkp_tsl.activity import Activity
from lrkp_tsl.kernel import StreamChange, StreamKey
from lrkp_tsl.media import Endpoint

RTP: StreamKey = (Endpoint(IPv4Address("10.0.0.1"), 4000), Endpoint(IPv4Address("10.0.0.9"), 20002))
RTCP: StreamKey = (RTP[0].offset(1), RTP[1].offset(1))


def test_a_call_is_live_while_any_stream_has_an_entry() -> None:
    activity = Activity()
    activity.quiet("c", 0.0)
    assert activity.on_event("c", StreamChange.STARTED, RTP, 1.0, 60) is True
    assert activity.on_event("c", StreamChange.STARTED, RTCP, 1.5, 60) is False
    assert activity.quiet_since("c") is None
    assert activity.on_event("c", StreamChange.EXPIRED, RTP, 100.0, 60) is False  # on hold
    assert activity.on_event("c", StreamChange.EXPIRED, RTCP, 200.0, 60) is True
    assert activity.quiet_since("c") == 140.0  # silent for the whole timeout already


def test_a_removed_entry_makes_a_call_quiet_from_now() -> None:
    activity = Activity()
    activity.live("c", {RTP})
    assert activity.on_event("c", StreamChange.REMOVED, RTP, 50.0, 60) is True
    assert activity.quiet_since("c") == 50.0


def test_events_for_unknown_streams_change_nothing() -> None:
    activity = Activity()
    activity.quiet("c", 3.0)
    assert activity.on_event("c", StreamChange.EXPIRED, RTP, 9.0, 60) is False
    assert activity.quiet_since("c") == 3.0
    activity.drop("c")
    assert "c" not in activity
