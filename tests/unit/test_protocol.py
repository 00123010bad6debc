"""The lrkproxy wire codec, byte for byte (lrkp-protocol.md §1-§2, worked call §9)."""

from __future__ import annotations

import re
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl import protocol
from lrkp_tsl.errors import ConfigError
from lrkp_tsl.media import CallMedia, Endpoint
from lrkp_tsl.protocol import (
    CATALOGUE,
    ERRORS,
    MAX_ACKNOWLEDGEABLE_REQUEST,
    MAX_CALL_ID,
    MAX_REPLY_SIZE,
    MAX_REQUEST_SIZE,
    BadAddress,
    BadCallId,
    BadCookie,
    BadMedia,
    BadPort,
    BadTimeout,
    DeleteSession,
    EmptyRequest,
    GetConfig,
    MissingCallId,
    NodeConfig,
    NotText,
    Ping,
    ProtocolError,
    Request,
    RequestTooLong,
    SetSession,
    UnknownCommand,
    WrongFieldCount,
    acknowledgeable,
    parse_request,
    reply_config,
    reply_error,
    reply_ok,
    reply_pong,
)


def ep(text: str) -> Endpoint:
    ip, port = text.split(":")
    return Endpoint(IPv4Address(ip), int(port))


def session(command: str, fields: list[str], cookie: str | None = "1_2") -> bytes:
    """Build an S/D the way lrkp_set_conntrack_rule does: " %s " then "%s " per field."""
    prefix = "" if cookie is None else cookie + " "
    return (prefix + command + " " + "".join(field + " " for field in fields)).encode()


WORKED_FIELDS = [
    "10.0.0.21", "10.0.0.10", "10.0.0.10", "10.0.1.31",
    "4000", "20000", "20002", "6000", "60", "a84b4c76e66710@10.0.0.21",
]  # fmt: skip

# lrkp-protocol.md §9: TSL at 10.0.0.10, range 20000-40000, A=10.0.0.21:4000, B=10.0.1.31:6000.
CONFIG = NodeConfig(20000, 40000, 20000, "10.0.0.10", "203.0.113.10")
WORKED_MEDIA = CallMedia(
    "a84b4c76e66710@10.0.0.21",
    caller=ep("10.0.0.21:4000"),
    caller_relay=ep("10.0.0.10:20002"),
    callee=ep("10.0.1.31:6000"),
    callee_relay=ep("10.0.0.10:20000"),
)
WORKED_S = (
    b"1957747793_44 S 10.0.0.21 10.0.0.10 10.0.0.10 10.0.1.31 4000 20000 20002 6000 60 "
    b"a84b4c76e66710@10.0.0.21 "
)
WORKED_D = (
    b"211503264_45 D 10.0.0.21 10.0.0.10 10.0.0.10 10.0.1.31 4000 20000 20002 6000 60 "
    b"a84b4c76e66710@10.0.0.21 "
)
# The G reply of §9, as its hex dump shows it (x86: native = little-endian int32).
WORKED_G_REPLY = bytes.fromhex(
    " ".join(
        [
            "38 34 36 39 33 30 38 38 36 5f 34 33 20 47 20",  # "846930886_43 G "
            "20 4e 00 00 40 9c 00 00 20 4e 00 00",  # 20000 | 40000 | 20000
            "31 30 2e 30 2e 30 2e 31 30" + " 00" * 11,  # "10.0.0.10" + 11 NUL
            "32 30 33 2e 30 2e 31 31 33 2e 31 30" + " 00" * 8,  # "203.0.113.10" + 8 NUL
        ]
    )
)


def reply_for(request: Request) -> bytes:
    match request:
        case Ping():
            return reply_pong(request)
        case GetConfig():
            return reply_config(request, CONFIG)
        case SetSession() | DeleteSession():
            return reply_ok(request)


# --- the worked call ----------------------------------------------------------------------

