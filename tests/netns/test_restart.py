"""Never cut a live call: restarts, a flushed ruleset, a second instance.

The caller `c` sits behind a NAT box that remaps source ports (its SDP address is private
and unreachable: the node learns the NAT's address from its first packet); the callee `b`
is reachable. Media is RTP only, as with many phones (no RTCP, or rtcp-mux), at 50
packets per second each way, and every packet is counted.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import CONTROL, Call, Stream, burst
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node
from lrkp_lab.parties import Peers
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.store import FILENAME

IDLE = 2.0
ARGS = (
    "--internal-ip", str(INTERNAL_IP), "--external-ip", str(EXTERNAL_IP),
    "--ports", "20000-21999", "--control", f"udp:{CONTROL[0]}:{CONTROL[1]}",
    "--allow", "10.201.1.5", "--idle-timeout", str(IDLE), "--log-level", "debug",
)  # fmt: skip
# The kernel's conntrack GC reaps expired entries lazily (seconds after their timeout).
EXPIRY_WAIT = 30.0


@pytest.fixture
def nodes(lab: Lab) -> Iterator[list[Node]]:
    """Nodes a test starts; all stopped, and the relay namespace cleared, at the end."""
    started: list[Node] = []
    yield started
    for node in started:
        node.stop(signal.SIGKILL)
    lab.run("relay", "nft", "delete", "table", "ip", TABLE, check=False)
    lab.run("relay", "iptables-nft", "-t", "raw", "-F", check=False)
    for host in ("relay", "nat"):
        lab.run(host, "conntrack", "-F", check=False)


@pytest.fixture
def kamailio(lab: Lab) -> Iterator[Controller]:
    client = Controller(lab, "sip", "10.201.1.5")
    yield client
    client.close()


def start(lab: Lab, nodes: list[Node], kamailio: Controller, node: Node | None = None) -> Node:
    node = node or Node(lab, "relay", *ARGS)
    nodes.append(node)
    node.wait_ready(CONTROL, kamailio)
    return node


def wait_for(node: Node, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.output():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{node.output()}"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_restart_loses_no_rtp_and_the_call_stays_managed(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers, sig: signal.Signals
) -> None:
    node = start(lab, nodes, kamailio)
    caller, callee = peers("c", 4000), peers("b", 6000)
    call = Call(kamailio, caller, callee, 20000, "restart@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")  # latches c
    forward = Stream(caller, call.caller_relay, callee, b"A").start()
    backward = Stream(callee, call.callee_relay, caller, b"B").start()
    time.sleep(1.0)
    restarted = start(lab, nodes, kamailio, node.restart(sig))
    time.sleep(1.0)
    forward.stop()
    backward.stop()
    assert len(forward.sent) > 90 and len(backward.sent) > 90
    assert forward.lost() == [] and backward.lost() == []
    assert forward.sources == {call.callee_relay} and backward.sources == {call.caller_relay}
    wait_for(restarted, "restored 1 calls from the store: 1 intact in the kernel", 10.0)
    assert "] removed: " not in restarted.output()  # nothing was cut at startup
    # Still managed: the silence that follows ends it, through the kernel's events.
    wait_for(restarted, f"[restart@lab] removed: no media for {IDLE:g} s", EXPIRY_WAIT)
    caller.send(call.caller_relay, b"after expiry")
    callee.expect_nothing()


def test_delete_after_a_restart_removes_the_call(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers
) -> None:
    node = start(lab, nodes, kamailio)
    caller, callee = peers("c", 4010), peers("b", 6010)
    call = Call(kamailio, caller, callee, 20100, "bye@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 2, b"A")
    restarted = start(lab, nodes, kamailio, node.restart(signal.SIGKILL))
    burst(callee, call.callee_relay, caller, call.caller_relay, 2, b"B")
    call.delete(kamailio)
    assert "[bye@lab] removed: deleted by the controlling layer (D)" in restarted.output()
    caller.send(call.caller_relay, b"after D")
    callee.expect_nothing()
    assert "bye@lab" not in lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout


def test_a_call_still_learning_when_the_node_dies_latches_after_the_restart(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers
) -> None:
    node = start(lab, nodes, kamailio)
    caller, callee = peers("c", 4020), peers("b", 6020)
    call = Call(kamailio, caller, callee, 20200, "learning@lab")  # nobody has spoken yet
    start(lab, nodes, kamailio, node.restart(signal.SIGKILL))
    caller.send(call.caller_relay, b"first after restart")
    assert callee.expect(b"first after restart") == call.callee_relay
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")


def test_a_flushed_ruleset_is_repaired_while_media_flows(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers
) -> None:
    node = start(lab, nodes, kamailio)
    caller, callee = peers("c", 4030), peers("b", 6030)
    call = Call(kamailio, caller, callee, 20300, "flushed@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")
    forward = Stream(caller, call.caller_relay, callee, b"A").start()
    backward = Stream(callee, call.callee_relay, caller, b"B").start()
    time.sleep(0.5)
    flushed_at = time.monotonic()
    lab.run("relay", "nft", "flush", "ruleset")  # what `systemctl restart nftables` does
    wait_for(node, "repaired: table ip lrkp reloaded, 1 live calls put back", 5.0)
    time.sleep(1.0)
    forward.stop()
    backward.stop()
    for stream in (forward, backward):
        resumed = [t for t in stream.arrivals.values() if t > flushed_at]
        assert resumed, "media never resumed"
        assert stream.longest_gap() < 2.0
    assert "nft flush ruleset" in node.output()  # the error says what happened and why
    # New calls work, first packet included.
    caller2, callee2 = peers("c", 4032), peers("b", 6032)
    call2 = Call(kamailio, caller2, callee2, 20400, "after-flush@lab")
    burst(caller2, call2.caller_relay, callee2, call2.callee_relay, 2, b"A")
    burst(callee2, call2.callee_relay, caller2, call2.caller_relay, 2, b"B")


def test_a_second_instance_is_refused_and_the_first_keeps_relaying(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers
) -> None:
    first = start(lab, nodes, kamailio)
    caller, callee = peers("c", 4040), peers("b", 6040)
    call = Call(kamailio, caller, callee, 20500, "only-one@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")
    listing = lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout
    rules = lab.run("relay", "iptables-nft", "-t", "raw", "-S").stdout
    second = Node(lab, "relay", *ARGS)
    nodes.append(second)
    assert second.proc.wait(30) == 2
    assert f"pid {first.proc.pid}" in second.output() or str(first.proc.pid) in second.output()
    assert lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout == listing
    assert lab.run("relay", "iptables-nft", "-t", "raw", "-S").stdout == rules
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")
    assert kamailio.command(b"P", CONTROL) == b"P PONG"


def test_restart_repairs_what_changed_in_the_kernel_while_the_node_was_down(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers
) -> None:
    node = start(lab, nodes, kamailio)
    caller, callee = peers("a", 4050), peers("b", 6050)
    call = Call(kamailio, caller, callee, 20600, "damaged@lab")  # both reachable: committed
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"before")
    node.stop(signal.SIGKILL)
    key = f"{caller.endpoint.ip} . {caller.endpoint.port} . {call.caller_relay.ip} . 20602"
    lab.run("relay", "nft", "delete", "element", "ip", TABLE, "dnat_to", f"{{ {key} }}")
    lab.run(
        "relay",
        "nft",
        "add",
        "element",
        "ip",
        TABLE,
        "dnat_to",
        '{ 10.201.1.66 . 1 . 10.201.1.1 . 21500 comment "stray" : 10.201.1.11 . 2 }',
    )
    lab.run("relay", "nft", "add", "element", "ip", TABLE, "learning",
            "{ 10.201.1.1 . 21502 }")  # fmt: skip
    restarted = start(lab, nodes, kamailio, Node(lab, "relay", *ARGS, state=node.state))
    wait_for(restarted, "restored 1 calls from the store", 10.0)  # reconciled after start
    log = restarted.output()
    assert "kernel state of 1 stored calls was incomplete and was repaired: 'damaged@lab'" in log
    assert "removed 1 kernel flows and 1 learning endpoints that belong to no call" in log
    listing = lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout
    assert "stray" not in listing and "21502" not in listing
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")


def test_deleting_the_lock_file_does_not_let_a_second_node_into_the_namespace(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers
) -> None:
    first = start(lab, nodes, kamailio)
    caller, callee = peers("a", 4060), peers("b", 6060)
    call = Call(kamailio, caller, callee, 20700, "one-per-netns@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")
    inode = int(lab.run("relay", "stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout)
    lock_file = Path(f"/run/lrkp-tsl/netns-{inode}.lock")
    assert lock_file.read_text().startswith(f"{first.proc.pid}\n")
    lock_file.unlink()  # a cleanup script, or an operator
    second = Node(lab, "relay", *ARGS)
    nodes.append(second)
    assert second.proc.wait(30) == 2
    assert f"pid {first.proc.pid}" in second.output()
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")
    assert kamailio.command(b"P", CONTROL) == b"P PONG"


def test_a_node_in_another_namespace_cannot_share_a_state_dir(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers
) -> None:
    first = start(lab, nodes, kamailio)
    caller, callee = peers("a", 4070), peers("b", 6070)
    call = Call(kamailio, caller, callee, 20800, "own-state@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")
    other = (
        "--internal-ip", "10.201.1.2", "--ports", "20000-21999",
        "--control", "udp:10.201.1.2:22333", "--allow", "10.201.1.5",
    )  # fmt: skip
    second = Node(lab, "relay2", *other, state=first.state)
    nodes.append(second)
    assert second.proc.wait(30) == 2
    namespace = lab.run("relay", "readlink", "/proc/self/ns/net").stdout.strip()
    assert (
        f"state_dir {str(first.state)!r} is in use by another lrkp-tsl node, "
        f"pid {first.proc.pid} (network namespace {namespace})"
    ) in second.output()
    # The first node's call, store and kernel state are untouched.
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")
    assert "own-state@lab" in lab.run("relay", "nft", "list", "table", "ip", TABLE).stdout


@pytest.mark.parametrize("boot", ["same-boot", "after-a-reboot"])
def test_a_wall_clock_step_across_a_restart_does_not_age_live_calls(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers, boot: str
) -> None:
    """NTP stepping the clock +1 h while the node is down: on the wall clock every stored
    call is then an hour older, past the maximum lifetime (3600 s by default)."""
    node = start(lab, nodes, kamailio)
    caller, callee = peers("c", 4080), peers("b", 6080)
    call = Call(kamailio, caller, callee, 20900, "clock-step@lab")
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")
    forward = Stream(caller, call.caller_relay, callee, b"A").start()
    backward = Stream(callee, call.callee_relay, caller, b"B").start()
    time.sleep(0.5)
    node.stop(signal.SIGKILL)
    # The step, as the restarted node sees it: the stored wall-clock times are an hour older
    # than the clock now says. A reboot also restarts the monotonic clock: another boot id,
    # for the calls and for the node's last sign of life.
    with sqlite3.connect(node.state / FILENAME) as db:
        db.execute("UPDATE calls SET started = started - 3700, quiet_since = quiet_since - 3700")
        db.execute("UPDATE clock SET alive_wall = alive_wall - 3700")
        if boot == "after-a-reboot":
            db.execute("UPDATE calls SET boot_id = 'another-boot'")
            db.execute("UPDATE clock SET boot_id = 'another-boot'")
    restarted = start(lab, nodes, kamailio, Node(lab, "relay", *ARGS, state=node.state))
    wait_for(restarted, "restored 1 calls from the store", 10.0)
    time.sleep(1.5)  # the timer has run: a call past its lifetime would have ended by now
    forward.stop()
    backward.stop()
    output = restarted.output()
    assert "] removed: " not in output, output
    assert forward.lost() == [] and backward.lost() == []
    burst(caller, call.caller_relay, callee, call.callee_relay, 2, b"still relayed")
