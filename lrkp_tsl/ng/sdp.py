"""SDP for a NAT relay: read what the relay must know, change only what it must. Pure.

The relay puts itself between two parties by rewriting each SDP it is shown: the addresses
(`c=`, and `o=` when asked) become the relay address facing the party that will read the
SDP, and each active `m=` port becomes the relay port that party sends to; an `a=rtcp` line
gives the relay's RTCP port. Everything else stays as the party wrote it, byte for byte:
line order and line endings, codecs and payload-type order, `rtpmap`/`fmtp`/`ptime`, `b=`
lines, direction attributes (hold by `sendonly`, `inactive` or `c=0.0.0.0`), unknown
attributes, rejected streams (port 0).

Where rtpengine 10.5 (plain RTP, Kamailio's default flags) does something else, and why we
do not follow it (measured; tests/ng_corpus and lrkp_lab/sdpdiff.py hold the comparison):
- it regenerates the attribute list: reorders it, adds `a=rtpmap` for static payload
  types and `a=sendrecv` where the party wrote no direction, turns a session-level
  direction into media-level ones, and writes `a=sendonly` for a `c=0.0.0.0` hold. The
  meaning is the same (RFC 4566 §6: no direction attribute is sendrecv; RFC 3551's static
  payload types need no rtpmap), and an SDP the relay did not have to change is one fewer
  thing that can break an endpoint;
- it drops every attribute of a rejected (port 0) stream (RFC 3264 §6 allows either);
- it copies the offer's `a=ptime` into an answer that had none: that changes what the
  answerer asked for, so we do not.
What we do as it does: `c=` lines of active streams rewritten (the session-level one only
with `replace-session-connection` or when a stream relies on it), a `c=0.0.0.0` kept as is,
`o=` only with `replace-origin` and its version untouched, `a=rtcp:PORT` (the short form)
replacing any `a=rtcp` of an RTP stream, `a=rtcp-mux` passed through (the RTCP port of an
answer that accepts it is the RTP port), `a=group:BUNDLE` removed (each stream gets its own
relay ports, so a bundle would be wrong), ICE attributes removed when asked.

Refused (`SdpError`, code `unsupported-sdp`): what a UDP/IPv4 kernel NAT relay cannot
carry: IPv6 or multicast connection addresses, a port count (`m=audio 4000/2`), TCP-based
streams; more than `MAX_STREAMS` media sections. Malformed SDP: code `bad-sdp`.

SDP is handled as Latin-1 text: every byte maps to one character and back, so the bytes
of lines the relay does not touch come out exactly as they came in, whatever charset the
party used.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address
from typing import Final

from lrkp_tsl.errors import LrkpError

MAX_SDP: Final = 65535
"""Largest SDP accepted, in bytes: what one ng datagram can carry at most."""

MAX_STREAMS: Final = 16
"""Media sections accepted in one SDP. Each active one takes two relay port pairs; the bound
keeps one call from taking a range's worth of ports (rtpengine has none)."""

ZERO: Final = IPv4Address("0.0.0.0")

ICE_ATTRIBUTES: Final = frozenset(
    {
        "candidate",
        "ice-ufrag",
        "ice-pwd",
        "ice-options",
        "ice-lite",
        "ice-mismatch",
        "ice-pacing",
        "remote-candidates",
        "end-of-candidates",
    }
)
"""What `ICE=remove` strips, at session and media level (RFC 8839, RFC 8840)."""

DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")

_LINE = re.compile(r"[a-zA-Z]=")
_MEDIA = re.compile(r"(\S+) (\d+)(?:/(\d+))? (\S+)((?: \S+)*) *")
_CONNECTION = re.compile(r"IN (IP4|IP6) (\S+)")
_RTCP = re.compile(r"(\d+)(?: IN (IP4|IP6) (\S+))? *")


class SdpError(LrkpError):
    """An SDP the relay cannot use: `bad-sdp` (malformed) or `unsupported-sdp` (well formed,
    but nothing a UDP/IPv4 kernel relay can carry)."""

    def __init__(self, reason: str, code: str = "bad-sdp") -> None:
        super().__init__(reason)
        self.code = code


def _unsupported(reason: str) -> SdpError:
    return SdpError(reason, "unsupported-sdp")


class Rtcp(Enum):
    """How the rewritten SDP states the relay's RTCP port (rtpengine's flags)."""

    SHORT = "short"  # a=rtcp:PORT (the default)
    FULL = "full"  # a=rtcp:PORT IN IP4 ADDRESS (`full-rtcp-attribute`)
    NONE = "none"  # no a=rtcp line (`no-rtcp-attribute`)


