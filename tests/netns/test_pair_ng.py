"""An active/standby pair keeps calls set up over ng as it keeps lrkproxy calls.

The pair lab of test_pair.py (keepalived, one Redis per node, the VIPs 10.201.1.100 and
10.201.2.100), both nodes serving ng on the control VIP as Kamailio's rtpengine module
reaches them. One ng call with media both ways (the caller `c` behind the port-remapping
NAT, `received-from` its NAT's outside address, as Kamailio sends `$si`), and 50 ng calls
answered but without media yet. The failure: SIGKILL the active's daemon and keepalived,
and take its links down, mid-call.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lrkp_lab.calls import Stream, burst
from lrkp_lab.lab import Lab
from lrkp_lab.ngcalls import NgCall, kamailio_ng, ok, relay_ports
from lrkp_lab.ngpeer import UdpNgPeer
from lrkp_lab.pairlab import EXTERNAL_VIP, INTERNAL_VIP
from lrkp_lab.pairnodes import RATE, Members, running_pair, wait_same_flows
from lrkp_lab.parties import Peers
from lrkp_lab.waiting import wait_for
from lrkp_tsl.media import Endpoint

NG = (str(INTERNAL_VIP), 2223)
IDLE = 30.0  # the quiet calls' idle timeout: they outlive the takeover and the return
QUIET_CALLS = 50
DELETE_DELAY = 12  # seconds: a delete with a delay, sent to the old active, ends on the new


@pytest.fixture
def members(lab: Lab) -> Iterator[Members]:
    with running_pair(lab, idle=IDLE, extra=("--ng", f"udp:{NG[0]}:{NG[1]}")) as made:
        yield made


@pytest.fixture
def kamailio(lab: Lab, members: Members) -> Iterator[UdpNgPeer]:
    with kamailio_ng(lab, "pair", NG) as peer:
        yield peer


def sessions(lab: Lab, host: str) -> list[dict[str, Any]]:
    """`lrkp-ctl --json sessions` on `host`: one row per call."""
    done = lab.run(host, sys.executable, "-m", "lrkp_tsl.ctl", "--json", "sessions")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def relay_endpoints(call: NgCall) -> set[Endpoint]:
    """Every relay endpoint of the call: RTP and RTCP of each side's."""
    return {
        relay.offset(delta)
        for relay in (*call.caller_relays, *call.callee_relays)
        for delta in (0, 1)
    }


def calls_held(members: Members, host: str) -> int:
    return int(members.ctl(host, "ping")["calls"])


