"""What `make run` shows: a live board while the calls run, and a summary at the end.

Kept apart from demo.py (which drives the lab) so the story's wording lives in one place.
With a terminal the board redraws in place (rich); without one (a test, a pipe, `--plain`)
each event is one line, and the summary is the same text either way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from lrkp_lab.demo import CallState, KernelView
    from lrkp_tsl.media import Endpoint

INTRO = (
    "Kamailio (namespace `sip`) tells the node (namespace `relay`) about each call with one "
    "`S` command when the call is answered. The node writes a few elements into its nftables "
    "table, and from then on the [b]kernel[/b] relays the call's RTP (conntrack NAT): no "
    "socket, no copy to userspace. Only the first packet of a stream from a party the node "
    "cannot reach at its SDP address goes up to the node (NFQUEUE), which learns where that "
    "party really is (its NAT) and lets the packet through."
)


class Board:
    """The live view: calls, media counters, what the kernel did, a progress bar."""

    def __init__(self, live: bool, total: float) -> None:
        self.console = Console(highlight=False)
        self.live = live and self.console.is_terminal
        self.total = total
        self.calls: list[CallState] = []
        self.kernel: KernelView | None = None
        self.events: list[str] = []
        self.elapsed = 0.0
        self._live: Live | None = None
        self._started = time.monotonic()

    def say(self, text: str) -> None:
        self.console.print(Text(text), soft_wrap=True)

    def event(self, call: CallState, what: str) -> None:
        line = f"{time.monotonic() - self._started:6.1f} s  call {call.plan.number} "
        line += f"({call.label}): {what}"
        self.events = [*self.events[-5:], line]
        if self._live is None:
            self.console.print(Text(line), soft_wrap=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        if not self.live:
            self.console.print(Text.from_markup(INTRO), soft_wrap=True)
            self.console.print(Text("calls placed; one line per event (no terminal for a view)"))
            yield
            return
        with Live(self._render(), console=self.console, refresh_per_second=4) as live:
            self._live = live
            try:
                yield
            finally:
                self._live = None

    def refresh(self, elapsed: float) -> None:
        self.elapsed = elapsed
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Group:
        table = Table(expand=True, title="calls", title_justify="left")
        for column in (
            "#",
            "call",
            "state",
            "caller -> callee\n[dim]received/sent[/dim]",
            "callee -> caller\n[dim]received/sent[/dim]",
            "latched: sender -> relay port",
        ):
            table.add_column(column, no_wrap=column in ("#", "state"))
        for call in self.calls:
            table.add_row(
                str(call.plan.number),
                f"{call.label}\n[dim]{call.plan.note}[/dim]",
                _state(call.state),
                f"{call.forward.received}/{call.forward.sent}",
                f"{call.backward.received}/{call.backward.sent}",
                _latched(call),
            )
        live = sum(1 for c in self.calls if c.state in ("talking", "hung up"))
        kernel = self.kernel
        lines = Text.from_markup(
            f"calls live in the node: [b]{live}[/b]    packets relayed by the kernel "
            f"(conntrack counters): [b green]{kernel.relayed if kernel else 0}[/b green]\n"
            f"of which first went up to the node (NFQUEUE, `queued`): [b yellow]"
            f"{kernel.queued if kernel else 0}[/b yellow]    dropped, no call "
            f"(`unknown_dropped`): {kernel.dropped if kernel else 0}"
        )
        bar = ProgressBar(total=self.total, completed=min(self.elapsed, self.total))
        return Group(
            Panel(Text.from_markup(INTRO), title="what you are looking at"),
            table,
            lines,
            bar,
            Text("\n".join(self.events), style="dim"),
        )


def _state(state: str) -> str:
    colour = {"talking": "green", "failed": "red", "removed": "dim", "ringing": "yellow"}
    return f"[{colour.get(state, 'white')}]{state}[/]"


def _latched(call: CallState) -> str:
    if call.relays is None:
        return "-"
    parts = []
    for who, relay in ((call.plan.caller, call.relays[0]), (call.plan.callee, call.relays[1])):
        sender = call.latched.get(relay)
        if sender is not None:
            learned = call.sdp is not None and sender not in call.sdp
            note = " [yellow](learned: NAT)[/yellow]" if learned else ""
            parts.append(f"{who} {sender} -> :{relay.port}{note}")
        elif relay in call.learning:
            parts.append(f"{who} learning on {relay}")
    return "\n".join(parts) or "-"


def _sources(sources: set[Endpoint]) -> str:
    return ", ".join(sorted(map(str, sources))) or "nowhere"


def summary_lines(calls: list[CallState], kernel: KernelView | None) -> list[str]:
    """The summary as plain lines (tests read them): one block per call, then totals."""
    lines = ["", "summary"]
    for call in calls:
        plan = call.plan
        lines.append(f"call {plan.number}: {call.label}  ({plan.note})")
        lines.append(f"  Call-ID    {call.call_id or '-'}")
        for name, direction in (
            (f"{plan.caller} -> {plan.callee}", call.forward),
            (f"{plan.callee} -> {plan.caller}", call.backward),
        ):
            lost = direction.sent - direction.received
            lines.append(
                f"  {name:<10} {direction.sent} RTP packets sent, {direction.received} received"
                f" ({lost} lost), from {_sources(direction.sources)}"
            )
        lines.extend(_latching_lines(call))
        lines.extend(_ending(call))
        verdict = "media relayed both ways" if call.both_ways else "NO MEDIA in some direction"
        lines.append(f"  verdict    {verdict}{'; ' + call.error if call.error else ''}")
    if kernel is not None:
        lines += [
            "",
            f"kernel: {kernel.relayed} packets relayed (conntrack counters, every call, both "
            f"ways); {kernel.queued} of them went up to the node first (nft counter `queued`: "
            "the first packets of the NAT'd caller's call); the rest never left the kernel",
        ]
    return lines


def _latching_lines(call: CallState) -> list[str]:
    if call.relays is None or call.sdp is None:
        return ["  latched    -"]
    lines = []
    for index, (who, relay, sdp) in enumerate(
        (
            (call.plan.caller, call.relays[0], call.sdp[0]),
            (call.plan.callee, call.relays[1], call.sdp[1]),
        )
    ):
        sender = call.latched.get(relay)
        head = "  latched    " if index == 0 else "             "
        if sender is None:
            lines.append(f"{head}{who}: never latched on {relay}")
        elif sender == sdp:
            lines.append(f"{head}{who} at {sender} (its SDP address) sends to {relay}")
        else:
            lines.append(
                f"{head}{who} at {sender} sends to {relay}: its SDP said {sdp}, the node "
                "learned the NAT's address from its first packet"
            )
    return lines


def _ending(call: CallState) -> list[str]:
    if call.hung_up_at is None or call.answered_at is None:
        return [f"  ended      {call.state}"]
    lines = [
        f"  ended      {call.plan.caller} hung up (BYE) after "
        f"{call.hung_up_at - call.answered_at:.1f} s of media"
    ]
    if call.removed_at is not None:
        lines.append(
            f"             the node removed it {call.removed_at - call.hung_up_at:.1f} s later: "
            f"{call.node_said} (Kamailio 5.6 sends no D)"
        )
    if call.node_summary:
        lines.append(f"  node said  {call.node_summary}")
    return lines


def render_summary(board: Board, calls: list[CallState], node_log: str) -> None:
    """Print the summary and the few lines a newcomer should read twice."""
    for line in summary_lines(calls, board.kernel):
        board.console.print(Text(line), soft_wrap=True)
    learned = [line for line in node_log.splitlines() if "] learned " in line]
    if learned:
        board.console.print(Text("\nthe node's log, latching:"))
        for line in learned:
            board.console.print(Text("  " + line.strip()), soft_wrap=True)
    board.console.print(
        Text(
            "\nlook closer: docs/operator-guide.md shows one call in `nft list table ip lrkp` "
            "and `conntrack -L`.\nrun the node for real: make run CONFIG=/path/to/lrkp-tsl.toml"
        )
    )
