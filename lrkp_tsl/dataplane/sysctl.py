"""The kernel settings the relay needs, set (and reported) at startup.

Values are per network namespace: they apply to the namespace the node runs in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lrkp_tsl.errors import KernelError

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
            raise KernelError(
                f"cannot set sysctl {name}={value} ({why}): {exc}; "
                "run as root or with CAP_NET_ADMIN in this network namespace"
            ) from exc
    return changed


def write(name: str, value: str) -> None:
    _path(name).write_text(value + "\n")
