"""rtpengine's ng protocol as a pure codec: datagrams in, typed requests out; replies out.

Sans-IO, like lrkp_tsl/protocol.py for lrkproxy. A datagram is `<cookie> <bencoded dict>`
(ng_control_protocol.md); the reply starts with the same cookie. Kamailio's rtpengine module
makes the cookie `<server_id>_<random>_<seq>` (5.6: `<server_id>_<pid>_<seq>`), one per
request, and resends the *same* datagram on a timeout (`rtpengine_retr`, default 5 times,
`rtpengine_tout_ms` apart): the node answers a resend from its retransmission cache
(lrkp_tsl/retransmit.py, keyed by sender, cookie and a digest of the datagram), never by
applying it twice. Kamailio accepts a reply only if it starts with the cookie.

Every key and flag is looked up in flags.py's table: honoured ones become typed options,
ignored ones are dropped, refused and unknown ones fail the request with an error-reason
naming them. Nothing is half-applied: `parse` refuses the whole request or returns it
whole. The only exception `parse` raises is `NgError` (fuzzed).

Error replies are `{"result": "error", "error-reason": ...}` and nothing else (the ng spec);
where rtpengine has a reason for the same fault, ours starts with its words ("No call-id in
message", "Unknown call-id", "Failed to parse SDP: ..."), so what operators grep for still
matches. Each error also has a `code` for metrics and logs (never on the wire: the spec
allows no other key in an error reply). A datagram without a readable cookie gets no reply:
nobody could match it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address
from typing import Final

from lrkp_tsl.errors import LrkpError
from lrkp_tsl.ng import flags
from lrkp_tsl.ng.bencode import BencodeError, Encodable, Value, decode_dict, encode
from lrkp_tsl.ng.flags import Disposition, Entry, Kind
from lrkp_tsl.ng.sdp import Rewrite, Rtcp, Sdp, SdpError, ipv4
from lrkp_tsl.ng.sdp import parse as parse_sdp

MAX_DATAGRAM: Final = 65535
"""Largest request read (a UDP datagram can carry no more)."""

MAX_COOKIE: Final = 64
"""Longest cookie accepted. Kamailio's is at most 34 bytes (`char cook[35]`)."""

MAX_TOKEN: Final = 128
"""Longest Call-ID, tag or branch: what a kernel map element's comment holds (128 bytes),
like lrkproxy's Call-ID (protocol.MAX_CALL_ID). SIP's are far shorter in practice."""

MAX_DELETE_DELAY: Final = 3600
"""Longest `delete-delay` accepted, in seconds (the node's maximum call lifetime default)."""

COMMANDS: Final = ("ping", "offer", "answer", "delete", "query", "list", "statistics")

UNSUPPORTED: Final = {
    "start recording": "this relay records nothing",
    "stop recording": "this relay records nothing",
    "pause recording": "this relay records nothing",
    "start forwarding": "this relay records nothing",
    "stop forwarding": "this relay records nothing",
    "block DTMF": "this relay neither detects, blocks nor injects DTMF",
    "unblock DTMF": "this relay neither detects, blocks nor injects DTMF",
    "play DTMF": "this relay neither detects, blocks nor injects DTMF",
    "block media": "media is relayed by the kernel or not at all",
    "unblock media": "media is relayed by the kernel or not at all",
    "silence media": "media is relayed by the kernel or not at all",
    "unsilence media": "media is relayed by the kernel or not at all",
    "play media": "this relay plays or generates no media",
    "stop media": "this relay plays or generates no media",
    "publish": "multi-party subscriptions are not served",
    "subscribe request": "multi-party subscriptions are not served",
    "subscribe answer": "multi-party subscriptions are not served",
    "unsubscribe": "multi-party subscriptions are not served",
    "connect": "multi-party subscriptions are not served",
}
"""rtpengine commands this node knows and does not serve, with why."""

ICE_WARNING: Final = (
    "ICE attributes removed: this relay is not an ICE agent (send ICE=remove to say you know)"
)

_COOKIE = re.compile(b"[!-~]{1,%d}" % MAX_COOKIE)
_TOKEN = re.compile(f"[!-~]{{1,{MAX_TOKEN}}}")


