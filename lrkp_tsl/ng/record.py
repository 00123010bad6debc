"""An ng call as text, and back: what the engine stores and replicates as the call's
`record` (operations.Relay), so that a restarted node, or a standby that takes over, knows
the call's sides, tags and SDP as the node that answered its offer did. Pure.

JSON, compact. Times are wall-clock (Unix) seconds: the record outlives the node's
monotonic clock (a reboot), and the engine never reads it to convert them. A call's
scheduled end (`delete_at`) is not in it: the engine keeps that itself (the call's
`end_at`, which the store moves with the call's start across a reboot), and gives it back.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from typing import Any

from lrkp_tsl.errors import MediaError
from lrkp_tsl.media import Endpoint
from lrkp_tsl.ng.callmodel import NgCall, Party, Side
from lrkp_tsl.records import COMPACT_JSON, endpoint_text, ip_text

VERSION = 1


class RecordError(ValueError):
    """The text is no ng call this release can read."""


def _endpoint(endpoint: Endpoint | None) -> str | None:
    return None if endpoint is None else endpoint_text(endpoint)


def _party(party: Party | None) -> list[Any] | None:
    if party is None:
        return None
    return [party.kind, party.proto, _endpoint(party.rtp), _endpoint(party.rtcp),
            party.rtcp_mux, party.direction, party.rejected]  # fmt: skip


def _side(side: Side) -> dict[str, Any]:
    return {
        "tag": side.tag,
        "interface": side.interface,
        "ip": ip_text(side.ip),
        "relay": list(side.relay),
        "parties": [_party(party) for party in side.parties],
        "received_from": None if side.received_from is None else ip_text(side.received_from),
        "strict_source": side.strict_source,
        "media_handover": side.media_handover,
        "former_tags": list(side.former_tags),
    }


def to_json(call: NgCall, wall_offset: float) -> str:
    """`call` as text (engine times + `wall_offset` = Unix time)."""
    return COMPACT_JSON.encode(
        {
            "v": VERSION,
            "call_id": call.call_id,
            "created": round(call.created + wall_offset, 3),
            "last_signal": round(call.last_signal + wall_offset, 3),
            "sides": [_side(side) for side in call.sides],
            "offer_from": call.offer_from,
            "offer_streams": call.offer_streams,
            "answered": call.answered,
        }
    )


def _read_endpoint(value: Any) -> Endpoint | None:
    if value is None:
        return None
    ip, _, port = str(value).rpartition(":")
    return Endpoint.parse(ip, port)


def _read_party(value: Any) -> Party | None:
    if value is None:
        return None
    kind, proto, rtp, rtcp, rtcp_mux, direction, rejected = value
    return Party(str(kind), str(proto), _read_endpoint(rtp), _read_endpoint(rtcp),
                 bool(rtcp_mux), str(direction), bool(rejected))  # fmt: skip


def _read_side(value: dict[str, Any]) -> Side:
    received = value["received_from"]
    return Side(
        tag=None if value["tag"] is None else str(value["tag"]),
        interface=str(value["interface"]),
        ip=IPv4Address(value["ip"]),
        relay=tuple(None if port is None else int(port) for port in value["relay"]),
        parties=tuple(_read_party(party) for party in value["parties"]),
        received_from=None if received is None else IPv4Address(received),
        strict_source=bool(value["strict_source"]),
        media_handover=bool(value["media_handover"]),
        former_tags=tuple(str(tag) for tag in value["former_tags"]),
    )


def from_json(text: str, wall_offset: float, delete_at: float | None = None) -> NgCall:
    """The call `to_json` wrote (Unix times - `wall_offset` = engine times), ending at
    `delete_at` (engine time) if it has a scheduled end; RecordError if it is none."""
    try:
        data = json.loads(text)
        if data.get("v") != VERSION:
            raise RecordError(f"ng record version {data.get('v')!r}, expected {VERSION}")
        sides = [_read_side(side) for side in data["sides"]]
        if len(sides) != 2:
            raise RecordError(f"an ng call has two sides, the record has {len(sides)}")
        return NgCall(
            call_id=str(data["call_id"]),
            created=float(data["created"]) - wall_offset,
            last_signal=float(data["last_signal"]) - wall_offset,
            sides=(sides[0], sides[1]),
            offer_from=int(data["offer_from"]),
            offer_streams=int(data["offer_streams"]),
            answered=bool(data["answered"]),
            delete_at=delete_at,
        )
    except RecordError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, MediaError) as exc:
        raise RecordError(f"not an ng call record: {exc}") from None
