"""Element batches over netlink (dataplane/nftbatch.py) against the real nf_tables, and a
reload over an older release's table."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.parties import PORTS, Peers
from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.nft import ElementChange
from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import CallMedia, Endpoint

REPO = Path(__file__).resolve().parents[2]


def media(n: int, caller: Endpoint, callee: Endpoint) -> CallMedia:
    port = 21000 + 4 * n
    return CallMedia(f"batch-{n}@lab", caller, Endpoint(INTERNAL_IP, port + 2), callee,
                     Endpoint(INTERNAL_IP, port))  # fmt: skip


def test_one_refused_change_leaves_the_others_committed(
    lab: Lab, dataplane: DataPlane, peers: Peers
) -> None:
    callers = [peers("a", 4200 + n) for n in range(4)]
    callees = [peers("b", 6200 + n) for n in range(4)]
    calls = [media(n, callers[n].endpoint, callees[n].endpoint) for n in range(4)]
    # Call 1 deletes a flow that is not there (fine: counted) and call 2 adds a key the
    # kernel holds with other data (refused: EEXIST).
    clash = calls[2].flows()[0]
    key = f"{clash.sender.ip} . {clash.sender.port} . {clash.relay.ip} . {clash.relay.port}"
    lab.run("relay", "nft", f"add element ip lrkp dnat_to {{ {key} : 10.201.9.9 . 9 }}")
    ghost = media(9, Endpoint.parse("10.201.1.99", 999), callees[1].endpoint).flows()
    changes = [
        ElementChange(c.call_id, add=c.flows(), delete=ghost if n == 1 else ())
        for n, c in enumerate(calls)
    ]
    results = dataplane.nft.change_many(changes)
    assert [r is None for r in results] == [True, True, False, True], results
    assert "EEXIST" in str(results[2]) or "EBUSY" in str(results[2])
    assert changes[1].missing == 2 * len(ghost)  # each flow: dnat_to and snat_to
    installed = {(f.sender, f.relay) for f in dataplane.nft.installed()}
    for n, call in enumerate(calls):
        keys = {(f.sender, f.relay) for f in call.flows()}
        if n == 2:
            assert installed & keys == {(clash.sender, clash.relay)}  # only the planted one
        else:
            assert keys <= installed
    # The committed calls relay.
    for n in (0, 1, 3):
        callers[n].send(calls[n].caller_relay, b"x")
        assert callees[n].expect(b"x") == calls[n].callee_relay


@pytest.mark.parametrize("missing_first", [True, False], ids=["missing-first", "missing-last"])
def test_a_missing_deletion_does_not_refuse_a_key_moved_in_the_same_change(
    lab: Lab, dataplane: DataPlane, peers: Peers, missing_first: bool
) -> None:
    """A change deletes flow K and adds K with another target (a re-INVITE moves the callee,
    a repair at startup), and one of its other deletions finds nothing. nf_tables then goes
    on through the batch without the deletions it made, and the addition of K clashes
    (EEXIST) whenever K came after the missing element: a consequence, not a refusal."""
    caller, callee, moved = peers("a", 4300), peers("b", 6300), peers("b", 6301)
    before = media(20, caller.endpoint, callee.endpoint)
    after = CallMedia(before.call_id, before.caller, before.caller_relay, moved.endpoint,
                      before.callee_relay)  # fmt: skip
    dataplane.commit(before)
    ghost = media(21, Endpoint.parse("10.201.1.99", 999), callee.endpoint).flows()[:1]
    gone = [*ghost, *before.flows()] if missing_first else [*before.flows(), *ghost]
    change = ElementChange(before.call_id, add=after.flows(), delete=gone)
    assert dataplane.nft.change_many([change]) == [None]
    assert change.missing == 2  # the ghost, in dnat_to and snat_to
    caller.send(after.caller_relay, b"to the moved callee")
    assert moved.expect(b"to the moved callee") == after.callee_relay


def test_reload_over_an_older_table_drops_its_obsolete_chain_and_set(
    lab: Lab, dataplane: DataPlane, peers: Peers
) -> None:
    caller, callee = peers("a", 4300), peers("b", 6300)
    call = media(20, caller.endpoint, callee.endpoint)
    dataplane.commit(call)
    # The previous release's rules (with `unmark` and `seen`), loaded over the table.
    old = subprocess.run(["git", "-C", str(REPO), "show", "0feb5f9:rules/lrkp.nft"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    path = Path(lab.run("relay", "mktemp").stdout.strip())
    try:
        path.write_text(old)
        lab.run("relay", "nft", "-f", str(path))
    finally:
        path.unlink()
    listing = dataplane.nft.listing()
    assert "chain unmark" in listing and "set seen" in listing
    with lab.inside("relay"):
        dataplane.load([INTERNAL_IP, EXTERNAL_IP], PORTS, 60)
    listing = dataplane.nft.listing()
    assert "chain unmark" not in listing and "set seen" not in listing
    caller.send(call.caller_relay, b"still")  # the call's elements survived the reload
    assert callee.expect(b"still") == call.callee_relay
    with lab.inside("relay"):
        dataplane.load([INTERNAL_IP, EXTERNAL_IP], PORTS, 60)  # nothing obsolete: fine


def test_lost_error_replies_never_pass_for_a_commit(
    lab: Lab, dataplane: DataPlane, peers: Peers
) -> None:
    """Error replies that overflow the socket (each quotes its request) are lost: the batch
    was aborted, so no call may be reported committed."""
    callee = peers("b", 6400).endpoint
    calls = [media(40 + n, Endpoint.parse("10.201.1.10", 4400 + n), callee) for n in range(2)]
    ghosts = [
        f
        for n in range(60)
        for f in media(60 + n, Endpoint.parse("10.201.1.98", 1000 + n), callee).flows()
    ]
    changes = [ElementChange(c.call_id, add=c.flows(), delete=ghosts) for c in calls]
    sock = dataplane.nft._batch._sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # the kernel's minimum
    results = dataplane.nft.change_many(changes)
    assert all(isinstance(r, KernelError) and "ENOBUFS" in str(r) for r in results), results
    installed = {(f.sender, f.relay) for f in dataplane.nft.installed()}
    assert not installed & {(f.sender, f.relay) for c in calls for f in c.flows()}
    # With room for the replies, the same changes commit (the deletions counted as gone).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    changes = [ElementChange(c.call_id, add=c.flows(), delete=ghosts) for c in calls]
    assert dataplane.nft.change_many(changes) == [None, None]
    assert changes[0].missing == changes[1].missing == 2 * len(ghosts)