class Line:
    """One SDP line as received: `kind` is the letter before `=` ("" for a blank line).

    A plain class with slots rather than a frozen dataclass: every line of every SDP is
    one, and the frozen dataclass's construction cost a tenth of an ng offer's parse.
    `attribute` is read several times per line (ICE, rtcp, directions), so it is worked
    out once. Nothing changes a Line after it is made."""

    __slots__ = ("attribute", "end", "kind", "value")

    def __init__(self, kind: str, value: str, end: str) -> None:
        self.kind = kind
        self.value = value
        self.end = end  # "\r\n", "\n", or "" for a last line without one
        # For `a=name:value` or `a=name`: the name; "" for other lines.
        self.attribute = value.partition(":")[0] if kind == "a" else ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Line):
            return NotImplemented
        return (self.kind, self.value, self.end) == (other.kind, other.value, other.end)

    def __hash__(self) -> int:
        return hash((self.kind, self.value, self.end))

    def __repr__(self) -> str:
        return f"Line(kind={self.kind!r}, value={self.value!r}, end={self.end!r})"


@dataclass(frozen=True, slots=True)
class Media:
    """One `m=` section: the line itself is `lines[0]`."""

    index: int
    kind: str  # audio, video, image, application, ...
    port: int  # 0: rejected
    proto: str  # RTP/AVP, udptl, ...
    formats: tuple[str, ...]
    lines: tuple[Line, ...]
    connection: IPv4Address | None  # its own c=, if any
    direction: str | None  # its own direction attribute, if any
    rtcp_port: int | None  # a=rtcp, if any
    rtcp_address: IPv4Address | None
    rtcp_mux: bool

    @property
    def rejected(self) -> bool:
        return self.port == 0

    @property
    def is_rtp(self) -> bool:
        """RTP (and so RTCP) runs on this stream: the relay adds a=rtcp."""
        return "RTP/" in self.proto


@dataclass(frozen=True, slots=True)
class Sdp:
    """A parsed SDP: the lines before the first `m=` (`session`) and each media section."""

    session: tuple[Line, ...]
    media: tuple[Media, ...]
    origin: tuple[str, ...]  # the six o= fields
    connection: IPv4Address | None  # session-level c=
    direction: str | None  # session-level direction attribute
    has_ice: bool = field(default=False)

    def address(self, media: Media) -> IPv4Address:
        """Where `media`'s party receives RTP (0.0.0.0: on hold, do not send)."""
        found = media.connection if media.connection is not None else self.connection
        assert found is not None  # parse() refuses an active stream without one
        return found

    def direction_of(self, media: Media) -> str:
        """The stream's direction as RFC 4566 reads it: its own, the session's, sendrecv."""
        return media.direction or self.direction or "sendrecv"


# --- parsing ------------------------------------------------------------------------------


def parse(body: bytes) -> Sdp:
    """Parse `body`; SdpError (and nothing else) if it is malformed or unsupported."""
    if len(body) > MAX_SDP:
        raise SdpError(f"SDP is {len(body)} bytes, more than {MAX_SDP}")
    lines = _split(body.decode("latin-1"))
    kinds = [line.kind for line in lines if line.kind]
    if not kinds or kinds[0] != "v" or lines[_first(lines)].value != "0":
        raise SdpError("SDP does not start with v=0")
    starts = [i for i, line in enumerate(lines) if line.kind == "m"]
    if len(starts) > MAX_STREAMS:
        raise _unsupported(f"SDP has {len(starts)} m= lines, at most {MAX_STREAMS} are relayed")
    session = tuple(lines[: starts[0]] if starts else lines)
    origin = _origin(session)
    connection, session_ip6 = _connection_of(session, "session-level")
    direction = _direction_of(session)
    media = []
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(lines)
        media.append(_media(index, tuple(lines[start:end])))
    has_ice = not ICE_ATTRIBUTES.isdisjoint([line.attribute for line in lines])
    sdp = Sdp(session, tuple(media), origin, connection, direction, has_ice)
    for item in sdp.media:
        if item.rejected:
            continue
        if item.connection is None and connection is None:
            if session_ip6:
                raise _unsupported(
                    f"m= line {item.index + 1} ({item.kind}) is IPv6 (c=IN IP6): "
                    "this relay carries IPv4 only"
                )
            raise SdpError(f"m= line {item.index + 1} ({item.kind}) has no c= line")
    return sdp


def _split(text: str) -> list[Line]:
    lines = []
    parts = text.split("\n")
    for number, part in enumerate(parts):
        last = number == len(parts) - 1
        if last and not part:
            break
        end = "" if last else "\n"
        if part.endswith("\r"):
            part, end = part[:-1], "\r" + end
        if "\r" in part:
            raise SdpError(f"line {number + 1} contains a bare carriage return")
        if not part:
            lines.append(Line("", "", end))
            continue
        if _LINE.match(part) is None:
            raise SdpError(f"line {number + 1} is not <letter>=<value>: {_show(part)}")
        lines.append(Line(part[0], part[2:], end))
    return lines


