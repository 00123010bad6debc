"""Kamailio on the node's host, as many operators run it (issue 17, section 1).

Kamailio runs in the node's own namespace (`relay`), listening on the relay IPs, its
`lrkproxy_sock` on the node's control address on the relay's internal IP. The namespace's
ephemeral range is the relay range itself, the worst overlap there is: every socket that
does not choose its port (each Kamailio process's lrkproxy socket, any resolver) gets a
relay port, and the node cannot reserve the range without leaving the host no ephemeral
port at all. Before the fix the node dropped every reply to those sockets: Kamailio
retransmitted each `S`, then disabled the node.

Against Debian's 5.6 and the 6.x snapshot. Each run prints its figures (pytest -s).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.kamailio import COLOCATED, KamailioBuild, call, kamailio
from lrkp_lab.lab import Lab
from lrkp_lab.localclients import CLIENTS, short_lived_clients
from lrkp_lab.node import Node
from lrkp_lab.sipmedia import media_both_ways

RELAY_IP, EXTERNAL_IP = str(COLOCATED.internal), str(COLOCATED.external)
CONTROL = (RELAY_IP, 22333)
PORTS = (20000, 21999)
EPHEMERAL = "net.ipv4.ip_local_port_range"
RESERVED = "net.ipv4.ip_local_reserved_ports"
# Caller, callee: internal to external, behind NAT to internal, external to internal.
CALLS = (("a", "x"), ("c", "b"), ("x", "a"))


@pytest.fixture
def overlapping(lab: Lab) -> Iterator[None]:
    """The relay namespace's ephemeral range set to the relay range; put back after."""
    ephemeral, reserved = lab.sysctl("relay", EPHEMERAL), lab.sysctl("relay", RESERVED)
    lab.set_sysctl("relay", EPHEMERAL, "%d %d" % PORTS)  # noqa: UP031
    try:
        yield
    finally:
        lab.set_sysctl("relay", EPHEMERAL, ephemeral)
        lab.set_sysctl("relay", RESERVED, reserved)


def start_node(lab: Lab) -> Node:
    node = Node(
        lab, "relay", "--internal-ip", RELAY_IP, "--external-ip", EXTERNAL_IP,
        "--ports", "%d-%d" % PORTS, "--control", f"udp:{CONTROL[0]}:{CONTROL[1]}",  # noqa: UP031
        "--allow", RELAY_IP, "--idle-timeout", "3", "--flush-on-exit",
    )  # fmt: skip
    node.wait_log("node up", 15)
    return node


def lrkproxy_ports(lab: Lab) -> list[int]:
    """The local ports of Kamailio's lrkproxy sockets (connected to the node's control)."""
    listing = lab.run("relay", "ss", "-Hnup").stdout
    return [
        int(match.group(1))
        for match in re.finditer(
            rf"{re.escape(RELAY_IP)}:(\d+)\s+{re.escape(RELAY_IP)}:{CONTROL[1]}\s.*kamailio",
            listing,
        )
    ]


def node_counters(output: str) -> dict[str, int]:
    found = re.search(r"stopping: \d+ live calls; counters: (.*)", output)
    assert found, output
    return {k: int(v) for k, v in (item.split("=") for item in found.group(1).split(", "))}


def test_kamailio_beside_the_node_with_the_ephemeral_range_on_the_relay_range(
    lab: Lab, overlapping: None, tmp_path: Path, kamailio_build: KamailioBuild
) -> None:
    node = start_node(lab)
    try:
        assert "not reserving ports 20000-21999" in node.output()
        with kamailio(
            lab, tmp_path / "kam", [f"udp:{CONTROL[0]}:{CONTROL[1]}"],
            build=kamailio_build, site=COLOCATED,
        ) as kam:  # fmt: skip
            workers = lrkproxy_ports(lab)
            assert workers and all(PORTS[0] <= port <= PORTS[1] for port in workers), workers
            for index, (caller, callee) in enumerate(CALLS):
                with call(
                    lab, tmp_path / f"call{index}", caller=caller, callee=callee,
                    caller_rtp_port=30000 + 4 * index, callee_rtp_port=32000 + 4 * index,
                    pause_ms=1500, site=COLOCATED,
                ) as made:  # fmt: skip
                    caller_sdp, callee_sdp = made.wait_answered()
                    media_both_ways(lab, made, caller_sdp, callee_sdp, packets=10)
                    made.wait_done()
            clients = short_lived_clients(lab, CONTROL)
        kamailio_log = kam.log()
    finally:
        node.stop()
    counters = node_counters(node.output())
    answered = sum(ok for _port, ok in clients)
    print(
        f"\nco-location, Kamailio {kamailio_build.name}: {len(workers)} lrkproxy sockets on "
        f"relay ports {sorted(workers)}; S received {counters.get('request.SetSession', 0)}, "
        f"retransmitted commands {counters.get('retransmissions', 0)}; local clients "
        f"answered {answered}/{CLIENTS} (all on relay ports: "
        f"{all(PORTS[0] <= port <= PORTS[1] for port, _ok in clients)})"
    )
    assert counters.get("retransmissions", 0) == 0, counters
    assert counters["request.SetSession"] >= len(CALLS)
    # "can't ping the lrk proxy", "timeout waiting reply from a lrk proxy", ...
    lines = kamailio_log.splitlines()
    assert [line for line in lines if "ERROR" in line and "lrk proxy" in line] == []
    assert answered == CLIENTS, [port for port, ok in clients if not ok]
