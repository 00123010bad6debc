"""`make run` without a config: a handful of real calls through Kamailio, relayed by the node.

The story a newcomer should take away in one minute: Kamailio (in the `sip` namespace, with
Debian's stock `lrkproxy` module and examples/kamailio.cfg) tells the node (the real
`lrkp-tsl` daemon in the `relay` namespace) about each call; the node writes a few map
elements into its nftables table; from then on the kernel relays the call's RTP by itself
(conntrack), and userspace sees only the first packet of each stream, which tells the node
where a party behind NAT really is. The calls are placed by SIPp (the signalling) and their
media is sent by this script from the SDP ports of each party to the relay address each
party found in its SDP, as a phone does (see lrkp_lab/kamailio.py, reused here).

Kamailio 5.6 never tells the node that a call ended, so the node ends it when its media has
been quiet for the idle timeout (3 s here, 60 s by default): the summary shows both.
Everything is torn down at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from lrkp_lab import kamailio
from lrkp_lab.demoview import Board, render_summary
from lrkp_lab.lab import Lab, address
from lrkp_lab.node import Node
from lrkp_lab.parties import Party
from lrkp_lab.sipmedia import endpoint
from lrkp_tsl.dataplane.conntrack import ConntrackTable
from lrkp_tsl.dataplane.nft import element_comment
from lrkp_tsl.dataplane.nftsets import SetReader
from lrkp_tsl.media import Endpoint, PortRange

RELAY = "relay"
CONTROL = "udp:10.201.1.1:22333"
PORTS = PortRange(20000, 21999)
IDLE = 3.0  # the node's idle timeout in the demo: short, so calls are seen to end
PTIME = 0.02  # one RTP packet every 20 ms each way, like G.711
POLL = 0.25  # how often SIP traces are read and the board is redrawn
KERNEL_POLL = 1.0  # how often conntrack and the nft table are read


@dataclass(frozen=True)
class Plan:
    """One call of the story: who calls whom, when, for how long, and why it is there."""

    number: int
    caller: str
    callee: str
    start: float  # seconds after the first call, at the earliest
    talk: float  # seconds between the answer and the caller's BYE
    note: str


def story(short: bool) -> list[Plan]:
    """Four calls, two at a time; each lab host is in one call at a time (SIPp's port)."""
    talk = 3.0 if short else 14.0
    return [
        Plan(1, "a", "x", 0.0, talk, "internal phone -> external phone (bridged)"),
        Plan(2, "c", "b", 1.0 if short else 4.0, talk, "caller behind a port-remapping NAT"),
        Plan(3, "m", "a", 2.0 if short else 17.0, talk, "external phone -> internal phone"),
        Plan(4, "x", "b", 3.0 if short else 21.0, talk, "external phone -> internal phone"),
    ]


@dataclass
class Direction:
    """RTP one way: what the sender sent and what the receiver got, and from where."""

    sent: int = 0
    received: int = 0
    sources: set[Endpoint] = field(default_factory=set)


@dataclass
class CallState:
    """Everything the board and the summary show about one call."""

    plan: Plan
    state: str = "waiting"  # waiting, ringing, talking, hung up, removed, failed
    call_id: str | None = None
    answered_at: float | None = None
    hung_up_at: float | None = None
    removed_at: float | None = None
    relays: tuple[Endpoint, Endpoint] | None = None  # (caller's relay, callee's relay)
    sdp: tuple[Endpoint, Endpoint] | None = None  # (caller, callee) as their own SDP says
    forward: Direction = field(default_factory=Direction)  # caller -> callee
    backward: Direction = field(default_factory=Direction)  # callee -> caller
    latched: dict[Endpoint, Endpoint] = field(default_factory=dict)  # relay -> sender
    learning: set[Endpoint] = field(default_factory=set)
    node_said: str = ""  # the node's "removed: ..." reason
    node_summary: str = ""  # what else the node logged about the call as it ended
    error: str = ""

    @property
    def label(self) -> str:
        return f"{self.plan.caller} -> {self.plan.callee}"

    @property
    def both_ways(self) -> bool:
        return self.forward.received > 0 and self.backward.received > 0


@dataclass
class KernelView:
    """What the kernel did, read from conntrack and the node's nft counters."""

    per_stream: dict[tuple[Endpoint, Endpoint], int] = field(default_factory=dict)
    queued: int = 0
    dropped: int = 0

    @property
    def relayed(self) -> int:
        """Packets conntrack relayed so far, both ways, including streams already gone."""
        return sum(self.per_stream.values())


class Running:
    """One call in progress: its SIPp pair, its RTP sockets and its counters."""

    def __init__(self, lab: Lab, workdir: Path, plan: Plan, state: CallState) -> None:
        self.lab = lab
        self.plan = plan
        self.state = state
        self.stack = contextlib.ExitStack()
        self.made = self.stack.enter_context(
            kamailio.call(
                lab,
                workdir / f"call{plan.number}",
                caller=plan.caller,
                callee=plan.callee,
                caller_rtp_port=30000 + 4 * plan.number,
                callee_rtp_port=32000 + 4 * plan.number,
                pause_ms=int(plan.talk * 1000),
            )
        )
        self.parties: tuple[Party, Party] | None = None
        self.seq = 0
        state.state = "ringing"

    @property
    def hosts(self) -> set[str]:
        return {self.plan.caller, self.plan.callee}

    def poll_signalling(self, now: float) -> None:
        """Answered? Hung up? Both SIPp processes done? (reads SIPp's message traces)"""
        state, made = self.state, self.made
        if state.state == "ringing":
            caller_sdp, callee_sdp = made.caller_sdp, made.callee_sdp
            if caller_sdp is not None and callee_sdp is not None:
                state.call_id = made.call_id
                state.relays = (endpoint(caller_sdp), endpoint(callee_sdp))
                self.parties = (
                    self.stack.enter_context(
                        _closing(Party(self.lab, made.caller_host, made.caller_rtp[1]))
                    ),
                    self.stack.enter_context(
                        _closing(Party(self.lab, made.callee_host, made.callee_rtp[1]))
                    ),
                )
                state.sdp = (Endpoint.parse(*made.caller_rtp), Endpoint.parse(*made.callee_rtp))
                state.answered_at = now
                state.state = "talking"
        if state.state == "talking" and any(
            m.method == "BYE" and m.direction == "sent" for m in made.caller.messages()
        ):
            self.drain(0.3)
            state.hung_up_at = now
            state.state = "hung up"
        for side in (made.caller, made.callee):
            if side.proc is not None and side.proc.poll() not in (None, 0):
                state.state = "failed"
                state.error = f"sipp {side.name} exited {side.proc.returncode}"

    def sipp_done(self) -> bool:
        return all(
            side.proc is not None and side.proc.poll() is not None
            for side in (self.made.caller, self.made.callee)
        )

    def send(self) -> None:
        """One RTP packet each way, to the relay address each party found in its SDP."""
        if self.state.state != "talking" or self.parties is None or self.state.relays is None:
            return
        caller, callee = self.parties
        to_callee_via, to_caller_via = self.state.relays
        caller.send(to_callee_via, rtp_packet(self.seq, 0xA000 + self.plan.number))
        callee.send(to_caller_via, rtp_packet(self.seq, 0xB000 + self.plan.number))
        self.seq += 1
        self.state.forward.sent += 1
        self.state.backward.sent += 1
        self.drain(0.0)

    def drain(self, wait: float) -> None:
        if self.parties is None:
            return
        caller, callee = self.parties
        for party, direction in ((callee, self.state.forward), (caller, self.state.backward)):
            while (got := party.receive(wait)) is not None:
                direction.received += 1
                direction.sources.add(got[1])

    def close(self) -> None:
        self.stack.close()


@contextlib.contextmanager
def _closing(party: Party) -> Iterator[Party]:
    try:
        yield party
    finally:
        party.close()


def rtp_packet(seq: int, ssrc: int) -> bytes:
    """A G.711 RTP packet: 12-byte header, 160 bytes of silence."""
    return (
        b"\x80\x00"
        + (seq & 0xFFFF).to_bytes(2, "big")
        + ((seq * 160) & 0xFFFFFFFF).to_bytes(4, "big")
        + ssrc.to_bytes(4, "big")
        + b"\xff" * 160
    )


def read_kernel(lab: Lab, conntrack: ConntrackTable, view: KernelView) -> None:
    """Conntrack's per-stream counters (kept after a stream is gone) and nft's counters."""
    for entry in conntrack.entries():
        if entry.orig_dst.port in PORTS or entry.reply_src.port in PORTS:
            key = (entry.orig_src, entry.orig_dst)
            packets = (entry.packets_orig or 0) + (entry.packets_reply or 0)
            view.per_stream[key] = max(packets, view.per_stream.get(key, 0))
    listing = lab.run(RELAY, "nft", "list", "counters", "table", "ip", "lrkp", check=False).stdout
    counters = dict(re.findall(r"counter (\w+) \{\s*packets (\d+)", listing))
    view.queued = int(counters.get("queued", 0))
    view.dropped = int(counters.get("unknown_dropped", 0))


def read_latching(reader: SetReader, calls: list[CallState]) -> None:
    """Who is latched where, from the node's own maps (each element names its Call-ID)."""
    flows = reader.read_flows()
    learning = reader.read_learning()
    for call in calls:
        if call.call_id is None or call.state in ("waiting", "removed"):
            continue
        comment = element_comment(call.call_id)
        for flow in (flow for flow in flows if flow.comment == comment):
            call.latched[flow.relay] = flow.sender
        if call.relays is not None:
            call.learning = {relay for relay in call.relays if relay in learning}


def start_node(lab: Lab) -> Node:
    node = Node(
        lab,
        RELAY,
        "--internal-ip",
        str(address(RELAY, "int")),
        "--external-ip",
        str(address(RELAY, "ext")),
        "--ports",
        str(PORTS),
        "--control",
        CONTROL,
        "--allow",
        str(kamailio.KAMAILIO_INT),
        "--idle-timeout",
        f"{IDLE:g}",
        "--flush-on-exit",
    )
    deadline = time.monotonic() + 20
    while "node up" not in node.output():
        if node.proc.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"the node did not start:\n{node.output()}")
        time.sleep(0.05)
    return node