WORKED_CALL = [
    pytest.param(
        b"1804289383_42 P",
        Ping(cookie="1804289383_42", raw=b"1804289383_42 P"),
        b"1804289383_42 P PONG",
        id="P",
    ),
    pytest.param(
        b"846930886_43 G",
        GetConfig(cookie="846930886_43", raw=b"846930886_43 G"),
        WORKED_G_REPLY,
        id="G",
    ),
    pytest.param(
        WORKED_S,
        SetSession(cookie="1957747793_44", raw=WORKED_S, media=WORKED_MEDIA, timeout=60),
        WORKED_S + b"OK",
        id="S",
    ),
    pytest.param(
        WORKED_D,
        DeleteSession(
            cookie="211503264_45", raw=WORKED_D, call_id=WORKED_MEDIA.call_id, media=WORKED_MEDIA
        ),
        WORKED_D + b"OK",
        id="D",
    ),
]


@pytest.mark.parametrize(("data", "request_", "reply"), WORKED_CALL)
def test_worked_call_parses_and_replies_byte_for_byte(
    data: bytes, request_: Request, reply: bytes
) -> None:
    parsed = parse_request(data)
    assert parsed == request_
    assert reply_for(parsed) == reply


def test_worked_call_lengths_are_what_kamailio_expects() -> None:
    assert (len(b"1804289383_42 P"), len(b"1804289383_42 P PONG")) == (15, 20)
    assert len(WORKED_G_REPLY) == 67 == 13 + 1 + 52 + 1
    request = parse_request(WORKED_S)
    assert isinstance(request, SetSession)
    assert (len(WORKED_S), len(reply_ok(request))) == (106, 108)


def kamailio_udp_accepts(request: bytes, reply: bytes) -> bool:
    """send_lrkp_command's UDP check, transcribed (fall-through switch included).

    `cookie` is v[0] (with its space), `more` the bytes after it, 1 the command iovec.
    """
    cookie = request.partition(b" ")[0] + b" "
    more = len(request) - len(cookie) if request[len(cookie) :][:1] in (b"S", b"D") else 0
    reply = reply[:MAX_REPLY_SIZE]  # recv(fd, buf, sizeof(buf) - 1)
    n = len(reply)
    if reply[: len(cookie) - 1] != cookie[:-1]:
        return False
    command = reply[len(cookie) : len(cookie) + 1]
    cases = [(b"P", len(cookie) + 1 + 4 + 1), (b"G", len(cookie) + 1 + 52 + 1)]
    cases += [(b"S", more + len(cookie) + 2), (b"D", more + len(cookie) + 2)]
    for index, (letter, _) in enumerate(cases):
        if command == letter:  # no break in any case: later lengths also match
            return any(n == later for _, later in cases[index:])
    return False


@pytest.mark.parametrize(("data", "request_", "reply"), WORKED_CALL)
def test_kamailio_accepts_each_worked_reply(data: bytes, request_: Request, reply: bytes) -> None:
    assert kamailio_udp_accepts(data, reply_for(parse_request(data)))


def test_config_pack_is_the_native_52_byte_struct() -> None:
    packed = CONFIG.pack()
    assert len(packed) == NodeConfig.SIZE == 52
    assert packed == WORKED_G_REPLY[15:]


# --- cookies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cookie",
    [
        "1804289383_42",  # fastrand() cookie
        "-1804289383_42",  # fastrand() > INT_MAX printed with %d
        "-2147483648_4294967295",  # the extremes of %d and %u
        "31337_0",  # <pid>_<seq> of releases before 2025
        "0_0",
    ],
)
@pytest.mark.parametrize("command", ["P", "G"])
def test_both_cookie_formats_are_echoed(cookie: str, command: str) -> None:
    data = f"{cookie} {command}".encode()
    request = parse_request(data)
    assert request.cookie == cookie
    reply = reply_for(request)
    assert reply.startswith(cookie.encode() + b" " + command.encode() + b" ")
    assert kamailio_udp_accepts(data, reply)


