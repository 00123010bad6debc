"""The NAT-rebinding guard's question, "has this latched sender been silent for 5 s?",
answered from its stream's conntrack entry when a stranger's packet asks it.

Why not a set written by every packet: the previous design refreshed an element of a
dynamic set (`update @seen`) on every relayed packet, which made a relayed packet cost
noticeably more than bare NAT. The question only matters when a stranger's packet reaches
userspace, so the answer is now read then, from what conntrack keeps anyway:

- no entry for the stream: nothing crossed it for a whole idle timeout: silent;
- the entry's timeout (refreshed by a packet either way) says nothing crossed it for
  longer than the guard: silent;
- otherwise the entry's packet counter for the sender's own direction (conntrack
  accounting, a sysctl the node sets) is remembered with the time it was first read at
  that value; the sender is silent once a stranger asks again at least the guard later and
  the counter has not moved. In the usual rebinding (the phone's NAT mapping changes, its
  packets come from the new port from then on, the other party keeps sending to the old
  one) this relatches the leg the guard interval after the move, as before. Only a sender
  that had already been silent for a while, while the other party kept sending, is
  relatched later than before: the guard interval after the stranger's first packet.

Strangers of one call are rare and bounded by the queue's rate limit, so one conntrack
lookup per question costs nothing a relayed packet notices; the memory of counters is
bounded (MAX_REMEMBERED, oldest forgotten first).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lrkp_tsl.media import ConntrackEntry, Endpoint

# The rebinding guard interval (README "Latching"; tests/netns/test_latching.py).
GUARD = 5.0
MAX_REMEMBERED = 65536

Lookup = Callable[[Endpoint, Endpoint], "tuple[ConntrackEntry, float] | None"]


class SilenceWatch:
    """`is_seen(sender, relay)`: True if the flow carried a packet within the guard."""

    def __init__(
        self,
        lookup: Lookup,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        guard: float = GUARD,
    ) -> None:
        self._lookup = lookup
        self.idle_timeout = idle_timeout
        self._clock = clock
        self.guard = guard
        # (sender, relay) -> (packets in the sender's direction, first read at that value)
        self._counts: dict[tuple[Endpoint, Endpoint], tuple[int, float]] = {}

    def is_seen(self, sender: Endpoint, relay: Endpoint) -> bool:
        key = (sender, relay)
        found = self._lookup(sender, relay)
        if found is None:
            self._counts.pop(key, None)
            return False
        entry, left = found
        # `left` is rounded down: the last packet was at most idle - left s ago, and more
        # than idle - left - 1 s ago.
        if self.idle_timeout - left - 1 >= self.guard:
            self._counts.pop(key, None)
            return False
        if (entry.orig_src, entry.orig_dst) == (sender, relay):
            count = entry.packets_orig
        else:
            count = entry.packets_reply
        if count is None:
            return True  # no accounting: the stream is live, so the sender may be too
        now = self._clock()
        known = self._counts.get(key)
        if known is None or known[0] != count:
            self._remember(key, count, now)
            return True
        return now - known[1] < self.guard

    def _remember(self, key: tuple[Endpoint, Endpoint], count: int, now: float) -> None:
        self._counts.pop(key, None)
        if len(self._counts) >= MAX_REMEMBERED:
            for old in list(self._counts)[: MAX_REMEMBERED // 16]:  # insertion order: oldest
                del self._counts[old]
        self._counts[key] = (count, now)
