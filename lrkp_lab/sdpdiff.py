"""Compare two relays' SDP answers by meaning: addresses and ports may differ, nothing else.

Used by the differential tests against rtpengine (tests/netns/test_ng_differential.py): the
same ng exchange goes to rtpengine and to lrkp-tsl, and each rewritten SDP of one is
compared with the other's. Its own small parser, on purpose: the SDP code under test
(lrkp_tsl/ng/sdp.py) must not judge its own output.

What counts as the same meaning (each rule is a reading of an RFC, not a convenience):
- relay ports are compared by name, not number: each relay's ports are named P1, P2, ... in
  the order they first appear in the exchange, so "the re-offer kept the port" and "the
  answer's RTCP port is its RTP port + 1" are compared, their values are not;
- a=rtcp is compared as its relation to the m= port (`+1`, `=`, or absent);
- attributes are a multiset per section: their order carries no meaning (RFC 4566 §5
  fixes the order of line types, not of attributes);
- a static payload type without a=rtpmap means its RFC 3551 encoding, so an rtpmap that
  spells it out changes nothing (rtpengine adds them); "/1" channels are the default;
- the direction of a stream is its own attribute, else the session's, else sendrecv
  (RFC 4566 §6), and a stream at c=0.0.0.0 does not receive (RFC 3264 §8.4: the old way
  to put a stream on hold), so sendrecv becomes sendonly there (rtpengine writes
  a=sendonly);
- a rejected stream (port 0) is its m= line only: its attributes mean nothing (RFC 3264
  §6; rtpengine drops them);
- a=group:BUNDLE at session level is compared (both relays remove it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

STATIC_PAYLOAD_TYPES = {
    "0": "PCMU/8000",
    "3": "GSM/8000",
    "4": "G723/8000",
    "5": "DVI4/8000",
    "6": "DVI4/16000",
    "7": "LPC/8000",
    "8": "PCMA/8000",
    "9": "G722/8000",
    "10": "L16/44100/2",
    "11": "L16/44100",
    "12": "QCELP/8000",
    "13": "CN/8000",
    "14": "MPA/90000",
    "15": "G728/8000",
    "16": "DVI4/11025",
    "17": "DVI4/22050",
    "18": "G729/8000",
    "25": "CelB/90000",
    "26": "JPEG/90000",
    "28": "nv/90000",
    "31": "H261/90000",
    "32": "MPV/90000",
    "33": "MP2T/90000",
    "34": "H263/90000",
}
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
ON_HOLD = {"sendrecv": "sendonly", "recvonly": "inactive"}


@dataclass(frozen=True, slots=True)
class Difference:
    """One difference of meaning: `text` is what an expectation in the corpus quotes."""

    step: int
    where: str
    what: str

    @property
    def text(self) -> str:
        return f"step {self.step} {self.where}: {self.what}"


class PortNames:
    """One relay's ports (address and port), named in the order they first appear in an
    exchange. rtpengine allocates per interface, so one number may be two ports."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, int], str] = {}

    def name(self, address: str, port: int) -> str:
        if port == 0:
            return "0"
        return self._names.setdefault((address, port), f"P{len(self._names) + 1}")


@dataclass
class _Section:
    lines: list[tuple[str, str]] = field(default_factory=list)  # (type, value)

    def values(self, kind: str) -> list[str]:
        return [value for line_kind, value in self.lines if line_kind == kind]

    def attributes(self) -> list[str]:
        return self.values("a")


def _sections(sdp: str) -> tuple[_Section, list[_Section]]:
    session, media = _Section(), []
    current = session
    for raw in sdp.replace("\r\n", "\n").split("\n"):
        if not raw:
            continue
        kind, _, value = raw.partition("=")
        if kind == "m":
            current = _Section()
            media.append(current)
        current.lines.append((kind, value))
    return session, media


def _name(attribute: str) -> str:
    return attribute.partition(":")[0]


def _direction(attributes: Iterable[str]) -> str | None:
    found = [a for a in attributes if a in DIRECTIONS]
    return found[-1] if found else None


def _connection(section: _Section) -> str | None:
    found = section.values("c")
    return found[0] if found else None


