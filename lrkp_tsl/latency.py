"""How long the node takes to answer a command: a fixed-bucket histogram, filled in the event
loop and read by the metrics endpoint (metrics.py).

Pure and cheap on purpose: one bisect and two additions per command, no lock (only the
event loop writes; a scrape copies it on the loop). Buckets suit a node whose commands take
tens of microseconds to a few milliseconds, with room for a kernel or store that stalls.
"""

from __future__ import annotations

from bisect import bisect_left

BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class Latency:
    """Counts per bucket (non-cumulative; the last one is +Inf), their sum and count."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def copy(self) -> Latency:
        other = Latency()
        other.counts = list(self.counts)
        other.sum = self.sum
        return other

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= it) as Prometheus exposes them, +Inf last."""
        total = 0
        result = []
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            result.append((bound, total))
        return result
