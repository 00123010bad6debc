"""Conntrack capacity: will the kernel have an entry for the next call's streams?

Every relayed stream is one conntrack entry (both directions of RTP, or of RTCP, ride one
entry), so a call needs up to 2 (docs/sizing.md measures it). When the table is full the
kernel drops the first packet of a new stream ("nf_conntrack: table full, dropping packet"
in dmesg, nowhere else): the call gets no media, and nothing in the node's own path sees
it. So the node reads, at start and every CHECK_INTERVAL:

- `nf_conntrack_max` (the limit; on 6.x kernels global, writable only from the host's
  initial network namespace) and `nf_conntrack_count` (entries in use in the node's own
  namespace: the kernel compares that count with the limit);
- `/proc/net/stat/nf_conntrack`: per CPU, the `insert_failed`, `drop` and `early_drop`
  counters of this namespace (summed here): new entries the kernel could not keep.

Three small /proc reads, never a dump; the cost does not grow with the calls. It warns
(rate-limited) when the calls the relay range can still take could need more entries than
are free, saying which sysctl to raise and to what, and whenever the kernel dropped new
entries; `metrics.py` exports the same figures. The decisions are pure (`Capacity`); the
reader is `read_fill`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lrkp_tsl.media import PortRange

log = logging.getLogger("lrkp_tsl.conntrack")

# A call holds 4 relay ports (RTP and RTCP on each side; Kamailio's gt=0) and up to 2
# conntrack entries (one per stream, both directions on it).
PORTS_PER_CALL = 4
ENTRIES_PER_CALL = 2
CHECK_INTERVAL = 10.0  # seconds between two reads (start included)
WARN_EVERY = 600.0  # a lasting shortfall is logged again after this long
DROPS_WARN_EVERY = 60.0  # drops are logged at most this often (with how many since)
FAILURES = ("insert_failed", "drop", "early_drop")  # columns of /proc/net/stat/nf_conntrack
PROC = Path("/proc")
SYSCTL = "net.netfilter.nf_conntrack_max"


@dataclass(frozen=True, slots=True)
class Fill:
    """The conntrack table of the node's network namespace, as read once."""

    count: int  # entries in use (nf_conntrack_count)
    max: int  # nf_conntrack_max; 0: no limit
    failures: dict[str, int]  # FAILURES -> total over CPUs since the namespace began


def range_calls(ports: PortRange) -> int:
    """How many calls the relay range holds (gt=0, the most entries per port)."""
    return (ports.end - ports.start + 1) // PORTS_PER_CALL


def shortfall(fill: Fill, calls_in_range: int, live_calls: int) -> int:
    """Entries the calls the range can still take could need beyond what is free (0: room
    enough). Each live call already holds its entries (they are in `count`)."""
    if fill.max == 0:
        return 0
    needed = ENTRIES_PER_CALL * max(0, calls_in_range - live_calls)
    return max(0, needed - max(0, fill.max - fill.count))


def advice(fill: Fill, ports: PortRange, live_calls: int, missing: int) -> str:
    """The warning for a shortfall: what is short, and the sysctl to raise, to what."""
    target = -(-(fill.max + missing) // 1024) * 1024  # rounded up to a multiple of 1024
    more = max(0, range_calls(ports) - live_calls)
    return (
        f"conntrack may run out: {max(0, fill.max - fill.count)} of {SYSCTL}={fill.max} "
        f"entries are free ({fill.count} in use), and the relay range {ports} can take "
        f"{more} more calls, which need up to {ENTRIES_PER_CALL * more} ({ENTRIES_PER_CALL} "
        "per call: RTP and RTCP). A full table drops new streams silently (calls without "
        f"media). Raise it by at least {missing}: sysctl -w {SYSCTL}={target} in the host's "
        "initial network namespace (the limit is global), and in /etc/sysctl.d/ to keep it "
        "(docs/sizing.md)"
    )


class Capacity:
    """Decides what to log from successive reads (pure: the time is passed in)."""

    def __init__(self, ports: PortRange) -> None:
        self.ports = ports
        self._warned_at: float | None = None  # when the shortfall was last logged
        self._failures: dict[str, int] | None = None  # as of the last read
        self._dropped_since = 0  # new failures not logged yet
        self._drops_logged_at: float | None = None

    def check(self, fill: Fill, live_calls: int, now: float) -> list[tuple[int, str]]:
        """(log level, message) to log for this read."""
        out: list[tuple[int, str]] = []
        missing = shortfall(fill, range_calls(self.ports), live_calls)
        if missing:
            if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
                out.append((logging.WARNING, advice(fill, self.ports, live_calls, missing)))
                self._warned_at = now
        elif self._warned_at is not None:
            out.append(
                (
                    logging.INFO,
                    f"conntrack has room again: {fill.max - fill.count} of {SYSCTL}={fill.max} "
                    "entries free, enough for every call the relay range can take",
                )
            )
            self._warned_at = None
        if self._failures is not None:
            self._dropped_since += sum(
                max(0, fill.failures.get(k, 0) - self._failures.get(k, 0)) for k in FAILURES
            )
        self._failures = dict(fill.failures)
        recent = (
            self._drops_logged_at is not None and now - self._drops_logged_at < DROPS_WARN_EVERY
        )
        if self._dropped_since and not recent:
            out.append(
                (
                    logging.ERROR,
                    f"conntrack could not keep {self._dropped_since} new entries "
                    f"(insert_failed/drop/early_drop; {fill.count} in use, {SYSCTL}="
                    f"{fill.max}): new streams lost their first packets or all of them; "
                    f"raise {SYSCTL} (docs/sizing.md)",
                )
            )
            self._dropped_since = 0
            self._drops_logged_at = now
        return out


def read_failures(text: str) -> dict[str, int]:
    """FAILURES summed over the CPUs of /proc/net/stat/nf_conntrack (a header line of
    column names, then one line of hexadecimal values per CPU)."""
    lines = text.split("\n")
    names = lines[0].split()
    totals = dict.fromkeys(FAILURES, 0)
    for line in lines[1:]:
        values = line.split()
        if len(values) != len(names):
            continue
        for name in FAILURES:
            if name in names:
                totals[name] += int(values[names.index(name)], 16)
    return totals


def read_fill(proc: Path = PROC) -> Fill | None:
    """The conntrack table of the caller's network namespace; None if the kernel has no
    conntrack here (the module not loaded yet: it has nothing to run out of)."""
    netfilter = proc / "sys" / "net" / "netfilter"
    try:
        count = int((netfilter / "nf_conntrack_count").read_text())
        limit = int((netfilter / "nf_conntrack_max").read_text())
        stat = (proc / "net" / "stat" / "nf_conntrack").read_text()
    except (OSError, ValueError):
        return None
    return Fill(count, limit, read_failures(stat))