NODE_EVENTS = {
    "relaying": "Kamailio sent S; the node committed it to the kernel: {}",
    "learned": "the node learned where a party behind NAT really is, from its first packet: {}",
    "relearned": "the node re-latched (NAT rebinding): {}",
}


def narrate(output: str, calls: list[CallState], board: Board, told: set[str]) -> None:
    """The node's own log lines about the demo's calls, shown as events once each."""
    by_id = {call.call_id: call for call in calls if call.call_id}
    for line in output.splitlines():
        found = re.search(r"\[([^\]]+)\] (relaying|learned|relearned):? (.*)$", line)
        if found and line not in told and found.group(1) in by_id:
            told.add(line)
            text = NODE_EVENTS[found.group(2)].format(found.group(3).split(", idle")[0])
            board.event(by_id[found.group(1)], text)


def removals(output: str) -> dict[str, tuple[str, str]]:
    """Call-ID -> (why the node removed it, the rest of its line: the node's own summary of
    the call where it logs one), from the node's log."""
    found = re.findall(r"\[([^\]]+)\] removed: ([^;\n]*)(?:; ([^\n]*))?$", output, re.MULTILINE)
    return {call_id: (why, rest) for call_id, why, rest in found}


def run_story(lab: Lab, workdir: Path, node: Node, plans: list[Plan], board: Board) -> None:
    calls = [CallState(plan) for plan in plans]
    board.calls = calls
    kernel = KernelView()
    board.kernel = kernel
    with lab.inside(RELAY):
        conntrack, reader = ConntrackTable(), SetReader()
    running: list[Running] = []
    told: set[str] = set()  # node log lines already shown as events
    waiting = list(zip(plans, calls, strict=True))
    begin = time.monotonic()
    next_poll = next_kernel = begin
    try:
        while waiting or running or any(c.state == "hung up" for c in calls):
            now = time.monotonic()
            busy = set().union(*(r.hosts for r in running)) if running else set()
            for plan, state in list(waiting):
                if now - begin >= plan.start and not {plan.caller, plan.callee} & busy:
                    waiting.remove((plan, state))
                    running.append(Running(lab, workdir, plan, state))
                    busy |= {plan.caller, plan.callee}
                    board.event(state, "dialling")
            for call in running:
                call.send()
            if now >= next_poll:
                next_poll = now + POLL
                for call in list(running):
                    before = call.state.state
                    call.poll_signalling(now)
                    if call.state.state != before:
                        board.event(call.state, call.state.state)
                    if call.state.state == "failed" or (
                        call.state.state == "hung up" and call.sipp_done()
                    ):
                        call.close()
                        running.remove(call)
                output = node.output()
                narrate(output, calls, board, told)
                said = removals(output)
                for state in calls:
                    if state.state == "hung up" and state.call_id in said:
                        state.node_said, state.node_summary = said[state.call_id]
                        state.removed_at = now
                        state.state = "removed"
                        board.event(state, f"the node removed it: {state.node_said}")
                    elif state.state == "hung up" and now - (state.hung_up_at or now) > IDLE + 10:
                        state.state = "failed"
                        state.error = "the node never removed it"
                if now >= next_kernel:
                    next_kernel = now + KERNEL_POLL
                    read_kernel(lab, conntrack, kernel)
                    read_latching(reader, calls)
                board.refresh(now - begin)
            time.sleep(max(0.0, PTIME - (time.monotonic() - now)))
        read_kernel(lab, conntrack, kernel)
    finally:
        for call in running:
            call.close()
        conntrack.close()
        reader.close()


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "make run: the demo builds network namespaces and needs root"
    for tool in ("kamailio", "sipp", "conntrack", "nft"):
        if shutil.which(tool) is None:
            return f"make run: {tool} is missing (make deps installs it)"
    return None


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrkp_lab.demo", description=__doc__)
    parser.add_argument("--short", action="store_true", help="3-second calls (used by tests)")
    parser.add_argument("--plain", action="store_true", help="no live view: one line per event")
    args = parser.parse_args(argv)
    if (problem := preflight()) is not None:
        print(problem, file=sys.stderr)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):  # even if started with SIGINT ignored
        signal.signal(signum, _interrupt)
    plans = story(args.short)
    board = Board(live=not args.plain, total=plans[-1].start + plans[-1].talk + IDLE + 3)
    workdir = Path(tempfile.mkdtemp(prefix="lrkp-demo-"))
    node: Node | None = None
    try:
        with Lab() as lab:
            board.say(f"lab {lab.tag}: namespaces built (relay, sip, phones a b c x m, NAT box)")
            node = start_node(lab)
            try:  # the node stops cleanly (flushing its state) before the lab goes
                board.say(
                    f"node up in `relay`: internal {address(RELAY, 'int')}, external "
                    f"{address(RELAY, 'ext')}, relay ports {PORTS}, idle timeout {IDLE:g} s"
                )
                with kamailio.kamailio(lab, workdir / "kamailio", [CONTROL]):
                    board.say("Kamailio 5.6 up in `sip` (examples/kamailio.cfg, lrkproxy -> node)")
                    with board.running():
                        run_story(lab, workdir, node, plans, board)
            finally:
                node.stop()
        calls = board.calls
        render_summary(board, calls, node.output() if node else "")
        return 0 if calls and all(c.both_ways and c.state == "removed" for c in calls) else 1
    except KeyboardInterrupt:
        print("\ninterrupted: the lab is torn down", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as error:  # a part of the lab did not come up
        print(f"make run: {error}\nthe lab is torn down", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if node is not None:
            shutil.rmtree(node.state, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