class NgError(LrkpError):
    """A request answered with `result: error`; `reason` is the error-reason, `code` the
    stable name for metrics. `cookie` is set once the cookie has been read."""

    def __init__(self, code: str, reason: str, cookie: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.cookie = cookie
        self.command: str | None = None  # the request's command, once it was read
        self.detail = ""  # more than the reason says, for the node's log only


# Error codes (metrics: `ng.error.<code>`); sdp.py adds `bad-sdp` and `unsupported-sdp`.
E_BAD_COOKIE: Final = "bad-cookie"
E_BENCODE: Final = "bad-bencode"
E_NO_COMMAND: Final = "no-command"
E_UNKNOWN_COMMAND: Final = "unknown-command"
E_UNSUPPORTED_COMMAND: Final = "unsupported-command"
E_MISSING: Final = "missing-key"
E_BAD_VALUE: Final = "bad-value"
E_REFUSED: Final = "refused"
E_UNKNOWN_OPTION: Final = "unknown-option"


# --- requests -----------------------------------------------------------------------------


class AddressSource(Enum):
    """Where a party's media address comes from (rtpengine's trust-address and friends)."""

    SDP = "sdp"  # trust-address (the default)
    SIP_SOURCE = "sip-source"  # SIP-source-address: received-from's IP
    MEDIA_ADDRESS = "media-address"  # the media-address key


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaOptions:
    """What an offer or answer asks of the relay, beyond the SDP itself."""

    direction: tuple[str, ...] | None = None  # interface names: sender's, receiver's
    received_from: IPv4Address | None = None
    address_source: AddressSource = AddressSource.SDP
    media_address: IPv4Address | None = None
    rewrite: Rewrite = field(default_factory=Rewrite)
    strict_source: bool = False
    media_handover: bool = False

    def party_ip(self, sdp_ip: IPv4Address) -> IPv4Address:
        """The party's media address for an SDP address (see AddressSource)."""
        if self.address_source is AddressSource.MEDIA_ADDRESS and self.media_address:
            return self.media_address
        if self.address_source is AddressSource.SIP_SOURCE and self.received_from:
            return self.received_from
        return sdp_ip


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    cookie: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """An SDP offer from the side `from_tag` (a re-offer may come from either side)."""

    cookie: str
    call_id: str
    from_tag: str
    to_tag: str | None
    via_branch: str | None
    sdp: Sdp
    options: MediaOptions
    warnings: tuple[str, ...] = ()
    load_limit: bool = False  # `supports: ["load limit"]`: it understands that result


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The SDP answer of side `to_tag` to the offer of side `from_tag`."""

    cookie: str
    call_id: str
    from_tag: str
    to_tag: str
    via_branch: str | None
    sdp: Sdp
    options: MediaOptions
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    cookie: str
    call_id: str
    from_tag: str | None
    to_tag: str | None
    via_branch: str | None
    delay: int | None  # seconds; None: the node's default
    fatal: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    cookie: str
    call_id: str
    from_tag: str | None
    to_tag: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ListCalls:
    cookie: str
    limit: int = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class Statistics:
    cookie: str


Request = Ping | Offer | Answer | Delete | Query | ListCalls | Statistics


# --- parsing ------------------------------------------------------------------------------


def parse(data: bytes) -> Request:
    """One datagram -> its request; NgError (and nothing else) if it cannot be served."""
    cookie: str | None = None
    parser: _Parser | None = None
    try:
        cookie, body = _split_cookie(data)
        try:
            message = decode_dict(body)
        except BencodeError as exc:
            if body[:1] == b"{":
                raise NgError(E_BENCODE, "JSON is not served: send bencode") from None
            raise NgError(E_BENCODE, f"Could not decode bencode dictionary: {exc.reason}") from None
        parser = _Parser(cookie, message)
        return parser.request()
    except NgError as error:
        error.cookie = cookie
        error.command = parser.found.command or None if parser is not None else None
        raise


def _split_cookie(data: bytes) -> tuple[str, bytes]:
    if len(data) > MAX_DATAGRAM:
        raise NgError(E_BAD_VALUE, f"request is {len(data)} bytes, more than {MAX_DATAGRAM}")
    head, space, body = data.partition(b" ")
    if not space or _COOKIE.fullmatch(head) is None:
        raise NgError(E_BAD_COOKIE, f"no '<cookie> ' at the start: {_show(data[:MAX_COOKIE])}")
    return head.decode("ascii"), body


@dataclass(slots=True)
class _Found:
    """What the keys said, as they are read (any order)."""

    command: str = ""
    call_id: str | None = None
    from_tag: str | None = None
    to_tag: str | None = None
    via_branch: str | None = None
    sdp: bytes | None = None
    direction: tuple[str, ...] | None = None
    received_from: IPv4Address | None = None
    received_from_ip6: bool = False
    media_address: IPv4Address | None = None
    sip_source: bool = False
    ice_said: bool = False  # ICE=remove or reject-ICE: no warning
    transport: str | None = None
    delay: int | None = None
    limit: int = 32
    fatal: bool = False
    strict_source: bool = False
    media_handover: bool = False
    replace_origin: bool = False
    replace_session_connection: bool = False
    replace_zero_address: bool = False
    rtcp: Rtcp = Rtcp.SHORT
    rtcp_mux_reject: bool = False
    strip_extmap: bool = False
    load_limit: bool = False


class _Parser:
    def __init__(self, cookie: str, message: dict[bytes, Value]) -> None:
        self.cookie = cookie
        self.message = message
        self.found = _Found()

    def request(self) -> Request:
        raw = self.message.get(b"command")
        if raw is None:
            raise NgError(E_NO_COMMAND, 'Dictionary contains no key "command"')
        command = self.text("command", raw)
        if command not in COMMANDS:
            if command in UNSUPPORTED:
                raise NgError(
                    E_UNSUPPORTED_COMMAND,
                    f"Unsupported command '{command}': {UNSUPPORTED[command]}",
                )
            raise NgError(E_UNKNOWN_COMMAND, f"Unrecognized command {_show(command)}")
        self.found.command = command
        for key, value in self.message.items():
            self.key(self.text("dictionary key", key), value)
        return self.build()

    # -- keys ------------------------------------------------------------------------------

    def key(self, name: str, value: Value) -> None:
        entry = self.entry(Kind.KEY, name)
        found = self.found
        if entry.name == "via-branch":  # ignored, but checked: it is logged with the call
            found.via_branch = self.token(name, value)
            return
        if entry.disposition is Disposition.IGNORED:
            return
        match entry.name:
            case "command":
                pass
            case "call-id":
                found.call_id = self.token(name, value)
            case "from-tag":
                found.from_tag = self.token(name, value)
            case "to-tag":
                found.to_tag = self.token(name, value) if value != b"" else None
            case "sdp":
                if not isinstance(value, bytes):
                    raise self.bad(name, value, "is not a string")
                found.sdp = value
            case "flags":
                for item in self.strings(name, value):
                    self.flag(item)
            case "replace":
                for item in self.strings(name, value):
                    self.replace(item)
            case "rtcp-mux":
                for item in self.strings(name, value):
                    if self.entry(Kind.RTCP_MUX, item).name == "reject":
                        found.rtcp_mux_reject = True
            case "direction":
                names = self.strings(name, value)
                if not 1 <= len(names) <= 2 or any(_TOKEN.fullmatch(n) is None for n in names):
                    raise self.bad(name, value, "is not one or two interface names")
                found.direction = tuple(names)
            case "received-from":
                self.received_from(name, value)
            case "media-address":
                found.media_address = self.ipv4(name, value)
            case "ICE" | "address-family" | "DTLS" | "record-call" | "generate-RTCP":
                chosen = self.value_of(entry, self.text(name, value))
                if chosen.name == "ICE=remove":
                    found.ice_said = True
            case "SDES":
                for item in self.strings(name, value):
                    self.value_of(entry, item)
            case "transport-protocol":
                found.transport = self.text(name, value)
            case "delete-delay":
                found.delay = self.integer(name, value, 0, MAX_DELETE_DELAY)
            case "limit":
                found.limit = self.integer(name, value, 1, 1_000_000)
            case "supports":
                found.load_limit = "load limit" in self.strings(name, value)
            case _:  # pragma: no cover - a honoured key without a case is a bug here
                raise AssertionError(f"honoured key {entry.name!r} has no parser")

    def flag(self, name: str) -> None:
        entry = self.entry(Kind.FLAG, name)
        if entry.disposition is Disposition.IGNORED:
            return
        found = self.found
        match entry.name:
            case "SIP-source-address":
                found.sip_source = True
            case "trust-address":
                found.sip_source = False
            case "strict-source":
                found.strict_source = True
            case "media-handover":
                found.media_handover = True
            case "no-rtcp-attribute":
                found.rtcp = Rtcp.NONE
            case "full-rtcp-attribute":
                found.rtcp = Rtcp.FULL
            case "reject-ICE":
                found.ice_said = True
            case "strip-extmap":
                found.strip_extmap = True
            case "fatal":
                found.fatal = True
            case "symmetric" | "port-latching" | "original-sendrecv":
                pass  # the node's default
            case _:  # pragma: no cover - a honoured flag without a case is a bug here
                raise AssertionError(f"honoured flag {entry.name!r} has no case")

    def replace(self, name: str) -> None:
        entry = self.entry(Kind.REPLACE, name)
        if entry.name == "origin":
            self.found.replace_origin = True
        elif entry.name == "session-connection":
            self.found.replace_session_connection = True
        elif entry.name == "zero-address":
            self.found.replace_zero_address = True

    def received_from(self, name: str, value: Value) -> None:
        items = self.strings(name, value)
        if len(items) != 2:
            raise self.bad(name, value, 'is not ["IP4", address]')
        family, address = items
        if family == "IP6":
            self.found.received_from_ip6 = True
            return
        if family != "IP4":
            raise self.bad(name, value, "has an address family other than IP4 or IP6")
        self.found.received_from = self.ipv4(name, address.encode())

    # -- the request ----------------------------------------------------------------------

    def build(self) -> Request:
        found, cookie, command = self.found, self.cookie, self.found.command
        if command == "ping":
            return Ping(cookie=cookie)
        if command == "statistics":
            return Statistics(cookie=cookie)
        if command == "list":
            return ListCalls(cookie=cookie, limit=found.limit)
        if command in ("offer", "answer") and found.sdp is None:
            raise NgError(E_MISSING, "No SDP body in message")
        if found.call_id is None:
            raise NgError(E_MISSING, "No call-id in message")
        if command == "query":
            return Query(
                cookie=cookie, call_id=found.call_id, from_tag=found.from_tag, to_tag=found.to_tag
            )
        if command == "delete":
            return Delete(
                cookie=cookie,
                call_id=found.call_id,
                from_tag=found.from_tag,
                to_tag=found.to_tag,
                via_branch=found.via_branch,
                delay=found.delay,
                fatal=found.fatal,
            )
        if found.from_tag is None:
            raise NgError(E_MISSING, "No from-tag in message")
        if command == "answer" and found.to_tag is None:
            raise NgError(E_MISSING, "No to-tag in message")
        assert found.sdp is not None
        try:
            sdp = parse_sdp(found.sdp)
        except SdpError as exc:
            prefix = "Failed to parse SDP" if exc.code == "bad-sdp" else "Unsupported SDP"
            raise NgError(exc.code, f"{prefix}: {exc.reason}") from None
        options = self.options(sdp, answer=command == "answer")
        warnings = (ICE_WARNING,) if sdp.has_ice and not found.ice_said else ()
        if command == "offer":
            return Offer(
                cookie=cookie,
                call_id=found.call_id,
                from_tag=found.from_tag,
                to_tag=found.to_tag,
                via_branch=found.via_branch,
                sdp=sdp,
                options=options,
                warnings=warnings,
                load_limit=found.load_limit,
            )
        assert found.to_tag is not None
        return Answer(
            cookie=cookie,
            call_id=found.call_id,
            from_tag=found.from_tag,
            to_tag=found.to_tag,
            via_branch=found.via_branch,
            sdp=sdp,
            options=options,
            warnings=warnings,
        )

    def options(self, sdp: Sdp, *, answer: bool) -> MediaOptions:
        found = self.found
        if found.transport is not None and found.transport != "accept":
            for media in sdp.media:
                if not media.rejected and media.proto != found.transport:
                    raise NgError(
                        E_REFUSED,
                        f"transport-protocol {_show(found.transport)} refused: m= line "
                        f"{media.index + 1} is {media.proto}, and {flags.CRYPTO}",
                    )
        if answer and found.rtcp_mux_reject and any(m.rtcp_mux for m in sdp.media):
            raise NgError(
                E_REFUSED,
                "rtcp-mux reject refused in an answer that accepts rtcp-mux: the answerer "
                "sends RTCP on its RTP port, the offerer would not expect it",
            )
        source = AddressSource.SDP
        if found.media_address is not None:
            source = AddressSource.MEDIA_ADDRESS
        elif found.sip_source:
            if found.received_from is None:
                raise NgError(
                    E_BAD_VALUE,
                    'SIP-source-address needs received-from ["IP4", address]'
                    + (
                        " (it is IPv6: this relay carries IPv4 only)"
                        if found.received_from_ip6
                        else ""
                    ),
                )
            source = AddressSource.SIP_SOURCE
        return MediaOptions(
            direction=found.direction,
            received_from=found.received_from,
            address_source=source,
            media_address=found.media_address,
            rewrite=Rewrite(
                replace_origin=found.replace_origin,
                replace_session_connection=found.replace_session_connection,
                replace_zero_address=found.replace_zero_address,
                strip_ice=True,
                rtcp=found.rtcp,
                strip_rtcp_mux=found.rtcp_mux_reject and not answer,
                strip_extmap=found.strip_extmap,
            ),
            strict_source=found.strict_source,
            media_handover=found.media_handover,
        )

    # -- values ----------------------------------------------------------------------------

    def entry(self, kind: Kind, name: str) -> Entry:
        entry = flags.lookup(kind, name)
        if entry is None:
            what = {Kind.KEY: "key", Kind.FLAG: "flag"}.get(kind, kind.value)
            raise NgError(
                E_UNKNOWN_OPTION,
                f"unknown {what} {_show(name)}: not an rtpengine 10.5 {what} this relay knows, "
                "so it cannot tell whether it would do it (docs/ng.md lists every one)",
            )
        if entry.disposition is Disposition.REFUSED:
            raise NgError(E_REFUSED, entry.refusal(name))
        return entry

    def value_of(self, key: Entry, value: str) -> Entry:
        entry = flags.value_entry(key, value)
        if entry is None:
            raise NgError(E_UNKNOWN_OPTION, f"unknown value {_show(value)} for {key.name}")
        if entry.disposition is Disposition.REFUSED:
            raise NgError(E_REFUSED, entry.refusal(f"{key.name}={value}"))
        return entry

    def text(self, name: str, value: Value) -> str:
        if not isinstance(value, bytes):
            raise self.bad(name, value, "is not a string")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(name, value, "is not UTF-8") from None

    def token(self, name: str, value: Value) -> str:
        text = self.text(name, value)
        if _TOKEN.fullmatch(text) is None:
            raise self.bad(
                name, value, f"is not 1-{MAX_TOKEN} bytes of printable ASCII without spaces"
            )
        return text

    def strings(self, name: str, value: Value) -> list[str]:
        if not isinstance(value, list):
            raise self.bad(name, value, "is not a list")
        return [self.text(f"an item of {name}", item) for item in value]

    def ipv4(self, name: str, value: Value) -> IPv4Address:
        text = self.text(name, value)
        try:
            return ipv4(text)
        except ValueError:
            raise self.bad(name, value, "is not an IPv4 address") from None

    def integer(self, name: str, value: Value, low: int, high: int) -> int:
        if isinstance(value, bytes) and value.isdigit() and len(value) <= 10:
            value = int(value)
        if not isinstance(value, int) or not low <= value <= high:
            raise self.bad(name, value, f"is not a whole number {low}-{high}")
        return value

    def bad(self, name: str, value: Value, why: str) -> NgError:
        return NgError(E_BAD_VALUE, f"{name} {_show(_plain(value))} {why}")


def _plain(value: Value) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


# --- replies ------------------------------------------------------------------------------


def reply(cookie: str, fields: Mapping[str, Encodable]) -> bytes:
    """`<cookie> <bencoded fields>`, canonical (keys sorted)."""
    return cookie.encode("ascii") + b" " + encode(fields)


def reply_pong(request: Ping) -> bytes:
    return reply(request.cookie, {"result": "pong"})


def reply_ok(cookie: str, warnings: tuple[str, ...] = (), **fields: Encodable) -> bytes:
    """`result: ok`, the given fields, and `warning` if there are any (joined by "; ")."""
    body: dict[str, Encodable] = {"result": "ok", **fields}
    if warnings:
        body["warning"] = "; ".join(warnings)
    return reply(cookie, body)


def reply_error(error: NgError) -> bytes | None:
    """`result: error` with the error-reason; None if no cookie could be read."""
    if error.cookie is None:
        return None
    return reply(error.cookie, {"result": "error", "error-reason": error.reason})


def _show(value: object, limit: int = 60) -> str:
    """A peer-supplied value, quoted, ASCII-only and short, safe inside one reason."""
    shown = ascii(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
