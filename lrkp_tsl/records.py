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
import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Final, Protocol

from lrkp_tsl.errors import MediaError
from lrkp_tsl.latching import Rule
from lrkp_tsl.media import RTCP_PORT_OFFSET, CallMedia, Endpoint, Stream
from lrkp_tsl.operations import LRKPROXY, StreamSpec
from lrkp_tsl.session import Call, Leg

LEGS = ("caller_rtp", "caller_rtcp", "callee_rtp", "callee_rtcp")
LEG_FIELDS = [f"{leg}_{part}" for leg in LEGS for part in ("sdp", "rule", "latched")]
SHAPE_FIELDS = ["caller", "caller_relay", "callee", "callee_relay", *LEG_FIELDS]
"""Where a call of lrkproxy's shape is kept: one stream, RTP and RTCP, every address known.
NULL (None) for any other call, whose streams are in `streams` instead."""
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
    "protocol",
    "streams",
    "record",
    "end_after",
]
"""A call's record, field by field: the state store's columns, and what a standby node
receives. Endpoints are `ip:port` text, times are wall-clock (Unix) seconds.

- `protocol`: the front-end that owns the call (`lrkproxy`, `ng`);
- `streams`: NULL for a call of lrkproxy's shape (its one stream is in the columns from
  `caller` to `callee_rtcp_latched`, as in schema version 1); else JSON: every stream as
  the controlling layer described it and every leg with its latching state, and the relay
  endpoints the call reserves beyond its legs' (`encode_streams`);
- `record`: the front-end's own state of the call (ng: the call's sides and tags, JSON),
  never read by the engine; NULL for lrkproxy;
- `end_after`: seconds after `started` at which the call ends (ng's delete-delay); NULL.
A record without the last four (an earlier release's, from a peer) is an lrkproxy call."""


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


# One encoder for every record (json.dumps with `separators` builds a new one each call).
COMPACT_JSON: Final = json.JSONEncoder(separators=(",", ":"))


@functools.lru_cache(maxsize=65536)
def endpoint_text(endpoint: Endpoint) -> str:
    """`str(endpoint)`, memoised: a call's endpoints are written in each of its records."""
    return str(endpoint)


@functools.lru_cache(maxsize=4096)
def ip_text(address: IPv4Address) -> str:
    """`str(address)`, memoised: the node's relay addresses are in every record."""
    return str(address)


@functools.lru_cache(maxsize=65536)
def _endpoint(text: str) -> Endpoint:
    ip, _, port = text.rpartition(":")
    return Endpoint.parse(ip, port)


def _classic(call: Call) -> bool:
    """Whether the call has lrkproxy's shape (SHAPE_FIELDS can hold it)."""
    if len(call.streams) != 1 or call.reserved:
        return False
    spec = call.streams[0]
    return (
        spec.rtcp
        and spec.caller is not None
        and spec.callee is not None
        and spec.caller_hint is None
        and spec.callee_hint is None
        and len(call.caller) == 2
        and all(leg.sdp is not None and leg.anchor is None for leg in call.legs())
    )


def encode(call: Call, quiet_since: float | None, wall_offset: float) -> dict[str, object]:
    """The record of `call` (engine times + `wall_offset` = wall-clock times), its keys in
    FIELDS order."""
    record: dict[str, object] = dict.fromkeys(FIELDS)
    record["call_id"] = call.call_id
    record["idle_timeout"] = call.idle_timeout
    record["started"] = call.started + wall_offset
    record["quiet_since"] = None if quiet_since is None else quiet_since + wall_offset
    if _classic(call):
        spec = call.streams[0]
        assert spec.caller is not None and spec.callee is not None
        record["caller"] = endpoint_text(spec.caller)
        record["caller_relay"] = endpoint_text(spec.caller_relay)
        record["callee"] = endpoint_text(spec.callee)
        record["callee_relay"] = endpoint_text(spec.callee_relay)
        for name, leg in zip(LEGS, (*call.caller, *call.callee), strict=True):
            assert leg.sdp is not None
            record[f"{name}_sdp"] = endpoint_text(leg.sdp)
            record[f"{name}_rule"] = leg.rule.value
            record[f"{name}_latched"] = None if leg.latched is None else endpoint_text(leg.latched)
    else:
        record["streams"] = encode_streams(call)
    record["protocol"] = call.protocol
    record["record"] = call.record
    record["end_after"] = None if call.end_at is None else call.end_at - call.started
    return record


def _opt(endpoint: Endpoint | None) -> str | None:
    return None if endpoint is None else endpoint_text(endpoint)


def _ip(address: IPv4Address | None) -> str | None:
    return None if address is None else ip_text(address)


