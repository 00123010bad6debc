"""What the node keeps about its calls across restarts, and the store's interface. Pure.

The engine writes every change of a call here in the same step as the kernel change, and
before it answers `OK` (engine.py); at startup it reads everything back and reconciles it
with the kernel. `SqliteStore` (store.py) is the implementation; tests use a dict.
Times are the engine's clock (time.monotonic()); the store converts them to wall-clock
time on disk, so they survive a reboot of the host and read well in `sqlite3`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lrkp_tsl.session import Call


@dataclass(frozen=True, slots=True)
class StoredCall:
    call: Call
    quiet_since: float | None  # None: it had live media when last written


class Store(Protocol):
    """Every method raises StoreError (lrkp_tsl.errors) when the change is not durable."""

    def put(self, call: Call, quiet_since: float | None) -> None:
        """Insert or replace the call's record."""

    def delete(self, call_id: str) -> None:
        """Forget the call (no error if unknown)."""

    def set_quiet(self, call_id: str, quiet_since: float | None) -> None:
        """Record that the call turned quiet (at `quiet_since`) or live (None)."""

    def load(self) -> list[StoredCall]:
        """Every stored call."""
