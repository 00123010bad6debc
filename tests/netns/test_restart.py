"""Never cut a live call: restarts, a flushed ruleset, a second instance.

The caller `c` sits behind a NAT box that remaps source ports (its SDP address is private
and unreachable: the node learns the NAT's address from its first packet); the callee `b`
is reachable. Media is RTP only, as with many phones (no RTCP, or rtcp-mux), at 50
packets per second each way, and every packet is counted.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab.calls import BASE_NODE_ARGS, CONTROL, Call, Stream, burst
from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, Node
from lrkp_lab.parties import Peers
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.store import FILENAME

IDLE = 2.0
ARGS = (*BASE_NODE_ARGS, "--idle-timeout", str(IDLE), "--log-level", "debug")
# The kernel's conntrack GC reaps expired entries lazily (seconds after their timeout).
EXPIRY_WAIT = 30.0


def start(lab: Lab, nodes: list[Node], kamailio: Controller, node: Node | None = None) -> Node:
    node = node or Node(lab, "relay", *ARGS)
    nodes.append(node)
    node.wait_ready(CONTROL, kamailio)
    return node


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
    restarted.wait_log("restored 1 calls from the store: 1 intact in the kernel", 10.0)
    assert "] removed: " not in restarted.output()  # nothing was cut at startup
    # Still managed: the silence that follows ends it, through the kernel's events.
    restarted.wait_log(f"[restart@lab] removed: no media for {IDLE:g} s", EXPIRY_WAIT)
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
    # The summary is logged just after the D's reply.
    restarted.wait_log("[bye@lab] removed: deleted by the controlling layer (D)", 5.0)
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
    node.wait_log("repaired: table ip lrkp reloaded, 1 live calls put back", 5.0)
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
    restarted.wait_log("restored 1 calls from the store", 10.0)  # reconciled after start
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
    restarted.wait_log("restored 1 calls from the store", 10.0)
    time.sleep(1.5)  # the timer has run: a call past its lifetime would have ended by now
    forward.stop()
    backward.stop()
    output = restarted.output()
    assert "] removed: " not in output, output
    assert forward.lost() == [] and backward.lost() == []
    burst(caller, call.caller_relay, callee, call.callee_relay, 2, b"still relayed")


def mangle_store(path: Path, how: str) -> None:
    """Make the store at `path` one this release cannot use, as a disk or a person would."""
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if how == "truncated":
        with path.open("r+b") as file:
            file.truncate(1000)
    elif how == "not-a-database":
        path.write_bytes(b"this is not a database\n" * 200)
    elif how == "foreign-schema":
        path.unlink()
        with sqlite3.connect(path) as db:
            db.executescript("CREATE TABLE calls (id INTEGER PRIMARY KEY, what TEXT); "
                             "PRAGMA user_version = 1;")  # fmt: skip
    elif how == "newer-release":
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version = 99")


@pytest.mark.parametrize("how", ["truncated", "not-a-database", "foreign-schema", "newer-release"])
def test_a_bad_store_file_is_set_aside_and_the_node_serves(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers, how: str
) -> None:
    node = start(lab, nodes, kamailio)
    caller, callee = peers("a", 4090), peers("b", 6090)
    call = Call(kamailio, caller, callee, 21000, "bad-store@lab")  # both reachable: latched
    burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"before")
    node.stop(signal.SIGKILL)
    store = node.state / FILENAME
    if how == "truncated":  # a file with the call in it, then cut short
        with sqlite3.connect(store) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    mangle_store(store, how)
    restarted = start(lab, nodes, kamailio, Node(lab, "relay", *ARGS, state=node.state))
    label = "newer" if how == "newer-release" else "bad"
    restarted.wait_log("adopted 1 calls found in the kernel with no stored record", 10.0)
    output = restarted.output()
    assert f"Moved to {store}.{label}-" in output
    (aside,) = (
        f for f in node.state.glob(f"{FILENAME}.{label}-*") if f.name[-4:] not in ("-wal", "-shm")
    )
    assert f"Moved to {aside} " in output
    burst(caller, call.caller_relay, callee, call.callee_relay, 3, b"A")
    burst(callee, call.callee_relay, caller, call.caller_relay, 3, b"B")
    caller2, callee2 = peers("a", 4092), peers("b", 6092)
    call2 = Call(kamailio, caller2, callee2, 21004, "after-bad-store@lab")
    burst(caller2, call2.caller_relay, callee2, call2.callee_relay, 2, b"new")
    with sqlite3.connect(store) as db:  # the new store holds both
        found = {row[0] for row in db.execute("SELECT call_id FROM calls")}
    assert found == {"bad-store@lab", "after-bad-store@lab"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB file system (tmpfs) for a state directory, unmounted at the end."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)],
                   check=True)  # fmt: skip
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; the file that does it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("store", ["kept", "none-yet"])
def test_a_full_disk_at_start_keeps_the_node_serving_and_the_store_catches_up(
    lab: Lab, nodes: list[Node], kamailio: Controller, peers: Peers, small_disk: Path, store: str
) -> None:
    # The node's log stays on a roomy disk; calls outlive the test's pauses in their media.
    args = (*ARGS, "--state-dir", str(small_disk), "--idle-timeout", "60")
    node = start(lab, nodes, kamailio, Node(lab, "relay", *args))
    caller, callee = peers("a", 4094), peers("b", 6094)
    live = Call(kamailio, caller, callee, 21008, "full-disk-live@lab")  # both reachable
    burst(caller, live.caller_relay, callee, live.callee_relay, 1, b"before")
    node.stop(signal.SIGKILL)
    if store == "none-yet":  # a new state directory, or a store moved away: nothing to open
        for path in small_disk.glob(f"{FILENAME}*"):
            path.unlink()
    filler = fill(small_disk)
    restarted = start(lab, nodes, kamailio, Node(lab, "relay", *args, state=node.state))
    restarted.wait_log("reconciliation finished", 10.0)
    # Live calls keep flowing; new calls are set up; D ends calls.
    burst(caller, live.caller_relay, callee, live.callee_relay, 3, b"A")
    caller2, callee2 = peers("a", 4096), peers("b", 6096)
    new = Call(kamailio, caller2, callee2, 21012, "full-disk-new@lab")
    burst(caller2, new.caller_relay, callee2, new.callee_relay, 2, b"new")
    caller3, callee3 = peers("a", 4098), peers("b", 6098)
    ended = Call(kamailio, caller3, callee3, 21016, "full-disk-ended@lab")
    ended.delete(kamailio)
    caller3.send(ended.caller_relay, b"after D")
    callee3.expect_nothing()
    assert f"state store {small_disk / FILENAME} cannot be written" in restarted.output()
    filler.unlink()  # the operator frees space
    restarted.wait_log("is written again after", 15.0)
    with sqlite3.connect(small_disk / FILENAME) as db:
        found = {row[0] for row in db.execute("SELECT call_id FROM calls")}
    assert found == {"full-disk-live@lab", "full-disk-new@lab"}
    burst(callee, live.callee_relay, caller, live.caller_relay, 2, b"B")
