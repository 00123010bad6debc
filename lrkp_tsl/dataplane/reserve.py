"""Keep the relay range out of the ports Linux picks for the host's own sockets.

A socket that does not choose its port (connect() or sendto() before any bind, or a bind to
port 0) gets one from net.ipv4.ip_local_port_range (default 32768-60999), which may overlap
the relay range (default 30000-40000); Linux skips the ports in
net.ipv4.ip_local_reserved_ports. Both settings belong to the network namespace. At startup
the node adds its relay range to the reserved ports, merged with what is there (an entry
of the operator's is never removed), so no socket made after that lands on a relay port.

That cannot move a socket that got its port before the node started (Kamailio often starts
first), nor one bound to a relay port on purpose: the guard lets the traffic of every local
socket through (rules/lrkp.nft, chain relay_port), and that is what makes co-location safe.
The reservation keeps later sockets and calls apart all the same, which matters for a
socket without a peer (sendto() only): the guard can only let its packets through after a
call's own checks, so a call on its port would see them first.

The list is shared by TCP and UDP: every reserved port is one fewer ephemeral port for the
host's outgoing connections. The node never leaves the host fewer than MIN_EPHEMERAL of
them: if its range would, it reserves nothing and says why (the guard still protects every
socket with a peer).

At exit the reservation stays, like the table: live calls keep flowing on those ports and a
restarted node finds it. The ports a node added are on record (added.py), so a flush
(kernel.flush_on_exit at exit, or `lrkp-tsl flush` once the node has stopped) takes back
those a node added in this namespace, this one or an earlier one, and only those: what the
operator reserved stays reserved. The claim holds only while every port of it is still
reserved: a list rewritten since (`sysctl -w`, systemd-sysctl) may hold some of them again
as the operator's own, so a claim with a port missing is dropped and its ports are left to
the operator. A start that fails takes back only what it added itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lrkp_tsl.dataplane import sysctl
from lrkp_tsl.errors import HostError
from lrkp_tsl.media import PortRange

if TYPE_CHECKING:
    from lrkp_tsl.dataplane.added import AddedRecord

log = logging.getLogger("lrkp_tsl.dataplane.reserve")

RESERVED = "net.ipv4.ip_local_reserved_ports"
EPHEMERAL = "net.ipv4.ip_local_port_range"
# Ephemeral ports the node always leaves to the host. Linux's default range has 28,232;
# reserving the default relay range leaves 20,999 of them. A few thousand are plenty for a
# SIP server's own clients (resolvers, NTP, database and HTTP connections: TCP reuses a port
# towards different destinations), far fewer would make connect() fail under load.
MIN_EPHEMERAL = 4096

Ranges = tuple[tuple[int, int], ...]


def normalise(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sorted, with overlapping and adjacent ranges merged."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def parse(text: str) -> Ranges:
    """The kernel's list ("8080,20000-40000", empty for none) as ranges."""
    ranges = []
    for item in text.strip().split(","):
        item = item.strip()
        if not item:
            continue
        first, dash, last = item.partition("-")
        try:
            start, end = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(f"not a port or port range: {item!r}") from None
        if not 0 <= start <= end <= 65535:
            raise ValueError(f"not a port or port range: {item!r}")
        ranges.append((start, end))
    return normalise(ranges)


def render(ranges: Ranges) -> str:
    """As the kernel writes the list: "8080,20000-40000" ("" for none)."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def union(a: Ranges, b: Ranges) -> Ranges:
    return normalise((*a, *b))


def difference(a: Ranges, b: Ranges) -> Ranges:
    """The ports of `a` that are not in `b`."""
    left: list[tuple[int, int]] = []
    for start, end in a:
        for cut_start, cut_end in b:
            if cut_end < start or cut_start > end:
                continue
            if cut_start > start:
                left.append((start, cut_start - 1))
            start = cut_end + 1
            if start > end:
                break
        if start <= end:
            left.append((start, end))
    return normalise(left)


def count(ranges: Ranges) -> int:
    return sum(end - start + 1 for start, end in ranges)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the node finds and what it writes: decided without I/O (`plan`)."""

    before: Ranges  # ip_local_reserved_ports as found
    after: Ranges  # as the node leaves it (== before when it writes nothing)
    ephemeral: tuple[int, int]  # ip_local_port_range
    relay: PortRange
    left_if_reserved: int  # ephemeral ports left with the whole relay range reserved

    @property
    def added(self) -> Ranges:
        return difference(self.after, self.before)

    @property
    def reserved(self) -> bool:
        """Whether the whole relay range is kept out of automatic allocation."""
        return not difference(((self.relay.start, self.relay.end),), self.after)

    @property
    def ephemeral_left(self) -> int:
        """Ports Linux may still hand out by itself."""
        return count(difference((self.ephemeral,), self.after))


