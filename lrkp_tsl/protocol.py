"""The wire protocol of Kamailio's stock `lrkproxy` module, as a pure codec.

Sans-IO: bytes in, request objects out; request objects in, reply bytes out. No sockets, no
asyncio, no clock, so every byte the module can send is testable in memory
(lrkp-protocol.md §1-§2 is the spec; §9 is the worked call the tests replay byte for byte).

Requests (Kamailio -> node), `␠` is one space::

    <cookie>␠P                                  ping
    <cookie>␠G                                  get config
    <cookie>␠S␠<10 space-terminated fields>     set session  (on the SDP answer)
    <cookie>␠D␠<10 space-terminated fields>     delete session

Replies (node -> Kamailio)::

    <cookie>␠P␠PONG
    <cookie>␠G␠<52-byte struct lrkp_node_conf>
    <the S/D request exactly as received>OK
    <cookie>␠E␠<code>␠<reason>                  ours; Kamailio never matches it, see below

**UDP mode** (`udp:host:port`, the normal one): every datagram starts with a cookie made by
`gencookie()`, `"%d_%u"` -- a signed number (the pid in old releases, `fastrand()` since
2025, so it may be negative) and a sequence number. Kamailio accepts a reply only if it
starts with the cookie *and* has the exact length it expects for the command letter found
right after it, and it reads at most `MAX_REPLY_SIZE` bytes.

**UNIX mode** (`unix:/path`, umode 0): Kamailio opens a `SOCK_STREAM` connection per command,
`writev`s every iovec *except the cookie* (`v + 1`), does one `read()` of at most 255 bytes
and closes. The cookie iovec keeps length 0, so every offset its callers use
(`buf + cookie_len + 2` for PONG and the config struct, `buf + request_len` for OK) works out
for replies that are the UDP replies with the cookie and its space removed: `P PONG`,
`G ` + struct, request + `OK`. That is what this module emits when the request had no cookie
(`with_cookie=False`). There is no length check in this mode; any non-empty reply counts as
an answer, and an empty read disables the node.

**Error replies** are `<cookie> E <code> <reason>` (`E <code> <reason>` in UNIX mode). The
stock module knows no error reply: in UDP mode it reads the letter after the cookie, finds
`E`, matches no case and keeps waiting, exactly as if nothing had come back, so the reply
cannot be mistaken for success. It exists for humans, packet captures and lrkp-ctl. In UNIX
mode it matters more: answering nothing there would make Kamailio's `read()` return 0 and
disable the whole node over one bad command, while an `E` reply is just an answer without
`OK` at the offset the module checks, which it only logs. A datagram whose cookie cannot be
read gets no reply at all in UDP mode: nobody could match it.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import ClassVar, Final

from lrkp_tsl.errors import ConfigError, LrkpError, MediaError
from lrkp_tsl.media import CallMedia, Endpoint

# --- limits -------------------------------------------------------------------------------

MAX_REQUEST_SIZE: Final = 1024
"""Largest request accepted, in bytes (cookie included).

pylrkproxy read 1024 bytes per datagram, so nothing that worked with it is refused here.
Kamailio's own requests are far shorter (an `S` that can still be acknowledged is at most
`MAX_ACKNOWLEDGEABLE_REQUEST` bytes), so anything bigger is not from the module. The server
should receive with a buffer of `MAX_REQUEST_SIZE + 1` so that a longer datagram arrives
longer, and is refused, rather than silently truncated into something that parses.
"""

MAX_REPLY_SIZE: Final = 255
"""Kamailio reads replies into `static char buf[256]` with `sizeof(buf) - 1`: 255 bytes."""

OK_SUFFIX: Final = b"OK"

MAX_ACKNOWLEDGEABLE_REQUEST: Final = MAX_REPLY_SIZE - len(OK_SUFFIX)
"""An `S`/`D` request longer than this (253 bytes) can never be acknowledged.

