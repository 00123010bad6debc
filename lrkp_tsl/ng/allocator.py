"""Relay ports the node allocates for ng calls, from the range lrkproxy calls use. Pure.

lrkproxy lets Kamailio allocate (lrkp_tsl/ports.py: the node only records what an `S`
takes, in a `PortUse`, and steers Kamailio's counter with `G`); ng leaves allocation to the
relay. Both protocols serve from one range at once, so ng allocates from the *same*
`PortUse`: a port an lrkproxy call holds is never handed to an ng call, and a port an ng
call holds counts as in use for lrkproxy's `G` (its `current_port` steps past it).

Kamailio's lrkproxy counter climbs from the bottom of the range and wraps blindly, so ng
allocates from the top down: the two meet only when the range is nearly full. An `S` that
still lands on an ng call's ports must be refused, not allowed to replace the ng call as a
stale lrkproxy call would be: a port the node allocated is never stale
(docs/ng-integration.md).

One allocation is a pair: an RTP port P, aligned with the range's start (start + 2k), and
its RTCP port P + 1. Cost: the cursor moves down from where the last allocation ended,
skipping held pairs, so a sparse range costs O(1) per allocation; a nearly full one scans at
most the range once (32,768 pairs for 1-65535) before `PortsExhausted`.
"""

from __future__ import annotations

from typing import Protocol

from lrkp_tsl.errors import LrkpError
from lrkp_tsl.ports import PortUse


class PortsExhausted(LrkpError):
    """No free pair is left in the range; rtpengine answers "Ran out of ports"."""

    code = "no-ports"


class PortPool(Protocol):
    """Where ng relay ports come from. `SharedPortPool` is the node's (and the tests')."""

    def allocate(self) -> int:
        """An RTP port P, with P and P + 1 now held; PortsExhausted if no pair is free."""

    def release(self, port: int) -> None:
        """Give back the pair allocated as `port` (P and P + 1)."""

    def hold(self, port: int) -> None:
        """Hold the pair `port` (P and P + 1) for a call this pool did not allocate it to:
        one a restarted node reads back from its store, or a standby from its active node
        (ValueError if this pool holds it already)."""


class SharedPortPool:
    """Pairs from a `PortUse` shared with lrkproxy calls, allocated from the top down."""

    def __init__(self, use: PortUse) -> None:
        self.use = use
        start, end = use.range.start, use.range.end
        self._first = start
        self._last = start + 2 * ((end - 1 - start) // 2)  # last pair start with P+1 <= end
        self._cursor = self._last
        self._held: set[int] = set()

    @property
    def pairs(self) -> int:
        """How many pairs the range holds."""
        return 0 if self._last < self._first else (self._last - self._first) // 2 + 1

    def __len__(self) -> int:
        """Pairs held by ng calls."""
        return len(self._held)

    def held(self) -> frozenset[int]:
        """The RTP port of every pair held by ng calls."""
        return frozenset(self._held)

    def allocate(self) -> int:
        for _ in range(self.pairs):
            port = self._cursor
            self._cursor = self._cursor - 2 if self._cursor - 2 >= self._first else self._last
            if port not in self.use and port + 1 not in self.use:
                self.use.take((port, port + 1))
                self._held.add(port)
                return port
        raise PortsExhausted(
            f"Ran out of ports: every pair of {self.use.range} is held "
            f"({len(self._held)} by ng calls, the rest by lrkproxy calls)"
        )

    def release(self, port: int) -> None:
        if port not in self._held:
            raise ValueError(f"relay port {port} was not allocated by this pool")
        self._held.discard(port)
        self.use.release((port, port + 1))

    def hold(self, port: int) -> None:
        if port in self._held:
            raise ValueError(f"relay port {port} is held by an ng call already")
        self._held.add(port)
        self.use.take((port, port + 1))