def encode_streams(call: Call) -> str:
    """A call's streams, legs and reserved relay endpoints as compact JSON:
    `{"streams": [{"spec": [...], "caller": [[leg]...], "callee": [...]}], "reserved": [...]}`
    with a spec as [caller, caller_relay, callee, callee_relay, rtcp, caller_rtcp,
    callee_rtcp, caller_hint, callee_hint] and a leg as [stream, sdp, relay, rule, latched,
    anchor] (endpoints `ip:port`, null where unknown)."""
    streams = []
    for index, spec in enumerate(call.streams):
        streams.append(
            {
                "spec": [
                    _opt(spec.caller), endpoint_text(spec.caller_relay), _opt(spec.callee),
                    endpoint_text(spec.callee_relay), spec.rtcp, _opt(spec.caller_rtcp),
                    _opt(spec.callee_rtcp), _ip(spec.caller_hint), _ip(spec.callee_hint),
                ],
                "caller": _legs(call.caller, index),
                "callee": _legs(call.callee, index),
            }
        )  # fmt: skip
    reserved = sorted(map(endpoint_text, call.reserved))
    return COMPACT_JSON.encode({"streams": streams, "reserved": reserved})


def _legs(side: tuple[Leg, ...], index: int) -> list[list[object]]:
    """The legs of stream `index` on one side, as `encode_streams` writes them."""
    return [
        [leg.stream.value, _opt(leg.sdp), endpoint_text(leg.relay), leg.rule.value,
         _opt(leg.latched), _ip(leg.anchor)]
        for leg in side
        if leg.index == index
    ]  # fmt: skip


def decode(record: Mapping[str, object], wall_offset: float) -> StoredCall:
    """A record back into a call; MediaError, ValueError, KeyError or TypeError if it is
    not one."""

    def text(name: str) -> str:
        return str(record[name])

    streams_json = record.get("streams")
    if streams_json is None:
        specs, caller, callee = _decode_classic(record)
        reserved: frozenset[Endpoint] = frozenset()
    else:
        specs, caller, callee, reserved = _decode_streams(str(streams_json))
    quiet = record["quiet_since"]
    started = float(text("started")) - wall_offset
    end_after = record.get("end_after")
    kept = record.get("record")
    call = Call(
        text("call_id"),
        specs,
        float(text("idle_timeout")),
        started,
        caller,
        callee,
        str(record.get("protocol") or LRKPROXY),
        None if kept is None else str(kept),
        None if end_after is None else started + float(str(end_after)),
        reserved,
    )
    if not call.call_id:
        raise MediaError("empty Call-ID")
    return StoredCall(call, None if quiet is None else float(str(quiet)) - wall_offset)


def _decode_classic(
    record: Mapping[str, object],
) -> tuple[tuple[StreamSpec, ...], tuple[Leg, ...], tuple[Leg, ...]]:
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

    def rtcp(rtp: Endpoint, leg: Leg) -> Endpoint | None:
        return None if leg.sdp == rtp.offset(RTCP_PORT_OFFSET) else leg.sdp

    spec = StreamSpec(
        media.caller,
        media.caller_relay,
        media.callee,
        media.callee_relay,
        caller_rtcp=rtcp(media.caller, legs[1]),
        callee_rtcp=rtcp(media.callee, legs[3]),
    )
    return (spec,), (legs[0], legs[1]), (legs[2], legs[3])


def _maybe(value: object) -> Endpoint | None:
    return None if value is None else _endpoint(str(value))


def _maybe_ip(value: object) -> IPv4Address | None:
    return None if value is None else IPv4Address(str(value))


def _decode_streams(
    text: str,
) -> tuple[tuple[StreamSpec, ...], tuple[Leg, ...], tuple[Leg, ...], frozenset[Endpoint]]:
    data = json.loads(text)
    specs: list[StreamSpec] = []
    caller: list[Leg] = []
    callee: list[Leg] = []
    for index, stream in enumerate(data["streams"]):
        a, a_relay, b, b_relay, rtcp, a_rtcp, b_rtcp, a_hint, b_hint = stream["spec"]
        if not isinstance(rtcp, bool):
            raise ValueError(f"stream {index}: rtcp {rtcp!r} is not true or false")
        specs.append(
            StreamSpec(
                _maybe(a), _endpoint(str(a_relay)), _maybe(b), _endpoint(str(b_relay)), rtcp,
                _maybe(a_rtcp), _maybe(b_rtcp), _maybe_ip(a_hint), _maybe_ip(b_hint),
            )
        )  # fmt: skip
        for side, legs in ((caller, stream["caller"]), (callee, stream["callee"])):
            for kind, sdp, relay, rule, latched, anchor in legs:
                side.append(
                    Leg(Stream(kind), _maybe(sdp), _endpoint(str(relay)), Rule(rule),
                        _maybe(latched), index, _maybe_ip(anchor))
                )  # fmt: skip
    if len(caller) != len(callee) or any(
        (a.index, a.stream) != (b.index, b.stream) for a, b in zip(caller, callee, strict=True)
    ):
        raise ValueError("the caller's and the callee's legs do not pair up")
    reserved = frozenset(_endpoint(str(item)) for item in data["reserved"])
    return tuple(specs), tuple(caller), tuple(callee), reserved
