"""/metrics for real: a node in the lab relays a call while Prometheus' own parser reads it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from lrkp_lab.calls import NODE_ARGS, Call, Stream, running_node
from lrkp_lab.lab import INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node
from lrkp_lab.parties import Peers
from lrkp_lab.scraping import Samples, metrics
from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.nft import FAMILY, TABLE
from lrkp_tsl.dataplane.nftcounters import CounterReader
from lrkp_tsl.media import Endpoint
from lrkp_tsl.metrics import KERNEL_DROPS

PORT = 9733


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    with running_node(lab, *NODE_ARGS, "--metrics-listen", f"127.0.0.1:{PORT}") as running:
        yield running


def test_metrics_follow_a_call_from_set_up_to_delete(
    lab: Lab, node: Node, kamailio: Controller, peers: Peers
) -> None:
    before = metrics(lab, "relay", PORT)
    assert value(before, "lrkp_sessions") == 0
    assert value(before, "lrkp_ports_free") == 2000 and value(before, "lrkp_ports_used") == 0
    assert value(before, "lrkp_kernel_table_present") == 1
    assert value(before, "process_resident_memory_bytes") > 0
    # The caller is behind NAT: its address is learned from its first packet.
    caller, callee = peers("c", 4900), peers("b", 6900)
    call = Call(kamailio, caller, callee, 21000, "metrics@lab")
    set_up = metrics(lab, "relay", PORT)
    assert value(set_up, "lrkp_sessions") == 1
    assert value(set_up, "lrkp_ports_used") == 4 and value(set_up, "lrkp_ports_free") == 1996
    assert value(set_up, "lrkp_commands_total", command="set", result="ok") == 1
    assert value(set_up, "lrkp_command_duration_seconds_count") > value(
        before, "lrkp_command_duration_seconds_count"
    )

    forward = Stream(caller, call.caller_relay, callee, b"A").start()
    backward = Stream(callee, call.callee_relay, caller, b"B").start()
    try:
        time.sleep(1.0)
        first = metrics(lab, "relay", PORT)
        time.sleep(1.0)
        second = metrics(lab, "relay", PORT)
    finally:
        forward.stop()
        backward.stop()
    assert not forward.lost() and not backward.lost()
    kernel = ("lrkp_packets_total", "lrkp_bytes_total")
    for name in kernel:
        assert value(first, name, type="kernel") > value(set_up, name, type="kernel")
        assert value(second, name, type="kernel") > value(first, name, type="kernel")
    assert value(second, "lrkp_latching_total", outcome="learned") >= 1
    assert value(second, "lrkp_queue_verdicts_total", verdict="accept") >= 1

    # Every packet the parties received was relayed by the kernel, or accepted from the
    # queue by the node (first packets): the figures add up to what the parties counted.
    ended = metrics(lab, "relay", PORT)
    relayed = value(ended, "lrkp_packets_total", type="kernel")
    accepted = value(ended, "lrkp_queue_verdicts_total", verdict="accept")
    assert relayed + accepted == len(forward.arrivals) + len(backward.arrivals)
    # Each payload is b"A-<seq>" in a UDP/IPv4 packet: the kernel counts whole IP packets.
    assert value(ended, "lrkp_bytes_total", type="kernel") >= relayed * (20 + 8 + 3)

    call.delete(kamailio)
    after = metrics(lab, "relay", PORT)
    assert value(after, "lrkp_sessions") == 0
    assert value(after, "lrkp_closed_sessions_total", reason="deleted") == 1
    assert value(after, "lrkp_commands_total", command="delete", result="ok") == 1
    assert value(after, "lrkp_ports_used") == 0 and value(after, "lrkp_ports_free") == 2000


def test_counters_read_over_netlink_agree_with_nft(
    lab: Lab, dataplane: DataPlane, peers: Peers
) -> None:
    """nftcounters.py reads what `nft list counter` shows, for every counter of the table."""
    stranger = peers("a", 4950)
    for _ in range(3):
        stranger.send(Endpoint(INTERNAL_IP, 21100), b"nobody")  # no call, no socket there
    with lab.inside("relay"):
        reader = CounterReader()
    with reader:
        counters = reader.counters(FAMILY, TABLE)
    assert counters is not None
    assert set(counters) == {*KERNEL_DROPS, "queued", "relayed", "local_socket"}
    assert counters["unknown_dropped"][0] >= 3
    for name, (packets, _octets) in counters.items():
        assert packets == dataplane.nft.counter_packets(name), name


def test_no_table_reads_as_none(lab: Lab) -> None:
    lab.run("relay", "nft", "delete", "table", "ip", TABLE, check=False)
    with lab.inside("relay"):
        reader = CounterReader()
    with reader:
        assert reader.counters(FAMILY, TABLE) is None


def test_metrics_are_off_unless_asked_for(lab: Lab) -> None:
    with running_node(lab, *NODE_ARGS), pytest.raises(ConnectionRefusedError):
        metrics(lab, "relay", PORT)