def _first(lines: Sequence[Line]) -> int:
    return next(i for i, line in enumerate(lines) if line.kind)


def _origin(session: Sequence[Line]) -> tuple[str, ...]:
    found = [line for line in session if line.kind == "o"]
    if len(found) != 1:
        raise SdpError(f"SDP has {len(found)} o= lines, expected 1")
    fields = tuple(found[0].value.split())
    if len(fields) != 6:
        raise SdpError(f"o= line has {len(fields)} fields, expected 6: {_show(found[0].value)}")
    return fields


def _connection_of(lines: Iterable[Line], where: str) -> tuple[IPv4Address | None, bool]:
    """(the IPv4 address of the section's c= line or None, whether it is an IPv6 one)."""
    found = [line for line in lines if line.kind == "c"]
    if not found:
        return None, False
    if len(found) > 1:
        raise _unsupported(f"{where} has {len(found)} c= lines (multicast layers)")
    match = _CONNECTION.fullmatch(found[0].value)
    if match is None:
        raise SdpError(f"{where} c= line is not 'IN IP4 <address>': {_show(found[0].value)}")
    family, text = match.groups()
    if family == "IP6":
        return None, True
    address, _, ttl = text.partition("/")
    try:
        ip = ipv4(address)
    except ValueError:
        raise SdpError(f"{where} c= address {_show(address)} is not IPv4") from None
    if ttl or ip.is_multicast:
        raise _unsupported(f"{where} c= {_show(text)} is multicast: this relay carries unicast")
    return ip, False


@functools.lru_cache(maxsize=4096)
def ipv4(text: str) -> IPv4Address:
    """`IPv4Address(text)`, memoised (bounded; a ValueError is not kept): a party's
    address comes back in each of its SDPs, and parsing it cost a tenth of an SDP's."""
    return IPv4Address(text)


def _direction_of(lines: Iterable[Line]) -> str | None:
    found = [line.value for line in lines if line.kind == "a" and line.value in DIRECTIONS]
    return found[-1] if found else None


def _media(index: int, lines: tuple[Line, ...]) -> Media:
    where = f"m= line {index + 1}"
    match = _MEDIA.fullmatch(lines[0].value)
    if match is None:
        raise SdpError(
            f"{where} is not '<media> <port> <proto> <format>...': {_show(lines[0].value)}"
        )
    kind, port_text, count, proto, formats = match.groups()
    port = int(port_text)
    if port > 65535:
        raise SdpError(f"{where}: port {port} is outside 0-65535")
    active = port != 0
    if active and count is not None and int(count) != 1:
        raise _unsupported(f"{where} ({kind}) asks for {count} ports: port counts are not relayed")
    if active and not _udp(proto):
        raise _unsupported(
            f"{where} ({kind} {proto}) is not carried over UDP: this relay carries UDP streams "
            "(RTP/AVP, RTP/AVPF, RTP/SAVP(F), UDP/TLS/RTP/SAVP(F), udptl)"
        )
    if active and port == 65535 and "RTP/" in proto:
        raise SdpError(f"{where} port 65535 leaves no room for RTCP on 65536")
    connection, ip6 = _connection_of(lines, where)
    if active and ip6:
        raise _unsupported(f"{where} ({kind}) is IPv6 (c=IN IP6): this relay carries IPv4 only")
    rtcp_port, rtcp_address = None, None
    for line in lines:
        if line.attribute == "rtcp" and active:
            rtcp_port, rtcp_address = _rtcp(line, where)
    return Media(
        index,
        kind,
        port,
        proto,
        tuple(formats.split()),
        lines,
        connection,
        _direction_of(lines),
        rtcp_port,
        rtcp_address,
        any(line.kind == "a" and line.value == "rtcp-mux" for line in lines),
    )


def _udp(proto: str) -> bool:
    upper = proto.upper()
    return upper == "UDPTL" or upper.startswith(("RTP/", "UDP/", "UDPTL/"))


def _rtcp(line: Line, where: str) -> tuple[int, IPv4Address | None]:
    match = _RTCP.fullmatch(line.value.partition(":")[2])
    if match is None:
        raise SdpError(f"{where}: {_show(line.value)} is not a=rtcp:<port> [IN IP4 <address>]")
    port = int(match.group(1))
    if not 1 <= port <= 65535:
        raise SdpError(f"{where}: a=rtcp port {port} is outside 1-65535")
    family, address = match.group(2), match.group(3)
    if family is None:
        return port, None
    if family == "IP6":
        raise _unsupported(f"{where}: a=rtcp is IPv6: this relay carries IPv4 only")
    try:
        return port, ipv4(address)
    except ValueError:
        raise SdpError(f"{where}: a=rtcp address {_show(address)} is not IPv4") from None


