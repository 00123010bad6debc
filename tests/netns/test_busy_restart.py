"""A restart of a busy node: thousands of calls in the kernel, `S` and `D` arriving all along.

Every command commits a transaction, and each one interrupts a dump of the kernel's maps:
the node cannot wait for the ruleset to hold still. The comparison must still finish, and
finish right: every stored call checked, strays removed, and a call deleted while the node
was reading never taken back from what the read saw.
"""

from __future__ import annotations

import os
import re
import signal
import time
from itertools import zip_longest
from pathlib import Path

from lrkp_lab.lab import INTERNAL_IP, Lab
from lrkp_lab.load import Block, CommandLoad, blocks, fill
from lrkp_lab.node import Controller, Node
from lrkp_tsl.dataplane.nft import TABLE
from lrkp_tsl.dataplane.nftsets import SetReader
from lrkp_tsl.kernel import KernelState

CONTROL = (str(INTERNAL_IP), 22333)
KAMAILIO = "10.201.1.5"
CALLER, CALLEE = "10.201.1.10", "10.201.1.11"  # both reachable: latched at once
ARGS = (
    "--internal-ip", str(INTERNAL_IP), "--ports", "30000-61999",
    "--control", f"udp:{CONTROL[0]}:{CONTROL[1]}", "--allow", KAMAILIO,
    "--idle-timeout", "600", "--log-level", "info",
)  # fmt: skip
# Measurements at other sizes: LRKP_BUSY_CALLS, LRKP_BUSY_RATE (the suite runs the defaults).
CALLS = int(os.environ.get("LRKP_BUSY_CALLS", "5000"))
# Commands per second: S of new calls and D of restored ones, alternating.
RATE = float(os.environ.get("LRKP_BUSY_RATE", "100"))
FINISHED = re.compile(r"reconciliation finished ([0-9.]+) s after it began: (\d+) reads")
# The end of the comparison, however it ends (the last one: how a release before logged it).
DONE = ("reconciliation finished", "calls not compared with the kernel", "and reconciled in")


def wait_for_any(node: Node, texts: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        output = node.output()
        if any(text in output for text in texts):
            return output
        assert node.proc.poll() is None, f"node exited:\n{output[-5000:]}"
        assert time.monotonic() < deadline, f"none of {texts} logged:\n{output[-5000:]}"
        time.sleep(0.2)


def read_kernel(lab: Lab) -> KernelState:
    with lab.inside("relay"):
        reader = SetReader()
    with reader:
        return reader.read_state()


def by_call(state: KernelState) -> dict[str, set[tuple[str, str]]]:
    found: dict[str, set[tuple[str, str]]] = {}
    for flow in state.flows:
        found.setdefault(flow.comment, set()).add((str(flow.sender), str(flow.relay)))
    return found


def flow_keys(block: Block) -> set[tuple[str, str]]:
    """(sender, relay) of the call's four flows, as `by_call` lists them."""
    keys = set()
    for rtcp in (0, 1):
        caller = f"{block.caller[0]}:{block.caller[1] + rtcp}"
        callee = f"{block.callee[0]}:{block.callee[1] + rtcp}"
        keys.add((caller, f"{block.relay_ip}:{block.port + 2 + rtcp}"))
        keys.add((callee, f"{block.relay_ip}:{block.port + rtcp}"))
    return keys


def nft_file(lab: Lab, path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")
    lab.run("relay", "nft", "-f", str(path))


def call_ids(bodies: list[bytes]) -> set[str]:
    return {body.split()[-1].decode() for body in bodies}


def test_a_busy_restart_compares_every_call_removes_strays_and_adopts_no_deleted_call(
    lab: Lab, nodes: list[Node], tmp_path: Path
) -> None:
    node = Node(lab, "relay", *ARGS)
    nodes.append(node)
    client = Controller(lab, "sip", KAMAILIO)
    try:
        node.wait_ready(CONTROL, client, timeout=30)
        restored = blocks("busy", 30000, CALLS, str(INTERNAL_IP), CALLER, CALLEE)
        fill(client.sock, CONTROL, [block.body() for block in restored])
    finally:
        client.close()
    node.stop(signal.SIGKILL)
    # While it is down: a stray flow at a stored call's relay port, a flow of no call, and a
    # learning endpoint of no call.
    victim = restored[7]
    nft_file(lab, tmp_path / "strays.nft", [
        f"add element ip {TABLE} dnat_to {{ 10.201.1.66 . 1 . {INTERNAL_IP} . {victim.port} "
        f": {CALLEE} . 1 }}",
        f"add element ip {TABLE} snat_to {{ 10.201.1.66 . 1 . {INTERNAL_IP} . {victim.port} "
        f": {INTERNAL_IP} . {victim.port + 2} }}",
        f"add element ip {TABLE} dnat_to {{ 10.201.1.66 . 2 . {INTERNAL_IP} . 61000 "
        f'comment "stray" : {CALLEE} . 2 }}',
        f"add element ip {TABLE} learning {{ {INTERNAL_IP} . 61002 }}",
    ])  # fmt: skip

    # New calls take the ports after the restored ones, below the strays at 61000.
    created = blocks("new", 30000 + 4 * CALLS, 7750 - CALLS, str(INTERNAL_IP), CALLER, CALLEE)
    ended = list(reversed(restored))  # D for restored calls, newest first
    commands = (
        body
        for pair in zip_longest((b.body("S") for b in created), (b.body("D") for b in ended))
        for body in pair
        if body is not None
    )
    load = CommandLoad.on(lab, "sip", KAMAILIO, CONTROL, commands, RATE).start()
    try:
        restarted = Node(lab, "relay", *ARGS, state=node.state)
        nodes.append(restarted)
        output = wait_for_any(restarted, DONE, 240.0)
        time.sleep(1.0)  # commands keep coming after the comparison
    finally:
        load.stop()

    assert "calls not compared with the kernel" not in output, output[-5000:]
    assert "adopted" not in restarted.output()
    finished = FINISHED.search(output)
    assert finished, output[-5000:]
    assert load.refused() == []
    deleted, added = call_ids(load.answered(b"D")), call_ids(load.answered(b"S"))
    maybe = call_ids(load.unanswered())
    assert deleted and added, "the load did not reach the node"

    state = read_kernel(lab)
    assert state.consistent
    found = by_call(state)
    live = ({b.call_id for b in restored} - deleted - maybe) | added
    everything = {b.call_id: b for b in (*restored, *created)}
    for call_id in live:
        assert found.get(call_id) == flow_keys(everything[call_id]), call_id
    assert not deleted & found.keys(), "deleted calls came back"
    assert found.keys() <= live | maybe, sorted(found.keys() - live - maybe)[:5]
    assert "stray" not in found and "" not in found
    # Each live call still learns (the same IP may re-latch from another port), and
    # nothing else does.
    learning = {f"{e}" for e in state.learning}
    assert f"{INTERNAL_IP}:61002" not in learning
    assert learning <= {
        f"{INTERNAL_IP}:{everything[c].port + offset}" for c in live | maybe for offset in range(4)
    }
    print(
        f"\nbusy restart: {CALLS} calls, {RATE:g} commands/s ({len(added)} S, {len(deleted)} "
        f"D answered during the test): comparison finished {finished.group(1)} s after it "
        f"began, in {finished.group(2)} reads"
    )
