"""What the node keeps about its calls across restarts, and the store's interface. Pure.

The engine writes every change of a call here in the same step as the kernel change, and
before it answers `OK` (engine.py); at startup it reads everything back and reconciles it
with the kernel. `SqliteStore` (store.py) is the implementation; tests use a dict.
Times are the engine's clock (time.monotonic()); the store keeps them as they are, valid
within one boot, and as wall-clock time, which survives a reboot of the host and reads well
in `sqlite3` (store.py says which it reads back when).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from lrkp_tsl.latching import Rule
from lrkp_tsl.media import RTCP_PORT_OFFSET, CallMedia, Endpoint, Stream
from lrkp_tsl.session import Call, Leg

LEGS = ("caller_rtp", "caller_rtcp", "callee_rtp", "callee_rtcp")
LEG_FIELDS = [f"{leg}_{part}" for leg in LEGS for part in ("sdp", "rule", "latched")]
FIELDS = [
    "call_id",
    "caller",
    "caller_relay",
    "callee",
    "callee_relay",
    "idle_timeout",
    "started",
    "quiet_since",
    *LEG_FIELDS,
]
"""A call's record, field by field: the state store's columns, and what a standby node
receives. Endpoints are `ip:port` text, times are wall-clock (Unix) seconds."""


@dataclass(frozen=True, slots=True)
class StoredCall:
    call: Call
    quiet_since: float | None  # None: it had live media when last written
    # Its times were converted from wall-clock time (written before this boot, or by a
    # release that kept no monotonic time): a clock step may have moved them.
    estimated: bool = False


class Store(Protocol):
    """Every method raises StoreError (lrkp_tsl.errors) when the change must not go ahead
    (SqliteStore: the file is locked by another process, for seconds). A store that cannot
    be written at all (disk full, I/O error) keeps the change for later and does not raise:
    the node serves on without durable records (store.py)."""

    def group(self) -> AbstractContextManager[None]:
        """The writes inside share one transaction (group commit: one durable commit for a
        batch of commands). A write that fails fails alone; if the commit fails, StoreError
        and none of the writes inside is durable."""

    def put(self, call: Call, quiet_since: float | None) -> None:
        """Insert or replace the call's record."""

    def delete(self, call_id: str) -> None:
        """Forget the call (no error if unknown)."""

    def set_quiet(self, call_id: str, quiet_since: float | None) -> None:
        """Record that the call turned quiet (at `quiet_since`) or live (None)."""

    def load(self) -> list[StoredCall]:
        """Every stored call."""


@functools.lru_cache(maxsize=65536)
def _text(endpoint: Endpoint) -> str:
    return str(endpoint)


@functools.lru_cache(maxsize=65536)
def _endpoint(text: str) -> Endpoint:
    ip, _, port = text.rpartition(":")
    return Endpoint.parse(ip, port)


def encode(call: Call, quiet_since: float | None, wall_offset: float) -> dict[str, object]:
    """The record of `call` (engine times + `wall_offset` = wall-clock times)."""
    media = call.media
    record: dict[str, object] = {
        "call_id": media.call_id,
        "caller": _text(media.caller),
        "caller_relay": _text(media.caller_relay),
        "callee": _text(media.callee),
        "callee_relay": _text(media.callee_relay),
        "idle_timeout": call.idle_timeout,
        "started": call.started + wall_offset,
        "quiet_since": None if quiet_since is None else quiet_since + wall_offset,
    }
    for name, leg in zip(LEGS, (*call.caller, *call.callee), strict=True):
        record[f"{name}_sdp"] = _text(leg.sdp)
        record[f"{name}_rule"] = leg.rule.value
        record[f"{name}_latched"] = None if leg.latched is None else _text(leg.latched)
    return record


def decode(record: Mapping[str, object], wall_offset: float) -> StoredCall:
    """A record back into a call; MediaError, ValueError or KeyError if it is not one."""

    def text(name: str) -> str:
        return str(record[name])

    media = CallMedia(
        text("call_id"),
        _endpoint(text("caller")),
        _endpoint(text("caller_relay")),
        _endpoint(text("callee")),
        _endpoint(text("callee_relay")),
    )
    legs = []
    relays = (media.caller_relay, media.caller_relay, media.callee_relay, media.callee_relay)
    for name, relay in zip(LEGS, relays, strict=True):
        stream = Stream.RTP if name.endswith("rtp") else Stream.RTCP
        delta = 0 if stream is Stream.RTP else RTCP_PORT_OFFSET
        latched = record[f"{name}_latched"]
        legs.append(
            Leg(
                stream,
                _endpoint(text(f"{name}_sdp")),
                relay.offset(delta),
                Rule(text(f"{name}_rule")),
                None if latched is None else _endpoint(str(latched)),
            )
        )
    quiet = record["quiet_since"]
    call = Call(
        media,
        float(text("idle_timeout")),
        float(text("started")) - wall_offset,
        (legs[0], legs[1]),
        (legs[2], legs[3]),
    )
    return StoredCall(call, None if quiet is None else float(str(quiet)) - wall_offset)