Its reply, request + `OK`, exceeds the 255 bytes Kamailio reads; in UDP mode the datagram is
truncated, fails the exact length check, and the worker retries and waits for
`lrkproxy_retr x lrkproxy_tout` seconds (5 s by default) before giving up. The session is
still worth installing, because Kamailio goes on with the call whatever the reply was, but
the server should log a warning (see `acknowledgeable`). A long Call-ID is the usual cause;
Kamailio's own `callid[50]` buffer overflows first beyond 48 characters.
"""

MAX_COOKIE_SIZE: Final = 33
"""`gencookie()` formats into `char cook[34]` including its trailing space and NUL."""

MAX_CALL_ID: Final = 128
"""Longest Call-ID accepted, in bytes: what an nftables element comment holds. Kamailio's
own `callid[50]` buffer overflows beyond 48 characters, so nothing a working module sends
comes near it."""

_COOKIE = re.compile(rb"-?[0-9]{1,10}_[0-9]{1,10}")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,10}")

SESSION_FIELDS: Final = (
    "src_ip",
    "dst_ip",
    "snat_ip",
    "dnat_ip",
    "src_port",
    "dst_port",
    "snat_port",
    "dnat_port",
    "timeout",
    "call_id",
)
"""The ten `S`/`D` fields in wire order (lrkp-protocol.md §2.2)."""


# --- reply-code catalogue -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """One entry of the error catalogue: the stable `code` sent on the wire and its meaning."""

    code: str
    meaning: str


E_EMPTY: Final = ReplyCode("empty", "empty request")
E_TOO_LONG: Final = ReplyCode("too-long", f"request longer than {MAX_REQUEST_SIZE} bytes")
E_BAD_COOKIE: Final = ReplyCode("bad-cookie", "no <number>_<number> cookie")
E_NOT_TEXT: Final = ReplyCode("not-text", "not UTF-8, or contains control characters")
E_UNKNOWN_COMMAND: Final = ReplyCode("unknown-command", "command is not P, G, S or D")
E_FIELD_COUNT: Final = ReplyCode("field-count", "wrong number or layout of fields")
E_BAD_IP: Final = ReplyCode("bad-ip", "a field is not an IPv4 address")
E_BAD_PORT: Final = ReplyCode("bad-port", "a field is not a port 1-65535")
E_BAD_TIMEOUT: Final = ReplyCode("bad-timeout", "timeout is not a non-negative number")
E_MISSING_CALL_ID: Final = ReplyCode("missing-call-id", "empty Call-ID")
E_BAD_CALL_ID: Final = ReplyCode(
    "bad-call-id", f"Call-ID is not one token of printable ASCII, at most {MAX_CALL_ID} bytes"
)
E_BAD_MEDIA: Final = ReplyCode("bad-media", "addresses cannot be relayed as given")

CATALOGUE: Final = (
    E_EMPTY,
    E_TOO_LONG,
    E_BAD_COOKIE,
    E_NOT_TEXT,
    E_UNKNOWN_COMMAND,
    E_FIELD_COUNT,
    E_BAD_IP,
    E_BAD_PORT,
    E_BAD_TIMEOUT,
    E_MISSING_CALL_ID,
    E_BAD_CALL_ID,
    E_BAD_MEDIA,
)


# --- errors -------------------------------------------------------------------------------


class ProtocolError(LrkpError):
    """A request that cannot be parsed. The only exception `parse_request` raises.

    `cookie` is set as soon as the cookie has parsed, so the server can still answer with
    `reply_error`; `with_cookie` records the mode the request was parsed in, because a
    missing cookie means "cannot answer" in UDP mode but "nothing to echo" in UNIX mode.
    Raised only as one of the subclasses below, each tied to one catalogue entry.
    """

    reply_code: ClassVar[ReplyCode]
    code = "protocol"

    def __init__(self, reason: str, *, cookie: str | None = None, with_cookie: bool = True) -> None:
        super().__init__(reason)
        self.cookie = cookie
        self.with_cookie = with_cookie


class EmptyRequest(ProtocolError):
    reply_code = E_EMPTY
    code = E_EMPTY.code


class RequestTooLong(ProtocolError):
    reply_code = E_TOO_LONG
    code = E_TOO_LONG.code


class BadCookie(ProtocolError):
    reply_code = E_BAD_COOKIE
    code = E_BAD_COOKIE.code


class NotText(ProtocolError):
    reply_code = E_NOT_TEXT
    code = E_NOT_TEXT.code


class UnknownCommand(ProtocolError):
    reply_code = E_UNKNOWN_COMMAND
    code = E_UNKNOWN_COMMAND.code


class WrongFieldCount(ProtocolError):
    reply_code = E_FIELD_COUNT
    code = E_FIELD_COUNT.code


class BadAddress(ProtocolError):
    reply_code = E_BAD_IP
    code = E_BAD_IP.code


class BadPort(ProtocolError):
    reply_code = E_BAD_PORT
    code = E_BAD_PORT.code


class BadTimeout(ProtocolError):
    reply_code = E_BAD_TIMEOUT
    code = E_BAD_TIMEOUT.code


class MissingCallId(ProtocolError):
    reply_code = E_MISSING_CALL_ID
    code = E_MISSING_CALL_ID.code


class BadCallId(ProtocolError):
    reply_code = E_BAD_CALL_ID
    code = E_BAD_CALL_ID.code


class BadMedia(ProtocolError):
    """The fields parse, but `CallMedia` refuses the geometry (its MediaError reason)."""

    reply_code = E_BAD_MEDIA
    code = E_BAD_MEDIA.code


ERRORS: Final[tuple[type[ProtocolError], ...]] = (
    EmptyRequest,
    RequestTooLong,
    BadCookie,
    NotText,
    UnknownCommand,
    WrongFieldCount,
    BadAddress,
    BadPort,
    BadTimeout,
    MissingCallId,
    BadCallId,
    BadMedia,
)


# --- requests -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """`P`: Kamailio's liveness test; any non-empty reply enables the node."""

    cookie: str | None
    raw: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class GetConfig:
    """`G`: Kamailio copies the node's port range and IPs from the reply."""

    cookie: str | None
    raw: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SetSession:
    """`S`: relay this call. Sent once per SDP answer (so twice for 183 + 200)."""

    cookie: str | None
    raw: bytes
    media: CallMedia
    timeout: int  # always 60 from Kamailio; no stock component uses it


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteSession:
    """`D`: stop relaying. `media` is None when Kamailio sent empty fields.

    That happens for a call torn down before its answer: the module only knows the offer's
    half (or nothing), so the Call-ID is the only reliable key. `given` holds the address
    and port fields that were not empty, by name, as the node writes them (`given_fields`):
    what the D says about the state of the call it was built from.
    """

    cookie: str | None
    raw: bytes
    call_id: str
    media: CallMedia | None
    given: tuple[tuple[str, str], ...] = field(default=(), compare=False)


