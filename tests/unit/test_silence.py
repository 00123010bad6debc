"""The rebinding guard's silence test from conntrack entries (dataplane/silence.py)."""

from __future__ import annotations

from ipaddress import IPv4Address

from lrkp_tsl.dataplane.silence import GUARD, SilenceWatch
from lrkp_tsl.media import ConntrackEntry, Endpoint

IDLE = 60.0
PHONE = Endpoint(IPv4Address("192.0.2.7"), 4000)  # the latched sender
RELAY = Endpoint(IPv4Address("10.0.0.10"), 20002)
PEER = Endpoint(IPv4Address("10.0.1.31"), 6000)
PEER_RELAY = Endpoint(IPv4Address("10.0.0.10"), 20000)


class Conntrack:
    """One stream's entry, as ctnetlink would answer a lookup."""

    def __init__(self, phone_first: bool = True) -> None:
        self.phone_first = phone_first
        self.phone_packets = 0
        self.peer_packets = 0
        self.left: float | None = IDLE  # None: no entry

    def lookup(self, sender: Endpoint, relay: Endpoint) -> tuple[ConntrackEntry, float] | None:
        assert (sender, relay) == (PHONE, RELAY)
        if self.left is None:
            return None
        if self.phone_first:
            entry = ConntrackEntry(PHONE, RELAY, PEER, PEER_RELAY, self.phone_packets,
                                   self.peer_packets)  # fmt: skip
        else:
            entry = ConntrackEntry(PEER, PEER_RELAY, PHONE, RELAY, self.peer_packets,
                                   self.phone_packets)  # fmt: skip
        return entry, self.left


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watch(ct: Conntrack, clock: Clock) -> SilenceWatch:
    return SilenceWatch(ct.lookup, IDLE, clock)


def test_no_entry_or_a_stale_entry_is_silent() -> None:
    ct, clock = Conntrack(), Clock()
    guard = watch(ct, clock)
    ct.left = None
    assert not guard.is_seen(PHONE, RELAY)
    ct.left = IDLE - GUARD - 1  # nothing either way for more than the guard interval
    assert not guard.is_seen(PHONE, RELAY)
    ct.left = IDLE - GUARD  # maybe less than the guard: not known to be silent
    assert guard.is_seen(PHONE, RELAY)


def test_rebinding_while_the_peer_keeps_sending_relatches_after_the_guard() -> None:
    for phone_first in (True, False):
        ct, clock = Conntrack(phone_first), Clock()
        guard = watch(ct, clock)
        ct.phone_packets, ct.peer_packets = 500, 500
        # The phone's NAT mapping moved: the stranger asks; the peer still sends.
        assert guard.is_seen(PHONE, RELAY)
        for step in range(4):
            clock.now += 1.0
            ct.peer_packets += 50  # the peer keeps the entry fresh
            assert guard.is_seen(PHONE, RELAY), step
        clock.now += 1.0
        assert not guard.is_seen(PHONE, RELAY)  # its own direction did not move for 5 s


def test_a_sender_that_keeps_sending_is_never_silent() -> None:
    ct, clock = Conntrack(phone_first=False), Clock()
    guard = watch(ct, clock)
    for _ in range(20):
        ct.phone_packets += 50
        clock.now += 1.0
        assert guard.is_seen(PHONE, RELAY)
    # It stops: silent only once the guard interval has passed since its counter last moved.
    clock.now += GUARD - 0.5
    assert guard.is_seen(PHONE, RELAY)
    clock.now += 1.0
    assert not guard.is_seen(PHONE, RELAY)


def test_without_accounting_a_live_stream_keeps_its_sender() -> None:
    ct, clock = Conntrack(), Clock()
    guard = watch(ct, clock)
    ct.phone_packets = None  # type: ignore[assignment]
    clock.now += 60
    assert guard.is_seen(PHONE, RELAY)
