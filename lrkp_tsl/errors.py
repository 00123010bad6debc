"""Errors that carry a stable code and a human reason.

The code is what a test, a metric label or a controller reply keys on; the reason is what an
operator reads. Neither is ever only in the log.
"""

from __future__ import annotations


class LrkpError(Exception):
    """Base of every error the node raises on purpose."""

    code = "error"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


class MediaError(LrkpError):
    """A call's media description cannot be relayed as given (bad address, port, geometry)."""

    code = "bad-media"


class KernelError(LrkpError):
    """The kernel refused or failed a change; the reason carries what it said."""

    code = "kernel"


class ConfigError(LrkpError):
    """The node's configuration is unusable; the reason names the key, the value and why."""

    code = "config"


class HostError(LrkpError):
    """The host must change before the node can run: a capability, a kernel feature, an
    address, or a queue or port another program holds. Restarting the node will not help,
    so `lrkp-tsl run` exits 2 on it, like on a bad configuration (docs/systemd.md)."""

    code = "host"


class StoreError(LrkpError):
    """The state store could not record a change (disk, permissions, corruption)."""

    code = "store"