def test_negative_cookie_on_a_session_command() -> None:
    data = session("S", WORKED_FIELDS, cookie="-1804289383_42")
    request = parse_request(data)
    assert isinstance(request, SetSession)
    assert request.cookie == "-1804289383_42"
    assert reply_ok(request) == data + b"OK"
    assert kamailio_udp_accepts(data, reply_ok(request))


# --- S/D field mapping and layout ---------------------------------------------------------


def test_s_fields_map_onto_call_media_by_position() -> None:
    fields = ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4", "1001", "2002", "3003", "4004"]
    request = parse_request(session("S", [*fields, "45", "cid"]))
    assert isinstance(request, SetSession)
    assert request.timeout == 45
    assert request.media == CallMedia(
        "cid",
        caller=ep("1.1.1.1:1001"),  # src_ip:src_port
        caller_relay=ep("3.3.3.3:3003"),  # snat_ip:snat_port
        callee=ep("4.4.4.4:4004"),  # dnat_ip:dnat_port
        callee_relay=ep("2.2.2.2:2002"),  # dst_ip:dst_port
    )


def test_shared_port_mode_parses() -> None:
    fields = ["10.0.0.21", "10.0.0.10", "10.0.0.10", "10.0.1.31", "4000", "20000", "20000"]
    request = parse_request(session("S", [*fields, "6000", "60", "gt1"]))
    assert isinstance(request, SetSession)
    assert request.media.shared_port


@pytest.mark.parametrize(
    ("call_id_field", "call_id"),
    [
        ("a84b4c76e66710@10.0.0.21", "a84b4c76e66710@10.0.0.21"),
        ("x", "x"),
        ('3c2b"q\\x[1]@host:5060', '3c2b"q\\x[1]@host:5060'),  # SIP word characters
        ("c" * MAX_CALL_ID, "c" * MAX_CALL_ID),
    ],
)
def test_call_id_is_the_tenth_field(call_id_field: str, call_id: str) -> None:
    request = parse_request(session("S", [*WORKED_FIELDS[:9], call_id_field]))
    assert isinstance(request, SetSession)
    assert request.media.call_id == call_id