Request = Ping | GetConfig | SetSession | DeleteSession


# --- node config (the G reply body) -------------------------------------------------------

_CONF = struct.Struct("@iii20s20s")
CONF_IP_SIZE: Final = 20


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """What `G` reports: Kamailio allocates relay ports itself from this range.

    Packed as `struct lrkp_node_conf {int start_port, end_port, current_port;
    char internal_ip[20], external_ip[20];}` in native byte order and alignment (52 bytes),
    because Kamailio casts the reply bytes straight onto that struct: node and Kamailio must
    share endianness. Validated at construction so that `pack` cannot fail at reply time.
    """

    start_port: int
    end_port: int
    current_port: int
    internal_ip: str
    external_ip: str

    SIZE: ClassVar[int] = _CONF.size

    def __post_init__(self) -> None:
        for name in ("start_port", "end_port", "current_port"):
            value: int = getattr(self, name)
            if not 1 <= value <= 65535:
                raise ConfigError(f"{name}: {value} is outside 1-65535")
        if not self.start_port <= self.current_port <= self.end_port:
            raise ConfigError(
                f"current_port: {self.current_port} is outside start_port-end_port "
                f"{self.start_port}-{self.end_port}; Kamailio allocates from it as given"
            )
        for name in ("internal_ip", "external_ip"):
            value_ip: str = getattr(self, name)
            encoded = value_ip.encode("ascii", "replace")
            if len(encoded) >= CONF_IP_SIZE:
                raise ConfigError(
                    f"{name}: {value_ip!r} is {len(encoded)} characters; lrkproxy's "
                    f"struct lrkp_node_conf holds it in char[{CONF_IP_SIZE}] and needs a NUL "
                    f"terminator, so at most {CONF_IP_SIZE - 1} fit (no IPv6)"
                )
            try:
                IPv4Address(value_ip)
            except ValueError:
                raise ConfigError(
                    f"{name}: {value_ip!r} is not an IPv4 address; Kamailio writes it into "
                    f"the SDP as c=IN IP4"
                ) from None

    @classmethod
    def unpack(cls, body: bytes) -> NodeConfig:
        """The 52-byte struct back into a NodeConfig (lrkp-ctl, tests); ConfigError if
        the values cannot be a node's."""
        if len(body) != _CONF.size:
            raise ConfigError(f"node config is {len(body)} bytes, expected {_CONF.size}")
        start, end, current, internal, external = _CONF.unpack(body)
        return cls(
            start,
            end,
            current,
            internal.rstrip(b"\0").decode("ascii", "replace"),
            external.rstrip(b"\0").decode("ascii", "replace"),
        )

    def pack(self) -> bytes:
        """The 52 bytes Kamailio copies into its node config (NUL-padded IPs)."""
        return _CONF.pack(
            self.start_port,
            self.end_port,
            self.current_port,
            self.internal_ip.encode("ascii"),
            self.external_ip.encode("ascii"),
        )


# --- parsing ------------------------------------------------------------------------------


