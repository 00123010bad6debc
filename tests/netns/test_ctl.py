"""`lrkp-ctl` against the real daemon, run as an operator would: inside the node's network
namespace, with no options; and the call summary line against what the parties counted."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

from lrkp_lab.calls import CONTROL, KAMAILIO_IP, NODE_ARGS, Call, Stream, burst, running_node
from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, Node
from lrkp_lab.parties import Peers
from lrkp_tsl.media import Endpoint
from tests import nobody

CTL = (sys.executable, "-m", "lrkp_tsl.ctl")
HEADERS = 28  # IPv4 + UDP: conntrack counts IP bytes


def ctl(lab: Lab, *args: str) -> tuple[int, str, str]:
    result = lab.run("relay", *CTL, *args, check=False)
    return result.returncode, result.stdout, result.stderr


def sessions(lab: Lab) -> dict[str, dict[str, Any]]:
    code, out, err = ctl(lab, "sessions", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    return {row["call_id"]: row for row in rows}


def summary(node: Node, call_id: str) -> tuple[str, list[int]]:
    """(the reason text, [a->b packets, a->b bytes, b->a packets, b->a bytes]) of the call's
    summary line (logged just after the reply to the command that ended the call)."""
    node.wait_log(f"[{call_id}] removed: ", 5.0)
    output = node.output()
    match = re.search(
        rf"\[{re.escape(call_id)}\] removed: (.*?); lasted [\d.]+ s; "
        r"caller->callee (\d+) packets (\d+) bytes, callee->caller (\d+) packets (\d+) bytes; "
        r"learned caller \S+, callee \S+$",
        output,
        re.MULTILINE,
    )
    assert match, output[-3000:]
    return match.group(1), [int(match.group(n)) for n in range(2, 6)]


def counted(stream: Stream) -> tuple[int, int]:
    """(packets, IP bytes) that arrived at the receiver."""
    sizes = [len(b"%s-%d" % (stream.tag, seq)) + HEADERS for seq in stream.arrivals]
    return len(sizes), sum(sizes)


def test_sessions_show_counters_grow_delete_stops_media_and_summary_matches(
    lab: Lab, peers: Peers
) -> None:
    with running_node(lab, *NODE_ARGS) as node:
        kamailio = Controller(lab, "sip", KAMAILIO_IP)
        try:
            caller, callee = peers("a", 4300), peers("b", 6300)
            call = Call(kamailio, caller, callee, 20300, "ctl-call-1@lab")
            forward = Stream(caller, call.caller_relay, callee, b"A").start()
            backward = Stream(callee, call.callee_relay, caller, b"B").start()
            deadline = time.monotonic() + 10
            while not (forward.arrivals and backward.arrivals) and time.monotonic() < deadline:
                time.sleep(0.05)
            first = sessions(lab)["ctl-call-1@lab"]
            time.sleep(1.0)
            second = sessions(lab)["ctl-call-1@lab"]
            forward.stop()
            backward.stop()
            assert not forward.lost() and not backward.lost()

            # Listed with the addresses it learned, and counters that grow.
            assert first["caller"]["learned"] == str(caller.endpoint)
            assert first["callee"]["learned"] == str(callee.endpoint)
            assert first["caller"]["sdp"] == str(caller.endpoint)
            assert first["caller"]["relay"] == str(call.caller_relay)
            for direction in ("caller_to_callee", "callee_to_caller"):
                assert 0 < first[f"{direction}_packets"] < second[f"{direction}_packets"]
                assert 0 < first[f"{direction}_bytes"] < second[f"{direction}_bytes"]
            assert second["age"] > first["age"]
            assert second["media"] == "live" and second["idle"] is not None

            code, text, err = ctl(lab, "sessions")
            assert code == 0, err
            assert "ctl-call-1@lab" in text and f"-> {caller.endpoint}" in text
            code, text, err = ctl(lab, "show", "ctl-call-1@lab", "--json")
            assert code == 0, err
            shown = json.loads(text)
            assert shown["caller_to_callee_packets"] == len(forward.arrivals)
            # Both parties sent RTP only: each is heard on RTP; neither is "learned" on RTCP
            # at its SDP port + 1, though the node relays RTCP there (trusted, reachable).
            for side, party in (("caller", caller), ("callee", callee)):
                assert shown[side]["latching"] == "trusted", shown[side]  # reachable
                assert shown[side]["learned"] == str(party.endpoint), shown[side]
                assert shown[side]["latching_rtcp"] == "trusted", shown[side]
                assert shown[side]["learned_rtcp"] is None, shown[side]
            code, text, err = ctl(lab, "show", "ctl-call-1@lab")
            assert code == 0, err
            assert f"RTP trusted {caller.endpoint}, RTCP trusted, nothing heard yet" in text
            assert str(caller.endpoint.offset(1)) not in text.split("\n  flow ")[0]
            assert ctl(lab, "show", "no-such-call")[0] == 3

            # Still relaying; then deleted by the operator: no more media, either way.
            burst(caller, call.caller_relay, callee, call.callee_relay, 5, b"last")
            code, text, err = ctl(lab, "delete", "ctl-call-1@lab")
            assert code == 0, err
            caller.send(call.caller_relay, b"after-delete")
            callee.send(call.callee_relay, b"after-delete")
            callee.expect_nothing()
            caller.expect_nothing()
            assert "ctl-call-1@lab" not in sessions(lab)
            assert ctl(lab, "delete", "ctl-call-1@lab")[0] == 3

            # One summary line whose figures are what the parties counted.
            packets_ab, bytes_ab = counted(forward)
            packets_ba, bytes_ba = counted(backward)
            packets_ab += 5
            bytes_ab += sum(len(b"last-%d" % seq) + HEADERS for seq in range(5))
            reason, figures = summary(node, "ctl-call-1@lab")
            assert reason == "deleted by an operator (lrkp-ctl delete)"
            assert figures == [packets_ab, bytes_ab, packets_ba, bytes_ba]

            # A call ended by D gets the same line, with its own reason.
            call2 = Call(kamailio, caller, callee, 20310, "ctl-call-2@lab")
            burst(caller, call2.caller_relay, callee, call2.callee_relay, 7, b"x")
            burst(callee, call2.callee_relay, caller, call2.caller_relay, 3, b"yy")
            call2.delete(kamailio)
            reason, figures = summary(node, "ctl-call-2@lab")
            assert reason == "deleted by the controlling layer (D)"
            x_bytes = sum(len(b"x-%d" % seq) + HEADERS for seq in range(7))
            y_bytes = sum(len(b"yy-%d" % seq) + HEADERS for seq in range(3))
            assert figures == [7, x_bytes, 3, y_bytes]

            # Every counter, the kernel's state, the ruleset explained.
            code, text, err = ctl(lab, "stats", "--json")
            assert code == 0, err
            stats = json.loads(text)
            assert stats["counters"]["calls.removed.operator"] == 1
            assert stats["counters"]["calls.removed.deleted"] == 1
            caller.send(Endpoint(call.caller_relay.ip, 21000), b"nobody-here")  # no call
            time.sleep(0.2)
            code, text, err = ctl(lab, "kernel", "--json")
            assert code == 0, err
            kernel = json.loads(text)
            assert kernel["table_present"] is True and kernel["queue_rule"] is True
            listed = lab.run("relay", "nft", "list", "counter", "ip", "lrkp", "unknown_dropped")
            packets = int(re.search(r"packets (\d+)", listed.stdout).group(1))  # type: ignore[union-attr]
            assert kernel["counters"]["unknown_dropped"] == packets >= 1
            assert kernel["sysctls"]["net.netfilter.nf_conntrack_acct"]["value"] == "1"
            assert kernel["probes"]["socket_lookup"] is True
            assert kernel["ports"]["relay_range_reserved"] is True
            assert "20000-21999" in kernel["ports"]["reserved"]
            code, text, err = ctl(lab, "kernel")
            assert "socket lookup yes" in text and "relay range reserved: yes" in text, text
        finally:
            kamailio.close()


def test_ruleset_explains_each_element(lab: Lab, peers: Peers) -> None:
    with running_node(lab, *NODE_ARGS):
        kamailio = Controller(lab, "sip", KAMAILIO_IP)
        try:
            caller, callee = peers("a", 4320), peers("b", 6320)
            call = Call(kamailio, caller, callee, 20320, "ctl-rules@lab")
            burst(caller, call.caller_relay, callee, call.callee_relay, 2, b"r")
            burst(callee, call.callee_relay, caller, call.caller_relay, 2, b"s")
            code, out, err = ctl(lab, "ruleset", "--json")
            assert code == 0, err
            items = [json.loads(line) for line in out.splitlines()]
            flows = [i for i in items if i["kind"] == "flow"]
            rtp = {(f["side"], f["stream"]) for f in flows if f["call_id"] == "ctl-rules@lab"}
            assert rtp == {("caller", "rtp"), ("callee", "rtp"), ("caller", "rtcp"),
                           ("callee", "rtcp")}  # fmt: skip
            learning = [i for i in items if i["kind"] == "learning"]
            assert all(i["call_id"] == "ctl-rules@lab" for i in learning)
            code, text, err = ctl(lab, "ruleset")
            assert code == 0, err
            assert "chain relay_port" in text
            assert f"{caller.endpoint} . {call.caller_relay} -> dnat {callee.endpoint}" in text
            assert "call 'ctl-rules@lab': caller's rtp" in text
        finally:
            kamailio.close()


def test_no_node_running_one_clear_line_and_exit_1(lab: Lab) -> None:
    code, out, err = ctl(lab, "sessions")
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "no node is listening on @lrkp-tsl" in err and "Traceback" not in err


def test_only_root_may_use_the_management_socket(lab: Lab) -> None:
    """lrkp-ctl run as nobody (a copy every user can read: the checkout may be private)."""
    with running_node(lab, *NODE_ARGS), nobody.readable_copy() as base:
        result = lab.run("relay", *nobody.argv(base, "-m", "lrkp_tsl.ctl", "sessions"), check=False)
        assert result.returncode == 4, result.stderr
        assert "uid 65534 is not root" in result.stderr
        code, _out, err = ctl(lab, "sessions")
        assert code == 0, err


def test_json_logs_carry_the_call_summary(lab: Lab, peers: Peers) -> None:
    with running_node(lab, *NODE_ARGS, "--log-format", "json") as node:
        kamailio = Controller(lab, "sip", KAMAILIO_IP)
        try:
            caller, callee = peers("a", 4340), peers("b", 6340)
            call = Call(kamailio, caller, callee, 20340, "ctl-json@lab")
            burst(caller, call.caller_relay, callee, call.callee_relay, 4, b"j")
            call.delete(kamailio)
        finally:
            kamailio.close()
    output = node.output().splitlines()
    lines = [json.loads(line) for line in output]  # every line is one JSON object
    (ended,) = [line for line in lines if line.get("event") == "call_ended"]
    assert ended["call_id"] == "ctl-json@lab" and ended["reason"] == "deleted"
    assert ended["caller_to_callee_packets"] == 4
    assert ended["caller_to_callee_bytes"] == sum(len(b"j-%d" % n) + HEADERS for n in range(4))
    assert ended["callee_to_caller_packets"] == 0
    # The caller sent RTP only: heard there, not on RTCP (its SDP port + 1 was only trusted).
    assert ended["caller_learned"] == [str(caller.endpoint), None]
    assert ended["callee_learned"] == [None, None]  # the callee sent nothing


def raw_ping(kamailio: Controller) -> bytes | None:
    """The node's answer to `P` as it is on the wire: b"" is a draining node's."""
    kamailio.send(b"%d_1 P" % os.getpid(), CONTROL)
    return kamailio.receive(2.0)


def test_a_drain_is_kept_across_a_restart_until_undrain(lab: Lab) -> None:
    kamailio = Controller(lab, "sip", KAMAILIO_IP)
    node = Node(lab, "relay", *NODE_ARGS)
    try:
        node.wait_ready(CONTROL, kamailio)
        code, out, err = ctl(lab, "drain")
        assert code == 0 and "drained across a restart" in out and not err, (out, err)
        # What it says is what the node does on the wire (and what `ping` reports).
        assert "P is answered with an empty datagram" in out and "unanswered" not in out
        assert raw_ping(kamailio) == b""
        assert "DRAINING (P answered with an empty datagram)" in ctl(lab, "ping")[1]
        assert "P is answered with an empty datagram" in node.output()
        assert (node.state / "draining").is_file()
        node = node.restart()
        deadline = time.monotonic() + 15
        while kamailio.command(b"G", CONTROL, wait=0.3) is None:  # G: answered drained too
            assert time.monotonic() < deadline, node.output()
        assert raw_ping(kamailio) == b""
        assert "starting drained" in node.output()
        assert "DRAINING" in ctl(lab, "ping")[1]
        assert ctl(lab, "undrain")[0] == 0
        assert not (node.state / "draining").exists()
        node = node.restart()
        node.wait_ready(CONTROL, kamailio)  # P answered with PONG again
        assert "DRAINING" not in ctl(lab, "ping")[1]
    finally:
        kamailio.close()
        node.close()


def test_a_drain_that_cannot_be_saved_still_drains_and_says_so(lab: Lab) -> None:
    kamailio = Controller(lab, "sip", KAMAILIO_IP)
    node = Node(lab, "relay", *NODE_ARGS)
    blocker = node.state / "draining"
    try:
        node.wait_ready(CONTROL, kamailio)
        blocker.mkdir()
        (blocker / "in-the-way").touch()  # the flag cannot be written over a directory
        code, _out, err = ctl(lab, "drain")
        assert code == 0 and "not saved" in err and "would not be draining" in err, err
        assert raw_ping(kamailio) == b""  # drained all the same
        assert "drain state not saved" in node.output()
        assert sorted(p.name for p in node.state.iterdir() if "drain" in p.name) == ["draining"]
    finally:
        kamailio.close()
        node.close()