def test_a_takeover_keeps_live_and_quiet_ng_calls_and_the_new_active_manages_them(
    lab: Lab, members: Members, kamailio: UdpNgPeer, peers: Peers
) -> None:
    caller, callee = peers("c", 4000), peers("x", 6000)
    live = NgCall(kamailio, caller, callee, "live-ng@lab", kinds=("audio",))
    to_callee, to_caller = live.caller_relays[0], live.callee_relays[0]
    assert to_callee.ip == INTERNAL_VIP and to_caller.ip == EXTERNAL_VIP
    burst(caller, to_callee, callee, to_caller, 1, b"hello")  # the NAT'd caller is learned...
    wait_same_flows(lab, 2.0)  # ...and the standby holds its learned flows too
    quiet_party, quiet_peer = peers("a", 30000), peers("x", 32000)
    quiet = [
        NgCall(kamailio, quiet_party, quiet_peer, f"quiet-{index}@lab", kinds=("audio",))
        for index in range(QUIET_CALLS)
    ]
    answered = time.monotonic()  # the quiet calls' idle clocks start by now
    ring_caller, ring_callee = peers("a", 30200), peers("x", 32200)
    ringing = NgCall(kamailio, ring_caller, ring_callee, "ringing@lab", ("audio",), ringing=True)
    delayed = NgCall(kamailio, ring_caller, ring_callee, "delayed@lab", ("audio",))
    ok(kamailio.request({"command": "delete", "call-id": delayed.call_id,
                         "from-tag": "caller-tag", "delete-delay": DELETE_DELAY}))  # fmt: skip
    delete_sent = time.monotonic()
    quiet_ids = {call.call_id for call in quiet}
    every = {*quiet_ids, live.call_id, ringing.call_id, delayed.call_id}
    wait_for(
        "the standby in sync with every ng call",
        lambda: (
            (status := members.pair_status("relay2"))["in_sync"] and status["calls"] == len(every)
        ),
        10.0,
    )
    forward = Stream(caller, to_callee, callee, b"A", RATE).start()
    backward = Stream(callee, to_caller, caller, b"B", RATE).start()
    time.sleep(1.0)
    members.nodes["relay"].proc.send_signal(signal.SIGKILL)
    members.keepalived.crash("relay")
    members.keepalived.wait_holder("relay2", 2.0)
    new_active = members.nodes["relay2"]
    new_active.wait_log(f"active: this node holds the relay addresses; {len(every)} calls", 2.0)
    time.sleep(2.0)
    forward.stop()
    backward.stop()

    # Media resumed on the new active, through the same relay addresses.
    for stream in (forward, backward):
        gap = stream.longest_gap()
        print(f"{stream.tag!r}: gap {gap:.3f} s, lost {len(stream.lost())} of {len(stream.sent)}")
        assert gap < 1.0, f"media resumed after {gap:.3f} s"
        assert len(stream.lost()) <= gap * RATE + 2, (len(stream.lost()), gap)
        assert stream.foreign == []
    assert forward.sources == {to_caller} and backward.sources == {to_callee}

    # It lists every ng call as ng, with the tags its ng table took from the records, and
    # each quiet call's idle time counts from its answer on the old active, not from the
    # takeover (which came seconds later).
    listed = time.monotonic()
    rows = {row["call_id"]: row for row in sessions(lab, "relay2")}
    assert set(rows) == every
    assert {row["protocol"] for row in rows.values()} == {"ng"}
    tags = {call_id: row["about"]["tags"] for call_id, row in rows.items()}
    assert tags == {**{call_id: ["caller-tag", "callee-tag"] for call_id in every},
                    ringing.call_id: ["caller-tag", "-"]}  # fmt: skip
    assert all(rows[call_id]["idle"] >= listed - answered - 0.1 for call_id in quiet_ids), [
        rows[call_id]["idle"] for call_id in sorted(quiet_ids)[:3]
    ]
    assert set(ok(kamailio.request({"command": "list", "limit": 100}))["calls"]) == every

    # The live call is managed by ng on the new active: a re-INVITE's hold keeps its ports,
    # query answers, delete ends it and nothing is relayed after.
    offer, answer = live.negotiate(("sendonly",))
    assert [Endpoint.parse(*pair) for pair in relay_ports(offer)] == [to_caller]
    assert [Endpoint.parse(*pair) for pair in relay_ports(answer)] == [to_callee]
    burst(caller, to_callee, callee, to_caller, 3, b"held")
    burst(callee, to_caller, caller, to_callee, 3, b"moh")
    queried = live.query()
    assert queried["totals"]["RTP"]["packets"] > 0, queried
    live.delete()
    caller.send(to_callee, b"after delete")
    callee.send(to_caller, b"after delete")
    callee.expect_nothing()
    caller.expect_nothing()
    assert f"[{live.call_id}] removed:" in new_active.output()

    # The call that was ringing through the takeover is answered on the new active: relayed.
    ringing.answered()
    burst(ring_caller, ringing.caller_relays[0], ring_callee, ringing.callee_relays[0], 2, b"r")
    burst(ring_callee, ringing.callee_relays[0], ring_caller, ringing.caller_relays[0], 2, b"r2")
    ringing.delete()

    # The delete with a delay sent to the old active ends the call on the new one, then.
    removed = f"[{delayed.call_id}] removed:"
    wait_for("the delayed delete", lambda: removed in new_active.output(), DELETE_DELAY + 10)
    assert time.monotonic() >= delete_sent + DELETE_DELAY - 0.5  # not sooner
    line = next(text for text in new_active.output().splitlines() if removed in text)
    assert "(delete-delay)" in line, line

    # A new ng call on the new active gets relay ports no followed call holds, and is relayed.
    held = {relay for call in quiet for relay in relay_endpoints(call)}
    new_caller, new_callee = peers("a", 30100), peers("x", 32100)
    new = NgCall(kamailio, new_caller, new_callee, "after-takeover@lab", kinds=("audio",))
    assert not relay_endpoints(new) & held
    burst(new_caller, new.caller_relays[0], new_callee, new.callee_relays[0], 2, b"new")
    burst(new_callee, new.callee_relays[0], new_caller, new.caller_relays[0], 2, b"new-back")
    new.delete()

    # The old active comes back as the standby (its own stale state first): it follows the
    # new active's ng calls, as ng calls, and drops the one deleted meanwhile.
    members.keepalived.recover("relay")
    returning = members.start_node("relay", state=members.nodes["relay"].state)
    returning.wait_log("following: the active node's table loaded", 10.0)
    rows = {row["call_id"]: row for row in sessions(lab, "relay")}
    assert set(rows) == quiet_ids
    assert all(row["about"] == {"tags": ["caller-tag", "callee-tag"]} for row in rows.values())

    # The quiet calls are kept until their idle timeout, counted from their answer on the
    # old active (not from the takeover, not sooner).
    time.sleep(max(0.0, answered + IDLE - 1.5 - time.monotonic()))
    assert {row["call_id"] for row in sessions(lab, "relay2")} == quiet_ids
    assert "removed: no media" not in new_active.output()

    # ...and the quiet calls end by their idle timeout on the new active.
    wait_for("the quiet calls ended by idle", lambda: calls_held(members, "relay2") == 0, 20.0)
    wait_for("the standby followed", lambda: calls_held(members, "relay") == 0, 10.0)
    ended = [line for line in new_active.output().splitlines() if "removed: no media" in line]
    assert len(ended) == QUIET_CALLS, ended[:3]
    # ng forgot them too: a delete of one is answered as rtpengine answers one for a call it
    # does not have.
    gone = kamailio.request(
        {"command": "delete", "call-id": "quiet-0@lab", "from-tag": "caller-tag"}
    )
    assert gone == {"result": "ok", "warning": "Call-ID not found or tags didn't match"}, gone
