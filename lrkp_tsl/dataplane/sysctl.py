"""The kernel settings the relay needs, set (and reported) at startup.

Values are per network namespace: they apply to the namespace the node runs in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lrkp_tsl.errors import HostError

log = logging.getLogger("lrkp_tsl.dataplane.sysctl")

# name -> (value, why). Shown in the README; keep the two in step.
REQUIRED = {
    "net.ipv4.ip_forward": (
        "1",
        "relayed packets are DNATed to the other party and forwarded, not delivered locally",
    ),
    "net.netfilter.nf_conntrack_acct": (
        "1",
        "per-stream packet and byte counters (lrkp-ctl, call summaries)",
    ),
    "net.netfilter.nf_conntrack_events": (
        "1",
        "every conntrack entry reports its end (idle expiry is pushed by the kernel); the "
        "default 2 gives events only to entries created while a listener exists, which "
        "misses streams that started while the node was restarting",
    ),
}


def _path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read(name: str) -> str:
    return _path(name).read_text().strip()


def apply_required() -> dict[str, str]:
    """Set every REQUIRED sysctl; returns the previous values of those it changed."""
    changed = {}
    for name, (value, why) in REQUIRED.items():
        try:
            before = read(name)
            if before != value:
                _path(name).write_text(value)
                changed[name] = before
                log.info("sysctl %s=%s (was %s): %s", name, value, before, why)
        except OSError as exc:
            restore(changed)  # all or nothing: a start that fails here leaves none changed
            raise HostError(
                f"cannot set sysctl {name}={value} ({why}): {exc}; "
                "run as root or with CAP_NET_ADMIN in this network namespace"
            ) from exc
    return changed


def write(name: str, value: str) -> None:
    _path(name).write_text(value + "\n")


def restore(changed: dict[str, str]) -> None:
    """Put back the values `apply_required` replaced (a start that failed takes back what it
    changed). Best effort: one that cannot be written is logged, the others still go back."""
    for name, before in changed.items():
        try:
            _path(name).write_text(before)
            log.info("sysctl %s=%s restored (the start failed)", name, before)
        except OSError as exc:
            log.error("sysctl %s: could not restore %s: %s", name, before, exc)