@pytest.mark.parametrize(
    ("call_id_field", "error", "reason"),
    [
        # Extra fields are refused, not folded into the Call-ID.
        ("abc@h x x 60 1 2", WrongFieldCount, "got 15"),
        ("trailing ", WrongFieldCount, "got 11"),
        ("c" * (MAX_CALL_ID + 1), BadCallId, "129 bytes"),
        ("caf\u00e9@host", BadCallId, "not printable ASCII"),
        ("tab\there", NotText, "control character"),
    ],
)
def test_call_id_must_be_one_bounded_printable_token(
    call_id_field: str, error: type[ProtocolError], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        parse_request(session("S", [*WORKED_FIELDS[:9], call_id_field]))


D_CASES = [
    pytest.param(
        # CANCEL before any answer: the entry holds only the offer's half.
        ["10.0.0.21", "10.0.0.10", "", "", "4000", "20000", "", "", "60", "cid"],
        b"1_2 D 10.0.0.21 10.0.0.10   4000 20000   60 cid ",
        None,
        id="offer-half-only",
    ),
    pytest.param(
        ["", "", "", "", "", "", "", "", "60", "cid"],
        b"1_2 D         60 cid ",
        None,
        id="all-empty",
    ),
    pytest.param(
        [*WORKED_FIELDS[:9], "cid"],
        b"1_2 D 10.0.0.21 10.0.0.10 10.0.0.10 10.0.1.31 4000 20000 20002 6000 60 cid ",
        CallMedia(
            "cid",
            caller=ep("10.0.0.21:4000"),
            caller_relay=ep("10.0.0.10:20002"),
            callee=ep("10.0.1.31:6000"),
            callee_relay=ep("10.0.0.10:20000"),
        ),
        id="complete",
    ),
]


@pytest.mark.parametrize(("fields", "wire", "media"), D_CASES)
def test_delete_with_empty_fields_keeps_positions(
    fields: list[str], wire: bytes, media: CallMedia | None
) -> None:
    assert session("D", fields) == wire  # the helper builds what Kamailio sends
    request = parse_request(wire)
    assert request == DeleteSession(cookie="1_2", raw=wire, call_id="cid", media=media)
    assert reply_ok(request) == wire + b"OK"


# --- UNIX mode (umode 0): no cookie, cookie-less replies ----------------------------------


def kamailio_unix_accepts(request: bytes, reply: bytes) -> bool:
    """UNIX mode: one read() of <= 255 bytes; callers read at cookie_len (0) offsets."""
    buf = reply[:MAX_REPLY_SIZE]
    if not buf:
        return False  # len <= 0 -> badproxy: the node is disabled
    match request[:1]:
        case b"P":
            return buf[2:6] == b"PONG"
        case b"G":
            return len(buf) >= 2 + 52 and buf[2 : 2 + 52] == CONFIG.pack()
        case _:
            return buf[len(request) : len(request) + 2] == b"OK"


UNIX_CASES = [
    pytest.param(b"P", Ping(cookie=None, raw=b"P"), b"P PONG", id="P"),
    pytest.param(b"G", GetConfig(cookie=None, raw=b"G"), b"G " + CONFIG.pack(), id="G"),
    pytest.param(
        WORKED_S[len(b"1957747793_44 ") :],
        SetSession(cookie=None, raw=WORKED_S[14:], media=WORKED_MEDIA, timeout=60),
        WORKED_S[14:] + b"OK",
        id="S",
    ),
    pytest.param(
        b"D 10.0.0.21 10.0.0.10   4000 20000   60 cid ",
        DeleteSession(
            cookie=None,
            raw=b"D 10.0.0.21 10.0.0.10   4000 20000   60 cid ",
            call_id="cid",
            media=None,
        ),
        b"D 10.0.0.21 10.0.0.10   4000 20000   60 cid OK",
        id="D",
    ),
]


@pytest.mark.parametrize(("data", "request_", "reply"), UNIX_CASES)
def test_unix_mode_has_no_cookie_and_replies_without_one(
    data: bytes, request_: Request, reply: bytes
) -> None:
    parsed = parse_request(data, with_cookie=False)
    assert parsed == request_
    assert reply_for(parsed) == reply
    assert kamailio_unix_accepts(data, reply)


def test_unix_mode_does_not_take_a_cookie() -> None:
    with pytest.raises(UnknownCommand) as caught:
        parse_request(b"1_2 P", with_cookie=False)
    assert caught.value.cookie is None
    assert reply_error(caught.value) == (
        b"E unknown-command unknown command '1_2'; expected P, G, S or D"
    )


# --- malformed input ----------------------------------------------------------------------

GOOD_S = session("S", WORKED_FIELDS)


def with_field(index: int, value: str, command: str = "S") -> bytes:
    fields = list(WORKED_FIELDS)
    fields[index] = value
    return session(command, fields)


MALFORMED = [
    # (data, error, cookie the error carries, reason pattern)
    pytest.param(b"", EmptyRequest, None, "empty", id="empty"),
    pytest.param(b"1_2 \xff\xfe", NotText, "1_2", "not UTF-8 at byte 0", id="binary"),
    pytest.param(b"1_2 P\x00", NotText, "1_2", r"'\\x00' at offset 1", id="nul"),
    pytest.param(b"1_2 P\n", NotText, "1_2", r"'\\n' at offset 1", id="newline"),
    pytest.param(b"1_2 P\x7f", NotText, "1_2", r"'\\x7f' at offset 1", id="del"),
    pytest.param(b"1_2 S " + b"x" * 2000, RequestTooLong, "1_2", "2006 bytes", id="huge"),
    pytest.param(b"x" * 5000, BadCookie, None, "cookie", id="huge-no-cookie"),
    pytest.param(b"P", BadCookie, None, "cookie", id="no-cookie"),
    pytest.param(b"abc_1 P", BadCookie, None, "abc_1", id="cookie-letters"),
    pytest.param(b"1_ P", BadCookie, None, "cookie", id="cookie-no-seq"),
    pytest.param(b"--1_2 P", BadCookie, None, "cookie", id="cookie-double-minus"),
    pytest.param(b" 1_2 P", BadCookie, None, "cookie", id="leading-space"),
    pytest.param(b"12345678901_1 P", BadCookie, None, "cookie", id="cookie-11-digits"),
    pytest.param(b"1_2", UnknownCommand, "1_2", "no command", id="cookie-only"),
    pytest.param(b"1_2 ", UnknownCommand, "1_2", "unknown command ''", id="empty-command"),
    pytest.param(b"1_2 X", UnknownCommand, "1_2", "'X'", id="unknown"),
    pytest.param(b"1_2 p", UnknownCommand, "1_2", "'p'", id="lowercase"),
    pytest.param(b"1_2 PING", UnknownCommand, "1_2", "'PING'", id="word"),
    pytest.param(b"1_2 V", UnknownCommand, "1_2", "'V'", id="rtpproxy-version"),
    pytest.param(b"1_2 P extra", WrongFieldCount, "1_2", "P takes no fields", id="P-args"),
    pytest.param(b"1_2 G ", WrongFieldCount, "1_2", "G takes no fields", id="G-space"),
    pytest.param(b"1_2 S", WrongFieldCount, "1_2", "got 0", id="S-bare"),
    pytest.param(
        session("S", WORKED_FIELDS[:9]), WrongFieldCount, "1_2", "got 9", id="S-9-fields"
    ),
    pytest.param(GOOD_S[:-1], WrongFieldCount, "1_2", "got 9", id="S-no-trailing-space"),
    pytest.param(
        GOOD_S.replace(b"S ", b"S  ", 1),
        WrongFieldCount, "1_2", "got 11", id="doubled-space-is-an-extra-field",
    ),
    pytest.param(with_field(0, "10.0.0.256"), BadAddress, "1_2", "src_ip", id="ip-octet"),
    pytest.param(with_field(1, "::1"), BadAddress, "1_2", "dst_ip: '::1'", id="ipv6"),
    pytest.param(with_field(2, "010.0.0.1"), BadAddress, "1_2", "snat_ip", id="ip-zeros"),
    pytest.param(with_field(3, ""), BadAddress, "1_2", "dnat_ip is empty", id="S-empty-ip"),
    pytest.param(with_field(4, "0"), BadPort, "1_2", "src_port: '0'", id="port-0"),
    pytest.param(with_field(5, "65536"), BadPort, "1_2", "dst_port", id="port-65536"),
    pytest.param(with_field(6, "+80"), BadPort, "1_2", "snat_port", id="port-plus"),
    pytest.param(with_field(7, "6O00"), BadPort, "1_2", "dnat_port", id="port-letter"),
    pytest.param(with_field(7, ""), BadPort, "1_2", "dnat_port is empty", id="S-empty-port"),
    pytest.param(with_field(4, "65535"), BadMedia, "1_2", "RTCP port 65536", id="rtcp-over"),
    pytest.param(with_field(8, "sixty"), BadTimeout, "1_2", "'sixty'", id="timeout-word"),
    pytest.param(with_field(8, "-1"), BadTimeout, "1_2", "'-1'", id="timeout-negative"),
    pytest.param(with_field(8, ""), BadTimeout, "1_2", "''", id="timeout-empty"),
    pytest.param(with_field(9, ""), MissingCallId, "1_2", "empty Call-ID", id="no-call-id"),
    pytest.param(with_field(9, "c" * 129), BadCallId, "1_2", "129 bytes", id="call-id-long"),
    pytest.param(
        with_field(9, "", "D"), MissingCallId, "1_2", "D has an empty", id="D-no-call-id"
    ),
    pytest.param(
        session("D", ["10.0.0.999", "", "", "", "", "", "", "", "60", "cid"]),
        BadAddress, "1_2", "src_ip", id="D-partial-bad-ip",
    ),
    pytest.param(
        session("D", ["", "", "", "", "99999", "", "", "", "60", "cid"]),
        BadPort, "1_2", "src_port", id="D-partial-bad-port",
    ),
    pytest.param(
        session("S", ["10.0.0.21", "10.0.0.10", "10.0.0.10", "10.0.0.21",
                      "4000", "20000", "20000", "4000", "60", "cid"]),
        BadMedia, "1_2", "could not tell", id="shared-port-same-party",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("data", "error", "cookie", "reason"), MALFORMED)
def test_malformed_requests_raise_the_catalogued_error(
    data: bytes, error: type[ProtocolError], cookie: str | None, reason: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(data)
    assert type(caught.value) is error
    assert caught.value.cookie == cookie
    assert re.search(reason, caught.value.reason), caught.value.reason


@pytest.mark.parametrize(("data", "error", "cookie", "reason"), MALFORMED)
def test_error_reply_is_cookie_E_code_reason_or_nothing(
    data: bytes, error: type[ProtocolError], cookie: str | None, reason: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(data)
    reply = reply_error(caught.value)
    if cookie is None:
        assert reply is None  # UDP mode: nobody could match a reply without the cookie
        return
    assert reply == f"{cookie} E {error.code} {caught.value.reason}".encode()[:MAX_REPLY_SIZE]
    assert not kamailio_udp_accepts(data, reply)


def test_request_size_limit_is_inclusive() -> None:
    fits = session("S", [*WORKED_FIELDS[:9], "c" * 2000])[: MAX_REQUEST_SIZE - 1] + b" "
    assert len(fits) == MAX_REQUEST_SIZE
    with pytest.raises(BadCallId):  # refused for what it says, not for its length
        parse_request(fits)
    with pytest.raises(RequestTooLong):
        parse_request(fits[:-1] + b"c ")


def test_error_reply_is_capped_and_ascii() -> None:
    error = BadMedia("\u00e9" + "x" * 1000, cookie="1_2")
    reply = reply_error(error)
    assert reply is not None
    assert len(reply) == MAX_REPLY_SIZE
    assert reply.startswith(b"1_2 E bad-media \\xe9xxx")


def test_unix_mode_error_reply_has_no_cookie() -> None:
    with pytest.raises(EmptyRequest) as caught:
        parse_request(b"", with_cookie=False)
    assert reply_error(caught.value) == b"E empty empty request"


# --- acknowledgeable size -----------------------------------------------------------------


def test_kamailio_can_acknowledge_every_s_the_node_accepts() -> None:
    """The longest S that parses (widest cookie, IPs, ports and timeout, longest Call-ID)
    is exactly 253 bytes: its reply still fits the 255 bytes Kamailio reads."""
    widest = ["100.100.100.101", "100.100.100.100", "100.100.100.100", "100.100.100.102",
              "65000", "65000", "65002", "65000", "1234567890", "c" * MAX_CALL_ID]  # fmt: skip
    data = session("S", widest, cookie="-2147483648_4294967295")
    assert len(data) == MAX_ACKNOWLEDGEABLE_REQUEST == 253
    request = parse_request(data)
    assert isinstance(request, SetSession) and acknowledgeable(request)
    assert kamailio_udp_accepts(data, reply_ok(request))
    longer = data[:-1] + b"c "
    assert not kamailio_udp_accepts(longer, longer + b"OK")
    with pytest.raises(BadCallId):
        parse_request(longer)


def test_ping_and_config_are_always_acknowledgeable() -> None:
    assert acknowledgeable(parse_request(b"-2147483648_4294967295 G"))
    assert acknowledgeable(parse_request(b"1_2 P"))


# --- node config --------------------------------------------------------------------------


def test_the_longest_ipv4_is_nul_padded_to_20_bytes() -> None:
    ip = "255.255.255.255"
    packed = NodeConfig(1, 2, 1, ip, ip).pack()
    assert packed[12:32] == ip.encode() + b"\x00" * 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"internal_ip": "2001:db8::10"}, r"internal_ip: '2001:db8::10' is not an IPv4"),
        (
            {"external_ip": "2001:db8:0:0:0:0:0:10"},
            r"external_ip: '2001:db8:0:0:0:0:0:10' is 21 characters.*char\[20\].*NUL",
        ),
        ({"internal_ip": "10.0.0.10.10.0.0.100"}, r"internal_ip: .* is 20 characters"),
        ({"internal_ip": ""}, "internal_ip: '' is not an IPv4"),
        ({"external_ip": '"192.168.10.226"'}, "not an IPv4"),  # the quoted .ini value
        ({"start_port": 0}, "start_port: 0 is outside 1-65535"),
        ({"end_port": 70000}, "end_port: 70000"),
        ({"current_port": 19999}, "current_port: 19999 is outside"),
    ],
)
def test_node_config_refuses_what_the_struct_cannot_carry(
    change: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = {
        "start_port": 20000,
        "end_port": 40000,
        "current_port": 20000,
        "internal_ip": "10.0.0.10",
        "external_ip": "203.0.113.10",
    }
    fields.update(change)
    with pytest.raises(ConfigError, match=message):
        NodeConfig(**fields).pack()  # type: ignore[arg-type]


# --- the catalogue ------------------------------------------------------------------------


def test_catalogue_codes_are_unique_and_named_after_their_code() -> None:
    codes = [entry.code for entry in CATALOGUE]
    assert len(codes) == len(set(codes))
    for name in dir(protocol):
        value = getattr(protocol, name)
        if isinstance(value, protocol.ReplyCode):
            assert name == "E_" + value.code.upper().replace("-", "_")
            assert value in CATALOGUE


def test_every_error_class_has_its_own_catalogue_entry() -> None:
    assert [error.reply_code for error in ERRORS] == list(CATALOGUE)
    for error in ERRORS:
        assert issubclass(error, ProtocolError)
        assert error.code == error.reply_code.code
    assert {case.values[1] for case in MALFORMED} == set(ERRORS)  # each is reachable


# --- fuzzing: anything parses or raises ProtocolError -------------------------------------

FIELD_VALUES = st.sampled_from(
    ["", " ", "10.0.0.1", "10.0.0.2", "1.2.3.4.5", "4000", "4001", "65535", "0", "60", "x",
     "-1", "\u0661", "cid", "S", "D"]
)  # fmt: skip


def check_any_input(data: bytes, with_cookie: bool) -> None:
    try:
        request = parse_request(data, with_cookie=with_cookie)
    except ProtocolError as error:
        reply = reply_error(error)
        if reply is not None:
            assert reply.startswith(b"" if error.cookie is None else error.cookie.encode() + b" ")
            assert len(reply) <= MAX_REPLY_SIZE
        return
    assert request.raw == data
    assert reply_for(request)


@settings(max_examples=500)
@given(data=st.binary(max_size=1200), with_cookie=st.booleans())
def test_any_bytes_parse_or_raise_protocol_error(data: bytes, with_cookie: bool) -> None:
    check_any_input(data, with_cookie)


@settings(max_examples=500)
@given(
    cookie=st.sampled_from(["1_2 ", "-1_2 ", ""]),
    command=st.sampled_from(["S", "D", "P", "G", "X", ""]),
    fields=st.lists(FIELD_VALUES, max_size=12),
    tail=st.sampled_from(["", " ", "  "]),
)
def test_near_miss_sessions_parse_or_raise_protocol_error(
    cookie: str, command: str, fields: list[str], tail: str
) -> None:
    data = (cookie + command + " " + " ".join(fields) + tail).encode()
    check_any_input(data, with_cookie=bool(cookie))
