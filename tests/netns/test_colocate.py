"""The relay range never drops the host's own traffic (Kamailio, resolvers, NTP beside the
node), whatever the host's ephemeral port range.

The node runs in the relay namespace with ports 20000-21999 and its control socket on the
relay's internal IP; "local" sockets are sockets of that same namespace, as Kamailio's
lrkproxy sockets are when Kamailio runs on the node's host. Each test forces the
namespace's ephemeral range (net.ipv4.ip_local_port_range) to overlap the relay range.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import BASE_NODE_ARGS, Call, burst
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab, address
from lrkp_lab.localclients import CLIENTS, REPLY_WAIT, local_socket, ping, short_lived_clients
from lrkp_lab.node import LRKP_TSL, Controller, Node
from lrkp_lab.parties import Peers
from lrkp_tsl.dataplane.nft import TABLE

CONTROL = (str(INTERNAL_IP), 22333)
RELAY_PORTS = (20000, 21999)
RANGE = "20000 21999"  # the relay range, as ip_local_port_range
EPHEMERAL = "net.ipv4.ip_local_port_range"
RESERVED = "net.ipv4.ip_local_reserved_ports"


def node_args(*extra: str) -> tuple[str, ...]:
    return (*BASE_NODE_ARGS, "--allow", str(INTERNAL_IP), "--log-level", "debug", *extra)


@pytest.fixture
def host(lab: Lab) -> Iterator[Lab]:
    """The relay namespace with no reserved ports (nodes of earlier tests keep what they
    reserved, as a node that stops without a flush does); its ephemeral range and reserved
    ports are put back after."""
    ephemeral, reserved = lab.sysctl("relay", EPHEMERAL), lab.sysctl("relay", RESERVED)
    lab.set_sysctl("relay", RESERVED, "")
    try:
        yield lab
    finally:
        lab.run("relay", "nft", "delete", "table", "ip", TABLE, check=False)
        lab.run("relay", "conntrack", "-F", check=False)
        for box in ("nat", "nat2"):
            lab.run(box, "conntrack", "-F", check=False)
        lab.set_sysctl("relay", EPHEMERAL, ephemeral)
        lab.set_sysctl("relay", RESERVED, reserved)


@contextlib.contextmanager
def started(lab: Lab, *extra: str, state: Path | None = None) -> Iterator[Node]:
    node = Node(lab, "relay", *node_args(*extra), state=state)
    kamailio = Controller(lab, "sip", "10.201.1.5")
    try:
        node.wait_ready(CONTROL, kamailio)
        yield node
    finally:
        kamailio.close()
        node.stop()


def unanswered(results: list[tuple[int, bool]]) -> list[int]:
    assert len(results) == CLIENTS
    return [port for port, answered in results if not answered]


def in_range(port: int) -> bool:
    return RELAY_PORTS[0] <= port <= RELAY_PORTS[1]


def counter(lab: Lab, name: str) -> int:
    text = lab.run("relay", "nft", "list", "counter", "ip", TABLE, name).stdout
    found = re.search(r"packets (\d+)", text)
    assert found, text
    return int(found.group(1))


def test_no_room_to_reserve_every_local_client_still_gets_its_answer(host: Lab) -> None:
    """The issue's reproduction, at its worst: the whole ephemeral range is the relay range,
    so every autobound socket lands on a relay port and the node cannot reserve it."""
    host.set_sysctl("relay", EPHEMERAL, RANGE)
    with started(host) as node:
        clients = short_lived_clients(host, CONTROL)
        assert all(in_range(port) for port, _answered in clients)
        assert unanswered(clients) == []
        assert counter(host, "local_socket") >= CLIENTS
        assert "not reserving ports 20000-21999" in node.output()
        assert host.sysctl("relay", RESERVED) == ""


def test_started_after_a_local_socket_took_a_relay_port(host: Lab) -> None:
    """Kamailio started first: its sockets got ports inside the range before the node
    reserved it. With room to reserve, later sockets get ports outside the range; clients
    bound inside it on purpose are answered too."""
    host.set_sysctl("relay", EPHEMERAL, "21000 21999")
    early = local_socket(host)
    early.connect(CONTROL)
    early_port = early.getsockname()[1]
    assert in_range(early_port)
    host.set_sysctl("relay", EPHEMERAL, "20500 39999")
    try:
        with started(host) as node:
            assert ping(early, b"1_1") == b"1_1 P PONG"
            assert "reserved ports 20000-21999 from automatic port allocation" in node.output()
            assert host.sysctl("relay", RESERVED) == "20000-21999"
            autobound = short_lived_clients(host, CONTROL)
            assert not any(in_range(port) for port, _answered in autobound), autobound
            assert unanswered(autobound) == []
            # Ports in the range on purpose, never the one `early` got from the kernel.
            ports = [port for port in range(21100, 21100 + CLIENTS + 1) if port != early_port]
            inside = [(str(INTERNAL_IP), port) for port in ports[:CLIENTS]]
            bound = short_lived_clients(host, CONTROL, inside)
            assert [port for port, _answered in bound] == [port for _ip, port in inside]
            assert unanswered(bound) == []
            assert ping(early, b"1_2") == b"1_2 P PONG"
            assert counter(host, "local_socket") >= CLIENTS + 2
    finally:
        early.close()


def test_replies_from_other_hosts_reach_local_sockets(host: Lab, peers: Peers) -> None:
    """A resolver's query from a relay port (connected, or sendto() from 0.0.0.0) gets its
    answer from a server on the network."""
    host.set_sysctl("relay", EPHEMERAL, RANGE)
    server = peers("x", 53)
    with started(host):
        connected = local_socket(host, (str(EXTERNAL_IP), 21300))
        wildcard = local_socket(host, ("0.0.0.0", 21301))
        try:
            connected.connect((str(server.endpoint.ip), 53))
            connected.send(b"query-1")
            assert server.expect(b"query-1").port == 21300
            server.sock.sendto(b"answer-1", (str(EXTERNAL_IP), 21300))
            assert select.select([connected], [], [], REPLY_WAIT)[0], "no answer (connected)"
            assert connected.recv(100) == b"answer-1"
            wildcard.sendto(b"query-2", (str(server.endpoint.ip), 53))
            assert server.expect(b"query-2").port == 21301
            server.sock.sendto(b"answer-2", (str(EXTERNAL_IP), 21301))
            assert select.select([wildcard], [], [], REPLY_WAIT)[0], "no answer (wildcard)"
            assert wildcard.recvfrom(100) == (b"answer-2", (str(server.endpoint.ip), 53))
        finally:
            connected.close()
            wildcard.close()


def test_strangers_to_relay_ports_are_still_dropped(host: Lab, peers: Peers) -> None:
    """No call and no local socket: dropped in the kernel (no ICMP error goes back); a port a
    connected local socket holds is not open to anyone but its peer."""
    host.set_sysctl("relay", EPHEMERAL, RANGE)
    with started(host):
        held = local_socket(host, (str(INTERNAL_IP), 21400))
        held.connect(CONTROL)
        with host.inside("a"):
            stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind((str(address("a")), 4700))
        try:
            before = counter(host, "unknown_dropped")
            for port in (21401, 21400, 21401, 21400, 21402):
                stranger.sendto(b"nobody", (str(INTERNAL_IP), port))
            stranger.connect((str(INTERNAL_IP), 21401))
            stranger.send(b"nobody")
            assert not select.select([stranger], [], [], 0.5)[0]  # no port unreachable
            assert not select.select([held], [], [], 0.1)[0]
            assert counter(host, "unknown_dropped") == before + 6
            assert ping(held, b"2_1") == b"2_1 P PONG"
        finally:
            stranger.close()
            held.close()


def test_a_call_learns_on_a_port_a_local_socket_holds(host: Lab, peers: Peers) -> None:
    """Kamailio hands a call the very port one of its own lrkproxy sockets holds: the NAT'd
    caller's first packet is learned (its source is not the socket's peer), and the node's
    replies to that socket are delivered to it, before and after, never taken for media."""
    host.set_sysctl("relay", EPHEMERAL, RANGE)
    with started(host) as node:
        kamailio = Controller(host, "sip", "10.201.1.5")
        worker = local_socket(host, (str(INTERNAL_IP), 20502))  # the caller's relay port
        worker.connect(CONTROL)
        wildcard = local_socket(host, ("0.0.0.0", 20602))
        try:
            caller, callee = peers("c", 4000), peers("b", 6000)
            call = Call(kamailio, caller, callee, 20500, "colocated@lab")
            assert call.caller_relay.port == 20502
            queued = counter(host, "queued")
            assert ping(worker, b"3_1") == b"3_1 P PONG"
            assert counter(host, "queued") == queued  # never offered to the call
            burst(caller, call.caller_relay, callee, call.callee_relay, 5, b"A")
            burst(callee, call.callee_relay, caller, call.caller_relay, 5, b"B")
            assert ping(worker, b"3_2") == b"3_2 P PONG"
            assert "[colocated@lab] learned 10.201.1.20:" in node.output()
            assert f"learned {INTERNAL_IP}" not in node.output()
            # A socket on 0.0.0.0 without a peer never takes a call's first packet.
            other_caller, other_callee = peers("c", 4010), peers("b", 6010)
            other = Call(kamailio, other_caller, other_callee, 20600, "wildcard@lab")
            burst(other_caller, other.caller_relay, other_callee, other.callee_relay, 5, b"C")
            assert not select.select([wildcard], [], [], 0.1)[0]
        finally:
            kamailio.close()
            worker.close()
            wildcard.close()


def test_a_socket_bound_to_a_relay_ip_without_peer_refuses_the_start(host: Lab) -> None:
    """It would take the first packets of every call on its port: refused, nothing changed."""
    reserved = host.sysctl("relay", RESERVED)
    listener = local_socket(host, (str(INTERNAL_IP), 21500))
    try:
        node = Node(host, "relay", *node_args())
        assert node.proc.wait(30) == 2, node.output()
        node.stop()
        output = node.output()
        assert "udp 10.201.1.1:21500 (python" in output, output
        assert "is bound to relay IP 10.201.1.1 on a relay port" in output
        assert host.run("relay", "nft", "list", "table", "ip", TABLE, check=False).returncode
        assert host.sysctl("relay", RESERVED) == reserved
    finally:
        listener.close()


def test_check_config_reports_local_sockets_on_relay_ports_as_run_does(host: Lab) -> None:
    """check-config (the unit's ExecStartPre) finds what the start would: a socket on the
    relay IP is a problem (exit 2, as `run`), one on the wildcard address a warning."""

    def check_config() -> tuple[int, str]:
        result = host.run("relay", *LRKP_TSL, "check-config", "--config", "/dev/null",
                          *node_args(), check=False)  # fmt: skip
        return result.returncode, result.stderr

    listener = local_socket(host, (str(INTERNAL_IP), 21500))
    try:
        code, err = check_config()
    finally:
        listener.close()
    assert code == 2, err
    assert re.search(
        r"udp 10\.201\.1\.1:21500 \(python[^,]*, pid \d+\) is bound to relay IP 10\.201\.1\.1 "
        r"on a relay port .*`run` refuses to start while it is there",
        err,
    ), err
    wildcard = local_socket(host, ("0.0.0.0", 21600))
    try:
        code, err = check_config()
    finally:
        wildcard.close()
    assert code == 0, err
    assert re.search(
        r"warning: udp 0\.0\.0\.0:21600 \(python[^,]*, pid \d+\) holds relay port 21600 on "
        r"every address without a peer.*restart that process once the node runs",
        err,
    ), err
    assert check_config() == (0, "")


def test_a_wildcard_socket_without_peer_is_named_in_a_warning(host: Lab) -> None:
    host.set_sysctl("relay", EPHEMERAL, "20500 39999")
    listener = local_socket(host, ("0.0.0.0", 21600))
    try:
        with started(host) as node:
            pass
        assert re.search(
            r"WARNING .*udp 0\.0\.0\.0:21600 \(python[^,]*, pid \d+\) holds relay port 21600 "
            r"on every address without a peer.*restart that process",
            node.output(),
        ), node.output()
    finally:
        listener.close()


def test_reservation_merges_with_the_operators_and_is_taken_back_on_flush(host: Lab) -> None:
    host.set_sysctl("relay", EPHEMERAL, "20500 39999")
    host.set_sysctl("relay", RESERVED, "8080,21000-21010,30000")
    with started(host, "--flush-on-exit"):
        assert host.sysctl("relay", RESERVED) == "8080,20000-21999,30000"
    assert host.sysctl("relay", RESERVED) == "8080,21000-21010,30000"
    # Without a flush the reservation stays with the table (calls keep flowing on it).
    with started(host) as node:
        pass
    assert node.proc.returncode == 0
    assert host.sysctl("relay", RESERVED) == "8080,20000-21999,30000"
    # A restart finds it in place and adds nothing, but the ports are on record as the
    # node's (dataplane/added.py): its flush takes them back, and only them.
    with started(host, "--flush-on-exit") as node:
        assert "ports 20000-21999 already reserved" in node.output()
    assert host.sysctl("relay", RESERVED) == "8080,21000-21010,30000"
    # Reserved by the operator before any node: a node's flush leaves every one of them.
    host.set_sysctl("relay", RESERVED, "8080,20000-21999,30000")
    with started(host, "--flush-on-exit") as node:
        assert "ports 20000-21999 already reserved" in node.output()
    assert host.sysctl("relay", RESERVED) == "8080,20000-21999,30000"


def test_upgrade_over_the_previous_release_table(host: Lab, peers: Peers, tmp_path: Path) -> None:
    """A node of this release starts over the table the previous release left (its rules
    file: tests/netns/data/lrkp-previous.nft) with a live call: the call keeps flowing and
    local sockets get their traffic."""
    host.set_sysctl("relay", EPHEMERAL, RANGE)
    previous = Path(__file__).parent / "data" / "lrkp-previous.nft"
    caller, callee = peers("a", 4100), peers("b", 6100)
    with started(host, "--rules", str(previous)) as old:
        kamailio = Controller(host, "sip", "10.201.1.5")
        call = Call(kamailio, caller, callee, 20700, "upgrade@lab")
        burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"old")
        kamailio.close()
        lost = local_socket(host)
        lost.connect(CONTROL)
        assert ping(lost, b"4_1", wait=1.0) is None  # what the issue reported
        lost.close()
    assert old.proc.returncode == 0
    assert "local_socket" not in host.run("relay", "nft", "list", "table", "ip", TABLE).stdout
    with started(host, "--flush-on-exit", state=old.state) as new:
        burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"new")
        burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"back")
        assert unanswered(short_lived_clients(host, CONTROL)) == []
        assert "loaded 1 calls from the store" in new.output()
        assert (
            "local_socket"
            in host.run("relay", "nft", "list", "chain", "ip", TABLE, "relay_port").stdout
        )
    assert new.proc.returncode == 0, new.output()
