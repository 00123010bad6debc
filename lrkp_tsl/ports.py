"""Which relay ports live calls hold, and where Kamailio should allocate next. Pure.

Kamailio allocates relay ports itself (lrkp-protocol.md §3, §11): from `current_port` of the
node's `G` reply, one block per call (4 ports: callee RTP/RTCP at P, caller at P+2; 2 with
`gt=1`), stepping by the block size; once `current_port >= end_port` it wraps to
`start_port`, without looking at what is in use, and the call at `current_port` is still
allocated, so blocks reach past `end_port`. It reloads `current_port` from `G` when a
process starts (5.6: on every re-enable too). So the node reports in `G`:

- `end_port`: the last block start, aligned with `start_port`, at which a whole 4-port
  block still fits in the node's range (a 2-port block then fits too);
- `current_port`: the first aligned block after the highest relay port in use, so a
  restarted Kamailio starts past the live calls instead of on top of them; if that would
  pass `end_port`, the first aligned block from `start_port` that is entirely free.

The highest port in use is kept in a max-heap with lazy deletion (O(log n) per change, no
scan per `G`); only the wrap case scans, from `start_port`, for a free block.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable

from lrkp_tsl.media import PortRange

BLOCK = 4  # ports per call with gt=0; a gt=1 call takes 2, which a 4-port block also fits


class PortUse:
    def __init__(self, ports: PortRange) -> None:
        self.range = ports
        self._count: Counter[int] = Counter()
        self._top: list[int] = []  # max-heap (negated), lazily cleaned

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, port: object) -> bool:
        return port in self._count

    def take(self, ports: Iterable[int]) -> None:
        for port in ports:
            self._count[port] += 1
            if self._count[port] == 1:
                heapq.heappush(self._top, -port)
        if len(self._top) > 2 * len(self._count) + 1024:
            self._top = [-port for port in self._count]
            heapq.heapify(self._top)

    def release(self, ports: Iterable[int]) -> None:
        for port in ports:
            left = self._count[port] - 1
            if left > 0:
                self._count[port] = left
            else:
                del self._count[port]

    def highest(self) -> int | None:
        while self._top and -self._top[0] not in self._count:
            heapq.heappop(self._top)
        return -self._top[0] if self._top else None

    def last_block(self) -> int:
        """`end_port` for `G`: the last aligned block start with a whole block in range."""
        start, end = self.range.start, self.range.end
        return start + BLOCK * ((end - (BLOCK - 1) - start) // BLOCK)

    def next_block(self) -> int:
        """`current_port` for `G` (see the module docstring)."""
        start, last = self.range.start, self.last_block()
        top = self.highest()
        if top is None:
            return start
        after = start + BLOCK * -(-(top + 1 - start) // BLOCK)  # ceil to the next block
        if start <= after <= last:
            return after
        for block in range(start, last + 1, BLOCK):
            if all(port not in self._count for port in range(block, block + BLOCK)):
                return block
        return start  # every block holds a live call: nothing better to offer