def plan(before: Ranges, ephemeral: tuple[int, int], relay: PortRange) -> Plan:
    """Reserve the relay range, unless that leaves the host fewer than MIN_EPHEMERAL ports."""
    wanted = union(before, ((relay.start, relay.end),))
    left = count(difference((ephemeral,), wanted))
    if wanted != before and left < MIN_EPHEMERAL:
        return Plan(before, before, ephemeral, relay, left)
    return Plan(before, wanted, ephemeral, relay, left)


def read_ephemeral() -> tuple[int, int]:
    low, high = sysctl.read(EPHEMERAL).split()
    return int(low), int(high)


class PortReservation:
    """The relay range in ip_local_reserved_ports of this network namespace; `record`, if
    any, keeps which ports are the node's beyond this run (added.py)."""

    def __init__(self, record: AddedRecord | None = None) -> None:
        self.record = record
        self.added: Ranges = ()  # by this run's `apply`
        self.reserved = False  # the whole relay range is reserved (as `apply` left it)

    @property
    def recorded(self) -> Ranges:
        return self.record.added.reserved if self.record is not None else ()

    def apply(self, relay: PortRange) -> Plan:
        """Merge the relay range into the reserved ports; log what was done and why."""
        try:
            found = plan(parse(sysctl.read(RESERVED)), read_ephemeral(), relay)
        except (OSError, ValueError) as exc:
            raise HostError(f"cannot read {RESERVED} or {EPHEMERAL}: {exc}") from exc
        low, high = found.ephemeral
        self.reserved = found.reserved
        if found.added:
            try:
                sysctl.write(RESERVED, render(found.after))
            except OSError as exc:
                raise HostError(
                    f"cannot set sysctl {RESERVED}={render(found.after)}: {exc}; run as root "
                    "or with CAP_NET_ADMIN in this network namespace"
                ) from exc
            self.added = found.added
            log.info(
                "reserved ports %s from automatic port allocation (sysctl %s=%s, was %s): "
                "the host's own sockets get ports outside the relay range; %d of "
                "ip_local_port_range %d-%d remain",
                relay, RESERVED, render(found.after), render(found.before) or "empty",
                found.ephemeral_left, low, high,
            )  # fmt: skip
        elif found.reserved:
            log.info(
                "ports %s already reserved from automatic port allocation (sysctl %s=%s)",
                relay, RESERVED, render(found.before),
            )  # fmt: skip
        else:
            log.warning(
                "not reserving ports %s from automatic port allocation: only %d of the host's "
                "ephemeral ports (ip_local_port_range %d-%d) would remain, and the node leaves "
                "at least %d. Local sockets still get their traffic (the guard lets it "
                "through), but a socket that gets a relay port by itself and has no peer "
                "(sendto() without connect()) shares that port with the calls Kamailio puts "
                "on it. To keep them apart, make ip_local_port_range and `ports` overlap less.",
                relay, found.left_if_reserved, low, high, MIN_EPHEMERAL,
            )  # fmt: skip
        if self.record is not None:
            claim = self.recorded
            if difference(claim, found.before):
                log.info(
                    "reserved ports %s, added by an earlier node here, are no longer all "
                    "reserved: the list was rewritten since, so the node no longer counts "
                    "the rest as its own", render(claim),
                )  # fmt: skip
                claim = ()
            self.record.update(reserved=union(claim, self.added))
        return found

    def release(self, *, recorded: bool = False) -> Ranges:
        """Take back the ports `apply` added (the operator's, and any added since, stay);
        with `recorded`, also those the record says an earlier node of this namespace added
        (a flush), if every one of them is still reserved (else the list was rewritten since:
        those left are left, with a warning). Returns the ports taken back; HostError if the
        sysctl cannot be read or written."""
        ours = union(self.added, self.recorded) if recorded else self.added
        self.added = ()
        self.reserved = False
        if not ours:
            return ()
        try:
            current = parse(sysctl.read(RESERVED))
            remaining = difference(current, ours)
            if recorded and difference(ours, current) and remaining != current:
                log.warning(
                    "not taking back reserved ports %s: %s no longer holds all of them, so "
                    "it was rewritten since a node added them, and those left may be the "
                    "operator's own; remove them by hand if they are not",
                    render(ours), RESERVED,
                )  # fmt: skip
                remaining = current
            elif remaining != current:
                sysctl.write(RESERVED, render(remaining))
        except (OSError, ValueError) as exc:
            raise HostError(
                f"could not take back reserved ports {render(ours)} ({RESERVED}): {exc}"
            ) from exc
        if self.record is not None:
            self.record.update(reserved=difference(self.recorded, ours))
        taken = difference(current, remaining)
        if taken:
            log.info(
                "took back reserved ports %s (sysctl %s=%s)",
                render(taken), RESERVED, render(remaining) or "empty",
            )  # fmt: skip
        return taken
