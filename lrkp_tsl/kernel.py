"""What the engine asks of the kernel, and what the kernel tells it back. Pure: types only.

The engine (engine.py) decides; an object implementing `Kernel` carries the decisions out.
`DataPlane` implements it for real (nftables, conntrack); tests use an in-memory fake that
can fail on demand. Keeping this seam small is what lets every kernel error path be tested
without root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import Endpoint, Flow, InstalledFlow

StreamKey = tuple[Endpoint, Endpoint]
"""A conntrack entry's original direction, (sender, relay endpoint): how the kernel keys a
relayed stream, whichever party sent first."""


@dataclass(frozen=True, slots=True)
class KernelView:
    """What the kernel holds for one call: its flows and its learning relay endpoints."""

    flows: frozenset[Flow] = frozenset()
    learning: frozenset[Endpoint] = frozenset()

    def keys(self) -> frozenset[StreamKey]:
        """The conntrack keys its flows can have (each stream has one entry, keyed by
        whichever side sent first)."""
        return frozenset((flow.sender, flow.relay) for flow in self.flows)


EMPTY = KernelView()

KernelChange = tuple[str, KernelView, KernelView, Iterable["StreamKey"]]
"""(Call-ID, before, after, displace): the arguments of one `Kernel.change`."""

Repair = tuple[str, frozenset["StreamKey"], frozenset[Endpoint], KernelView]
"""(Call-ID, flow keys, learning endpoints, view): one call of `Kernel.repair`."""


class StreamChange(Enum):
    """What happened to a conntrack entry, as the kernel reports it (ctnetlink events)."""

    STARTED = "started"  # a new entry: the stream carries media
    EXPIRED = "expired"  # its timeout ran out: no packet for the whole idle timeout
    REMOVED = "removed"  # deleted before its timeout (by the node, an operator, a flush)


@dataclass(frozen=True, slots=True)
class Counters:
    """A conntrack entry's packets and bytes (IP bytes, as conntrack counts them) in its
    original direction (sent by its first sender) and in its reply direction."""

    packets_orig: int = 0
    bytes_orig: int = 0
    packets_reply: int = 0
    bytes_reply: int = 0


@dataclass(frozen=True, slots=True)
class StreamEvent:
    change: StreamChange
    key: StreamKey
    # What the entry carried, on EXPIRED/REMOVED (the DESTROY event has them while
    # nf_conntrack_acct is on); None otherwise. Not part of the event's identity.
    counters: Counters | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class KernelState:
    """What the kernel holds for the node as a whole, read back at startup.

    `consistent`: read as one snapshot. Else the ruleset changed during the read (the
    node's own commands do, on a busy node): every flow and endpoint in it was in the
    kernel at some instant of the read, but some that were there all along may be missing
    (dataplane/nftsets.py). The engine never concludes anything from an absence in it.
    """

    flows: tuple[InstalledFlow, ...]
    learning: frozenset[Endpoint]
    consistent: bool = True


class Kernel(Protocol):
    """The kernel operations the engine needs. Every method raises KernelError on failure."""

    def change(
        self,
        call_id: str,
        before: KernelView,
        after: KernelView,
        displace: Iterable[StreamKey] = (),
    ) -> None:
        """Make the node's tables hold `after` instead of `before` for one call.

        One nftables transaction when everything to delete is present. If it raises, the
        kernel may hold `before`, `after` or something in between: the caller resyncs.
        Deleting what is already gone is not an error. `displace`: (source, relay) pairs
        the kernel drops from now on while they keep sending (port reuse; see Sync).
        """

    def change_many(self, changes: Sequence[KernelChange]) -> list[KernelError | None]:
        """Several calls' `change`s, in as few nftables transactions as possible (group
        commit); per change, None if it is committed or the error that refused it. One
        refused change never refuses the others (they are committed without it); a refused
        change leaves its call's elements as `change` does when it raises."""

    def repair(self, calls: Sequence[Repair]) -> list[KernelError | None]:
        """Per call: delete the flows with these keys and these learning endpoints (missing
        ones are fine), and add its view, in one transaction with the other calls (a
        refused call is left out, as in `change_many`): the call is whole afterwards
        whatever the kernel held at those keys (another target, or exactly the view)."""

    def install(self, views: Iterable[tuple[str, KernelView]]) -> None:
        """Add many calls' views (Call-ID, view) in few, large transactions: a restart after
        a reboot, or the table reloaded after an operator flushed it. Adding what exists
        is not an error."""

    def remove(self, flows: Iterable[InstalledFlow], learning: Iterable[Endpoint]) -> None:
        """Delete elements that belong to no call (found at startup); missing is fine."""

    def forget(self, keys: Iterable[StreamKey]) -> None:
        """Delete the conntrack entries with these original tuples (missing ones are fine),
        so that the next packet of each stream takes the current NAT binding."""

    def alive(self, keys: Iterable[StreamKey]) -> Mapping[StreamKey, float]:
        """The entries among `keys` that exist, with the seconds left before they expire."""

    def counters(self, keys: Iterable[StreamKey]) -> Mapping[StreamKey, Counters]:
        """The live entries found by `keys` (either direction), by their original tuple,
        with their counters: read just before a call's entries are deleted."""

    def streams(
        self, keys: Iterable[StreamKey]
    ) -> Mapping[StreamKey, tuple[StreamKey, Counters] | None]:
        """The entries `keys` found (either direction), by the key that found each: its
        original tuple and counters, or None if it could not be read. A key absent from the
        result found no entry. Read when calls end, in one exchange for a group of them:
        their summaries, and which of their entries need deleting at all."""

    def is_seen(self, sender: Endpoint, relay: Endpoint) -> bool:
        """True if the flow carried a packet within the NAT-rebinding guard interval."""

    def state(self) -> KernelState:
        """Every flow and learning endpoint in the node's tables (startup reconciliation),
        as one snapshot if the ruleset holds still long enough, else an inconsistent one
        (never an error because the ruleset kept changing)."""