def parse_request(data: bytes, *, with_cookie: bool = True) -> Request:
    """Parse one request exactly as Kamailio sends it; raise ProtocolError otherwise.

    `with_cookie=False` is UNIX mode, where Kamailio sends no cookie. Nothing but a
    ProtocolError subclass ever escapes, whatever the input (a Hypothesis test holds this).
    The request is strict on purpose: single spaces, positions significant, no trimming,
    no newline, because the only legitimate sender is one C function and anything else is
    better refused with a reason than half-understood.
    """
    cookie: str | None = None
    try:
        if not data:
            raise EmptyRequest("empty request")
        body = data
        if with_cookie:
            cookie = _read_cookie(data)
            if len(data) == len(cookie):
                raise UnknownCommand("no command after the cookie")
            body = data[len(cookie) + 1 :]
        if len(data) > MAX_REQUEST_SIZE:
            raise RequestTooLong(
                f"request is {len(data)} bytes, more than the {MAX_REQUEST_SIZE} accepted"
            )
        return _parse_body(data, cookie, _as_text(body))
    except ProtocolError as error:
        error.cookie = cookie
        error.with_cookie = with_cookie
        raise


def _read_cookie(data: bytes) -> str:
    """The cookie: everything before the first space, if it has gencookie()'s shape."""
    head = data[: MAX_COOKIE_SIZE + 1].partition(b" ")[0]
    if _COOKIE.fullmatch(head) is None:
        raise BadCookie(f"no <number>_<number> cookie at the start: {_show(head)}")
    return head.decode("ascii")


def _as_text(body: bytes) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotText(f"not UTF-8 at byte {exc.start} of the command") from None
    control = _CONTROL.search(text)
    if control is not None:
        raise NotText(
            f"control character {control.group()!r} at offset {control.start()} of the command"
        )
    return text


def _parse_body(raw: bytes, cookie: str | None, text: str) -> Request:
    command, _, _ = text.partition(" ")
    if command in ("P", "G"):
        if text != command:
            raise WrongFieldCount(f"{command} takes no fields, got {_show(text[1:])}")
        if command == "P":
            return Ping(cookie=cookie, raw=raw)
        return GetConfig(cookie=cookie, raw=raw)
    if command in ("S", "D"):
        return _parse_session(raw, cookie, command, text[1:])
    raise UnknownCommand(f"unknown command {_show(command)}; expected P, G, S or D")


def _parse_session(raw: bytes, cookie: str | None, command: str, rest: str) -> Request:
    """Split `␠f1␠f2␠...␠f9␠<call-id>␠` by position (empty fields stay empty).

    Kamailio writes the first field as `" %s "` and the others as `"%s "`: exactly ten
    fields, each followed by one space. A SIP Call-ID is one token (no spaces), so a
    request with more fields is refused rather than folded into the Call-ID.
    """
    expected = len(SESSION_FIELDS)
    parts = rest[1:].split(" ")
    if len(parts) != expected + 1 or parts[-1] != "":
        got = len(parts) - 1 if rest else 0
        raise WrongFieldCount(
            f"{command} needs {expected} fields each followed by one space, got {got}"
        )
    values = dict(zip(SESSION_FIELDS, parts[:-1], strict=True))
    call_id = values["call_id"]
    if not call_id:
        raise MissingCallId(f"{command} has an empty Call-ID")
    _check_call_id(call_id)
    timeout = _timeout(values["timeout"])
    media_names = SESSION_FIELDS[:8]
    if command == "D":
        given = tuple(  # refuses garbage in the fields that are there
            (
                name,
                str(_ip(name, values[name]) if name.endswith("_ip") else _port(name, values[name])),
            )
            for name in media_names
            if values[name]
        )
        if len(given) < len(media_names):
            return DeleteSession(cookie=cookie, raw=raw, call_id=call_id, media=None, given=given)
        media = _media(values)
        return DeleteSession(cookie=cookie, raw=raw, call_id=call_id, media=media, given=given)
    media = _media(values)
    return SetSession(cookie=cookie, raw=raw, media=media, timeout=timeout)


def given_fields(media: CallMedia) -> dict[str, str]:
    """The eight address and port fields an `S` for `media` carries, as `DeleteSession.given`
    writes them: what a `D` built from the same state of the call says."""
    return fields_of(media.caller, media.caller_relay, media.callee, media.callee_relay)


