"""Conntrack events and targeted GETs against the real kernel, in the lab's relay namespace.

Each test loads its own small table (not the node's): one relay port, 20000, NATed from
`a` to `x` with a 2 s `ct timeout` policy, as the node does per call with the call's idle
timeout. The table and every conntrack entry are removed after each test.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab, address
from lrkp_tsl.dataplane import conntrack
from lrkp_tsl.dataplane.conntrack import ConntrackTable
from lrkp_tsl.dataplane.ctevents import ConntrackEvents
from lrkp_tsl.errors import KernelError
from lrkp_tsl.kernel import StreamChange, StreamEvent, StreamKey
from lrkp_tsl.media import Endpoint, Flow, Stream

TABLE = "lrkp_evtest"
IDLE = 2  # seconds: the table's `ct timeout` policy
RULES = f"""
table ip {TABLE} {{
	ct timeout idle_{IDLE} {{
		protocol udp; l3proto ip; policy = {{ unreplied: {IDLE}, replied: {IDLE} }};
	}}
	chain pre {{
		type nat hook prerouting priority dstnat; policy accept;
		udp dport 20000 ct timeout set "idle_{IDLE}" dnat to {address("x")}:6000
	}}
	chain post {{
		type nat hook postrouting priority srcnat; policy accept;
		meta l4proto udp ct original proto-dst 20000 snat to {EXTERNAL_IP}:20002
	}}
}}
"""
RELAY = Endpoint(INTERNAL_IP, 20000)
SYSCTLS = ("net.ipv4.ip_forward", "net.netfilter.nf_conntrack_events")
# The conntrack GC reaps expired entries lazily, and on a nearly empty table only about
# once a minute (its scan interval adapts between 1 s and 60 s, host-wide; ctevents.py).
GC_WAIT = 65.0


@pytest.fixture
def relay_table(lab: Lab, tmp_path: Path) -> Iterator[None]:
    """The test table loaded in the relay namespace, conntrack events on; all undone after."""
    before = {name: lab.run("relay", "sysctl", "-n", name).stdout.strip() for name in SYSCTLS}
    lab.run("relay", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    lab.run("relay", "sysctl", "-qw", "net.netfilter.nf_conntrack_events=1")
    rules = tmp_path / "evtest.nft"
    rules.write_text(RULES)
    lab.run("relay", "nft", "-f", str(rules))
    lab.run("relay", "conntrack", "-F", check=False)
    try:
        yield
    finally:
        lab.run("relay", "nft", "delete", "table", "ip", TABLE, check=False)
        lab.run("relay", "conntrack", "-F", check=False)
        for name, value in before.items():
            lab.run("relay", "sysctl", "-qw", f"{name}={value}", check=False)


@pytest.fixture
def events(lab: Lab, relay_table: None) -> Iterator[ConntrackEvents]:
    with lab.inside("relay"):
        made = ConntrackEvents()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def table(lab: Lab, relay_table: None) -> Iterator[ConntrackTable]:
    with lab.inside("relay"):
        made = ConntrackTable()
    try:
        yield made
    finally:
        made.close()


def send_from_a(lab: Lab, port: int, to: Endpoint = RELAY) -> StreamKey:
    """One UDP packet from a:port to `to`; returns the stream key the relay will see."""
    sock = lab.udp_socket("a", address("a"), port)
    try:
        sock.sendto(b"rtp", (str(to.ip), to.port))
    finally:
        sock.close()
    return Endpoint(address("a"), port), to


def wait_for(
    events: ConntrackEvents, wanted: Callable[[StreamEvent], bool], timeout: float
) -> tuple[StreamEvent | None, list[StreamEvent]]:
    """Read events until one is `wanted` or `timeout` passes; returns it and all seen."""
    seen: list[StreamEvent] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        select.select([events], [], [], left)
        batch, overflowed = events.read()
        assert not overflowed
        for event in batch:
            seen.append(event)
            if wanted(event):
                return event, seen
    return None, seen


def is_(change: StreamChange, key: StreamKey) -> Callable[[StreamEvent], bool]:
    return lambda event: event == StreamEvent(change, key)


def test_first_relayed_packet_starts_a_stream_with_its_original_key(
    lab: Lab, events: ConntrackEvents
) -> None:
    callee = lab.udp_socket("x", address("x"), 6000)
    try:
        key = send_from_a(lab, 4000)
        callee.settimeout(2.0)
        assert callee.recvfrom(100) == (b"rtp", (str(EXTERNAL_IP), 20002))  # relayed
    finally:
        callee.close()
    expected = StreamEvent(StreamChange.STARTED, (Endpoint(address("a"), 4000), RELAY))
    assert key == expected.key
    found, seen = wait_for(events, lambda e: e.change is StreamChange.STARTED, 2.0)
    assert found == expected, seen


def test_forget_is_reported_as_removed_not_expired(
    lab: Lab, events: ConntrackEvents, table: ConntrackTable
) -> None:
    key = send_from_a(lab, 4002)
    assert wait_for(events, is_(StreamChange.STARTED, key), 2.0)[0]
    flow = Flow(
        Stream.RTP, key[0], key[1], Endpoint(address("x"), 6000), Endpoint(EXTERNAL_IP, 20002)
    )
    assert table.forget([flow]) == 1
    found, seen = wait_for(events, lambda e: e.key == key, 2.0)
    assert found == StreamEvent(StreamChange.REMOVED, key), seen


def test_silence_for_the_whole_timeout_is_reported_as_expired(
    lab: Lab, events: ConntrackEvents
) -> None:
    key = send_from_a(lab, 4004)
    assert wait_for(events, is_(StreamChange.STARTED, key), 2.0)[0]
    sent = time.monotonic()
    found, seen = wait_for(events, lambda e: e.key == key, IDLE + GC_WAIT)
    assert found == StreamEvent(StreamChange.EXPIRED, key), seen
    assert time.monotonic() - sent >= IDLE - 0.1  # not before the timeout ran out


def test_alive_reports_live_keys_with_time_left_and_reaps_expired_ones(
    lab: Lab, events: ConntrackEvents, table: ConntrackTable
) -> None:
    live = send_from_a(lab, 4006)
    assert wait_for(events, is_(StreamChange.STARTED, live), 2.0)[0]
    never = (Endpoint(address("a"), 4008), RELAY)
    elsewhere = (live[0], Endpoint(INTERNAL_IP, 20004))
    found = table.alive([never, live, elsewhere])
    assert list(found) == [live]
    assert 1.0 <= found[live] <= IDLE  # whole seconds, rounded down
    # Past its timeout, a GET reaps the entry at once (the GC may not have yet): the
    # answer is "gone", and the EXPIRED event follows without waiting for the GC.
    time.sleep(IDLE + 0.3)
    assert table.alive([live]) == {}
    found_event, seen = wait_for(events, lambda e: e.key == live, 0.5)
    assert found_event == StreamEvent(StreamChange.EXPIRED, live), seen


def test_alive_recovers_after_replies_were_lost(
    lab: Lab, table: ConntrackTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose replies overflow the receive buffer fails; the next call must not
    trip over (or wait for) what the failed one left behind."""
    other_port = Endpoint(INTERNAL_IP, 20010)  # no NAT: every sender its own entry
    streams = [send_from_a(lab, 5000 + 2 * n, other_port) for n in range(300)]
    time.sleep(0.2)
    monkeypatch.setattr(conntrack, "GET_BATCH", len(streams))
    with pytest.raises(KernelError):
        table.alive(streams)
    monkeypatch.undo()
    assert set(table.alive(streams)) == set(streams)


def test_overflow_is_reported_and_the_socket_keeps_working(lab: Lab, relay_table: None) -> None:
    with lab.inside("relay"):
        tiny = ConntrackEvents(rcvbuf=4096)
    try:
        # 2,000 entries at once (to a relay port with no NAT: each its own entry).
        target = (str(INTERNAL_IP), 20010)
        with lab.inside("a"):
            socks = []
            for _ in range(2000):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((str(address("a")), 0))
                sock.sendto(b"burst", target)
                socks.append(sock)
        for sock in socks:
            sock.close()
        time.sleep(0.5)
        read, overflowed = tiny.read(limit=10_000)
        assert overflowed
        assert 0 < len(read) < 2000
        while tiny.read(limit=10_000)[0]:  # drain what the kernel queued after
            time.sleep(0.1)
        key = send_from_a(lab, 4010)
        found, seen = wait_for(tiny, is_(StreamChange.STARTED, key), 2.0)
        assert found is not None, seen
    finally:
        tiny.close()
