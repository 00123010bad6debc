"""Log lines caused by remote input, bounded: the first few in full, then counts. Pure.

Whoever can reach the node's ports decides how often a bad command, a refused sender or a
stranger's packet happens; a log line per event would let them fill the disk and drown
what the operator needs to see. Per kind (e.g. "bad request"), the first `burst` events of
each `interval` are logged in full; the rest are counted, and one summary line per kind
says how many were not shown, when the interval is over (`flush`, driven by the caller's
clock: pure, no timer of its own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

BURST = 5
INTERVAL = 60.0


@dataclass(slots=True)
class _Window:
    started: float
    shown: int = 0
    hidden: int = 0


class RateLimitedLog:
    def __init__(
        self, logger: logging.Logger, burst: int = BURST, interval: float = INTERVAL
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._windows: dict[str, _Window] = {}

    def log(self, now: float, level: int, kind: str, message: str, *args: object) -> bool:
        """Log `message` unless `kind` used up its burst this interval; True if logged."""
        window = self._windows.get(kind)
        if window is not None and now - window.started >= self.interval:
            self._summarise(kind, window)
            window = None
        if window is None:
            window = self._windows[kind] = _Window(now)
        if window.shown < self.burst:
            window.shown += 1
            self.logger.log(level, message, *args)
            return True
        window.hidden += 1
        return False

    def next_flush(self) -> float | None:
        """When a summary is due (the earliest window with hidden lines ends)."""
        due = [w.started + self.interval for w in self._windows.values() if w.hidden]
        return min(due, default=None)

    def flush(self, now: float) -> None:
        """Write the summaries of every window that is over."""
        for kind, window in list(self._windows.items()):
            if now - window.started >= self.interval:
                self._summarise(kind, window)
                del self._windows[kind]

    def _summarise(self, kind: str, window: _Window) -> None:
        if window.hidden:
            self.logger.warning(
                "%d more %s not logged in the last %g s (%d shown)",
                window.hidden,
                kind,
                self.interval,
                window.shown,
            )