# --- rewriting ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayPorts:
    """The relay ports one stream's reader sends to: RTP, and RTCP (= RTP with rtcp-mux)."""

    rtp: int
    rtcp: int


@dataclass(frozen=True, slots=True)
class Rewrite:
    """What to change besides addresses and ports, from the request's flags."""

    replace_origin: bool = False
    replace_session_connection: bool = False
    replace_zero_address: bool = False
    strip_ice: bool = True
    rtcp: Rtcp = Rtcp.SHORT
    strip_rtcp_mux: bool = False
    strip_extmap: bool = False


def rewrite(
    sdp: Sdp, relay: IPv4Address, ports: Sequence[RelayPorts | None], how: Rewrite
) -> bytes:
    """`sdp` as its reader must see it: `relay` for the addresses, `ports[i]` for m= line i
    (None for a rejected stream, whose port stays 0)."""
    if len(ports) != len(sdp.media):
        raise ValueError(f"{len(ports)} port pairs for {len(sdp.media)} m= lines")
    out: list[Line] = []
    relied_on = any(m.connection is None for m in sdp.media if not m.rejected)
    for line in sdp.session:
        if line.kind == "o" and how.replace_origin:
            out.append(_with(line, " ".join((*sdp.origin[:4], "IP4", str(relay)))))
        elif line.kind == "c" and (how.replace_session_connection or relied_on):
            out.append(_connection(line, sdp.connection, relay, how))
        elif _stripped(line, how):
            continue
        else:
            out.append(line)
    for media, pair in zip(sdp.media, ports, strict=True):
        out += _media_lines(media, pair, relay, how)
    return "".join(_render(out)).encode("latin-1")


def _media_lines(
    media: Media, pair: RelayPorts | None, relay: IPv4Address, how: Rewrite
) -> list[Line]:
    if media.rejected or pair is None:
        if not media.rejected:
            raise ValueError(f"m= line {media.index + 1} is active but has no relay ports")
        return [line for line in media.lines if not _stripped(line, how)]
    head = media.lines[0]
    kind, _, rest = head.value.partition(" ")
    rest = rest.partition(" ")[2]  # past the port (and its count)
    out = [_with(head, f"{kind} {pair.rtp} {rest}")]
    rtcp_written = False
    for line in media.lines[1:]:
        if line.kind == "c":
            out.append(_connection(line, media.connection, relay, how))
        elif line.attribute == "rtcp":
            if media.is_rtp and how.rtcp is not Rtcp.NONE and not rtcp_written:
                out.append(_with(line, _rtcp_value(pair, relay, how)))
                rtcp_written = True
        elif _stripped(line, how):
            continue
        else:
            out.append(line)
    if media.is_rtp and how.rtcp is not Rtcp.NONE and not rtcp_written:
        at = len(out)
        while at > 1 and not out[at - 1].kind:  # before trailing blank lines
            at -= 1
        out.insert(at, Line("a", _rtcp_value(pair, relay, how), out[at - 1].end))
    return out


def _rtcp_value(pair: RelayPorts, relay: IPv4Address, how: Rewrite) -> str:
    if how.rtcp is Rtcp.FULL:
        return f"rtcp:{pair.rtcp} IN IP4 {relay}"
    return f"rtcp:{pair.rtcp}"


def _connection(line: Line, current: IPv4Address | None, relay: IPv4Address, how: Rewrite) -> Line:
    """A c= line pointing at the relay, unless it is a `c=0.0.0.0` hold (kept)."""
    if current == ZERO and not how.replace_zero_address:
        return line
    return _with(line, f"IN IP4 {relay}")


def _stripped(line: Line, how: Rewrite) -> bool:
    """Lines that go: ICE (when asked), a=group:BUNDLE (always), a=rtcp-mux and a=extmap
    (when asked)."""
    name = line.attribute
    return (
        (how.strip_ice and name in ICE_ATTRIBUTES)
        or (name == "group" and line.value.startswith("group:BUNDLE"))
        or (how.strip_rtcp_mux and name == "rtcp-mux")
        or (how.strip_extmap and name == "extmap")
    )


def _with(line: Line, value: str) -> Line:
    return Line(line.kind, value, line.end)


def _render(lines: Sequence[Line]) -> list[str]:
    """Each line with its own ending; a last line that had none gets one if lines follow."""
    fallback = next((line.end for line in lines if line.end), "\r\n")
    last = len(lines) - 1
    return [
        (f"{line.kind}={line.value}" if line.kind else "")
        + (line.end if line.end or number == last else fallback)
        for number, line in enumerate(lines)
    ]


def _show(value: str, limit: int = 60) -> str:
    shown = ascii(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