def fields_of(
    caller: Endpoint, caller_relay: Endpoint, callee: Endpoint, callee_relay: Endpoint
) -> dict[str, str]:
    """`given_fields` of the call these four endpoints describe."""
    return {
        "src_ip": str(caller.ip),
        "dst_ip": str(callee_relay.ip),
        "snat_ip": str(caller_relay.ip),
        "dnat_ip": str(callee.ip),
        "src_port": str(caller.port),
        "dst_port": str(callee_relay.port),
        "snat_port": str(caller_relay.port),
        "dnat_port": str(callee.port),
    }


def _media(values: dict[str, str]) -> CallMedia:
    def endpoint(ip_field: str, port_field: str) -> Endpoint:
        return Endpoint(_ip(ip_field, values[ip_field]), _port(port_field, values[port_field]))

    try:
        return CallMedia(
            values["call_id"],
            caller=endpoint("src_ip", "src_port"),
            caller_relay=endpoint("snat_ip", "snat_port"),
            callee=endpoint("dnat_ip", "dnat_port"),
            callee_relay=endpoint("dst_ip", "dst_port"),
        )
    except MediaError as exc:
        raise BadMedia(exc.reason) from exc


def _check_call_id(call_id: str) -> None:
    """One token of printable ASCII (no spaces: the split already saw to that)."""
    if len(call_id.encode()) > MAX_CALL_ID:
        raise BadCallId(f"Call-ID is {len(call_id.encode())} bytes, more than {MAX_CALL_ID}")
    if not (call_id.isascii() and call_id.isprintable()):
        raise BadCallId(f"Call-ID {_show(call_id)} is not printable ASCII")


def _ip(name: str, value: str) -> IPv4Address:
    if not value:
        raise BadAddress(f"{name} is empty")
    try:
        return _parse_ip(value)
    except ValueError:
        raise BadAddress(f"{name}: {_show(value)} is not an IPv4 address") from None


# Every S carries four addresses, mostly the node's own and a few parties': parse each once.
_parse_ip = functools.lru_cache(maxsize=4096)(IPv4Address)


def _port(name: str, value: str) -> int:
    if not value:
        raise BadPort(f"{name} is empty")
    if _DIGITS.fullmatch(value) is None or not 1 <= int(value) <= 65535:
        raise BadPort(f"{name}: {_show(value)} is not a port 1-65535")
    return int(value)


def _timeout(value: str) -> int:
    if _DIGITS.fullmatch(value) is None:
        raise BadTimeout(f"timeout: {_show(value)} is not a non-negative number")
    return int(value)


def _show(value: str | bytes, limit: int = 40) -> str:
    """A peer-supplied value, quoted, ASCII-only and short, safe inside a one-line reason."""
    shown = ascii(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# --- replies ------------------------------------------------------------------------------


def _prefix(cookie: str | None) -> bytes:
    return b"" if cookie is None else cookie.encode("ascii") + b" "


def reply_pong(request: Ping) -> bytes:
    """`<cookie> P PONG` (`P PONG` in UNIX mode): Kamailio expects cookie + 6 bytes."""
    return _prefix(request.cookie) + b"P PONG"


def reply_config(request: GetConfig, config: NodeConfig) -> bytes:
    """`<cookie> G ` + the 52-byte struct: Kamailio expects cookie + 54 bytes."""
    return _prefix(request.cookie) + b"G " + config.pack()


def reply_ok(request: SetSession | DeleteSession) -> bytes:
    """The request exactly as received + `OK`; Kamailio compares its length and `OK`."""
    return request.raw + OK_SUFFIX


def acknowledgeable(request: Request) -> bool:
    """False if Kamailio can never accept the reply to `request` (see MAX_ACKNOWLEDGEABLE)."""
    if isinstance(request, SetSession | DeleteSession):
        return len(request.raw) <= MAX_ACKNOWLEDGEABLE_REQUEST
    return True


def reply_error(error: ProtocolError) -> bytes | None:
    """`<cookie> E <code> <reason>`, or None when a UDP request had no readable cookie.

    Capped at MAX_REPLY_SIZE so it fits whatever buffer Kamailio or a tool reads into.
    """
    if error.with_cookie and error.cookie is None:
        return None
    reason = error.reason.encode("ascii", "backslashreplace")
    reply = _prefix(error.cookie) + b"E " + error.code.encode("ascii") + b" " + reason
    return reply[:MAX_REPLY_SIZE]


def reply_refused(request: SetSession | DeleteSession, code: str, reason: str) -> bytes:
    """`<cookie> E <code> <reason>` for a well-formed request the node could not carry out
    (e.g. the kernel refused the change). Kamailio will not take it for an `OK`."""
    text = reason.encode("ascii", "backslashreplace")
    return (_prefix(request.cookie) + b"E " + code.encode("ascii") + b" " + text)[:MAX_REPLY_SIZE]