def meaning(sdp: str, ports: PortNames) -> dict[str, object]:
    """The SDP reduced to what it means (see the module docstring)."""
    session, media = _sections(sdp)
    session_attributes = session.attributes()
    session_direction = _direction(session_attributes)
    result: dict[str, object] = {
        "v": session.values("v"),
        "o": session.values("o"),
        "s": session.values("s"),
        "t": session.values("t"),
        "b": session.values("b"),
        "session c": session.values("c"),
        "session attributes": Counter(a for a in session_attributes if a not in DIRECTIONS),
    }
    session_connection = _connection(session)
    for number, section in enumerate(media, 1):
        result[f"m={number}"] = _media(section, session_connection, session_direction, ports)
    return result


def _media(
    section: _Section,
    session_connection: str | None,
    session_direction: str | None,
    ports: PortNames,
) -> dict[str, object]:
    kind, port_text, proto, *formats = section.values("m")[0].split()
    port = int(port_text.partition("/")[0])
    address = (_connection(section) or session_connection or "").split()
    host = address[-1] if address else ""
    described: dict[str, object] = {
        "m": (kind, ports.name(host, port), proto, tuple(formats)),
    }
    if port == 0:
        return described
    attributes = section.attributes()
    direction = _direction(attributes) or session_direction or "sendrecv"
    if address and address[-1] == "0.0.0.0":
        direction = ON_HOLD.get(direction, direction)
    rtpmap = {pt: STATIC_PAYLOAD_TYPES[pt] for pt in formats if pt in STATIC_PAYLOAD_TYPES}
    rest: Counter[str] = Counter()
    rtcp = "absent"
    for attribute in attributes:
        name = _name(attribute)
        if attribute in DIRECTIONS:
            continue
        if name == "rtcp":
            rtcp = _rtcp_relation(attribute, host, port, ports)
        elif name == "rtpmap":
            pt, _, encoding = attribute.partition(":")[2].partition(" ")
            rtpmap[pt] = encoding[:-2] if encoding.endswith("/1") else encoding
        else:
            rest[attribute] += 1
    described.update(
        {
            "c": address,
            "direction": direction,
            "rtcp": rtcp,
            "rtpmap": rtpmap,
            "b": section.values("b"),
            "attributes": rest,
        }
    )
    return described


def _rtcp_relation(attribute: str, host: str, port: int, ports: PortNames) -> str:
    value = attribute.partition(":")[2].split()
    rtcp = int(value[0])
    relation = "=rtp" if rtcp == port else "rtp+1" if rtcp == port + 1 else ports.name(host, rtcp)
    return " ".join([relation, *value[1:]])


def compare(
    step: int, ours: str, theirs: str, our_ports: PortNames, their_ports: PortNames
) -> list[Difference]:
    """The differences of meaning between our SDP and theirs (rtpengine's)."""
    mine, other = meaning(ours, our_ports), meaning(theirs, their_ports)
    found = []
    for key in sorted(set(mine) | set(other), key=_order):
        a, b = mine.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _compare_media(step, key, a, b)
        elif a != b:
            found.append(Difference(step, key, _show_pair(a, b)))
    return found


def _compare_media(
    step: int, key: str, a: dict[str, object], b: dict[str, object]
) -> list[Difference]:
    found = []
    for part in sorted(set(a) | set(b)):
        x, y = a.get(part), b.get(part)
        if isinstance(x, Counter) and isinstance(y, Counter):
            for only, side in ((x - y, "ours"), (y - x, "rtpengine's")):
                for attribute in sorted(only):
                    found.append(Difference(step, key, f"a={attribute} only in {side}"))
        elif isinstance(x, dict) and isinstance(y, dict):
            for pt in sorted(set(x) | set(y)):
                if x.get(pt) != y.get(pt):
                    found.append(
                        Difference(
                            step, key, f"rtpmap {pt}: ours {x.get(pt)!r}, rtpengine's {y.get(pt)!r}"
                        )
                    )
        elif x != y:
            found.append(Difference(step, key, f"{part}: {_show_pair(x, y)}"))
    return found


def _order(key: str) -> tuple[int, str]:
    match = re.fullmatch(r"m=(\d+)", key)
    return (1, f"{int(match.group(1)):04d}") if match else (0, key)


def _show_pair(ours: object, theirs: object) -> str:
    return f"ours {_plain(ours)}, rtpengine's {_plain(theirs)}"


def _plain(value: object) -> str:
    if isinstance(value, Counter):
        return repr(sorted(value.elements()))
    return repr(value)


def unexpected(found: Sequence[Difference], expected: Iterable[str]) -> tuple[list[str], list[str]]:
    """(differences found but not expected, expected ones not found)."""
    texts = [difference.text for difference in found]
    wanted = list(expected)
    return [t for t in texts if t not in wanted], [t for t in wanted if t not in texts]
