"""Media activity from conntrack counters: which calls moved packets since the last look.

Pure: takes the entries the data plane dumped, tells the call table. A stream's entry is
keyed by its original tuple; new entries and entries whose packet counters moved mean
media flowed. Kernel relaying never wakes userspace, so this poll is how the node learns
that a call is alive (and, by its absence, that a call went quiet).
"""

from __future__ import annotations

from collections.abc import Iterable

from lrkp_tsl.media import ConntrackEntry, Endpoint
from lrkp_tsl.session import CallTable


class MediaActivity:
    def __init__(self) -> None:
        self._packets: dict[tuple[Endpoint, Endpoint], int] = {}

    def observe(self, entries: Iterable[ConntrackEntry], table: CallTable, now: float) -> int:
        """Report calls with new or moving streams to `table`; returns how many streams."""
        packets: dict[tuple[Endpoint, Endpoint], int] = {}
        moving = 0
        for entry in entries:
            call_id = table.owner(entry.orig_dst)
            if call_id is None:
                continue
            key = (entry.orig_src, entry.orig_dst)
            total = (entry.packets_orig or 0) + (entry.packets_reply or 0)
            packets[key] = total
            if self._packets.get(key) != total:
                table.on_media(call_id, now)
                moving += 1
        self._packets = packets
        return moving
