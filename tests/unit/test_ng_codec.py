"""The ng codec: what Kamailio sends parses; every fault is an NgError with rtpengine's words
where rtpengine has them; refused and unknown options name themselves (fuzzed)."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl.ng import codec, flags
from lrkp_tsl.ng.bencode import decode, encode
from lrkp_tsl.ng.codec import (
    ICE_WARNING,
    AddressSource,
    Answer,
    Delete,
    ListCalls,
    NgError,
    Offer,
    Ping,
    Query,
    Statistics,
    parse,
    reply_error,
    reply_ok,
)
from lrkp_tsl.ng.sdp import Rtcp

SDP = (
    b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0\r\n"
)
COOKIE = b"3_2910493551_17 "  # Kamailio 6.x: <server_id>_<fastrand>_<seq>


def kamailio_offer(**extra: object) -> dict[str, object]:
    """What `rtpengine_manage("replace-origin replace-session-connection direction=internal
    direction=external ICE=remove")` sends for an INVITE (Kamailio 6.2's rtpengine.c)."""
    message: dict[str, object] = {
        "supports": ["load limit"],
        "sdp": SDP,
        "direction": ["internal", "external"],
        "replace": ["origin", "session-connection"],
        "ICE": "remove",
        "received-from": ["IP4", "198.51.100.7"],
        "call-id": "a84b4c76e66710@pc33.example.com",
        "from-tag": "1928301774",
        "command": "offer",
        "sip-message-type": "sip_request",
    }
    message.update(extra)
    return message


def ng(message: dict[str, object], cookie: bytes = COOKIE) -> codec.Request:
    return parse(cookie + encode(message))  # type: ignore[arg-type]


def refused(message: dict[str, object]) -> NgError:
    with pytest.raises(NgError) as caught:
        ng(message)
    assert caught.value.cookie == COOKIE.decode().strip()
    return caught.value


def test_kamailios_offer() -> None:
    request = ng(kamailio_offer())
    assert isinstance(request, Offer)
    assert request.cookie == "3_2910493551_17"
    assert request.call_id == "a84b4c76e66710@pc33.example.com"
    assert (request.from_tag, request.to_tag) == ("1928301774", None)
    assert request.options.direction == ("internal", "external")
    assert request.options.received_from == IPv4Address("198.51.100.7")
    assert request.options.address_source is AddressSource.SDP
    rewrite = request.options.rewrite
    assert rewrite.replace_origin and rewrite.replace_session_connection and rewrite.strip_ice
    assert request.sdp.media[0].port == 4000
    assert request.warnings == ()


def test_answer_delete_query_list_statistics_ping() -> None:
    answer = ng(kamailio_offer(command="answer", **{"to-tag": "a6c85cf"}))
    assert isinstance(answer, Answer) and answer.to_tag == "a6c85cf"
    delete = ng({"command": "delete", "call-id": "c", "from-tag": "f", "delete-delay": 5})
    assert delete == Delete(
        cookie="3_2910493551_17",
        call_id="c",
        from_tag="f",
        to_tag=None,
        via_branch=None,
        delay=5,
        fatal=False,
    )
    assert ng(
        {"command": "delete", "call-id": "c", "delete delay": "0", "flags": ["fatal"]}
    ) == Delete(
        cookie="3_2910493551_17",
        call_id="c",
        from_tag=None,
        to_tag=None,
        via_branch=None,
        delay=0,
        fatal=True,
    )
    assert isinstance(ng({"command": "query", "call-id": "c"}), Query)
    assert ng({"command": "list", "limit": 3}) == ListCalls(cookie="3_2910493551_17", limit=3)
    assert isinstance(ng({"command": "statistics"}), Statistics)
    assert ng({"command": "ping"}) == Ping(cookie="3_2910493551_17")


def test_spellings_rtpengine_accepts() -> None:
    request = ng(
        kamailio_offer(
            flags=["SIP source address", "full-RTCP-attribute", "strict source"],
            replace=["session connection"],
            **{"received from": ["IP4", "198.51.100.7"]},
        )
    )
    assert isinstance(request, Offer)
    assert request.options.address_source is AddressSource.SIP_SOURCE
    assert request.options.party_ip(IPv4Address("10.0.0.5")) == IPv4Address("198.51.100.7")
    assert request.options.rewrite.rtcp is Rtcp.FULL
    assert request.options.strict_source


@pytest.mark.parametrize(
    ("message", "code", "reason"),
    [
        ({"command": "offer", "sdp": SDP}, "missing-key", "No call-id in message"),
        ({"command": "offer", "call-id": "c", "sdp": SDP}, "missing-key", "No from-tag in message"),
        (
            {"command": "offer", "call-id": "c", "from-tag": "f"},
            "missing-key",
            "No SDP body in message",
        ),
        (kamailio_offer(command="answer"), "missing-key", "No to-tag in message"),
        ({"call-id": "c"}, "no-command", 'Dictionary contains no key "command"'),
        ({"command": "frobnicate"}, "unknown-command", "Unrecognized command 'frobnicate'"),
        ({"command": "play media"}, "unsupported-command", "Unsupported command 'play media'"),
        ({"command": "start recording"}, "unsupported-command", "records nothing"),
        (kamailio_offer(sdp=b"hello"), "bad-sdp", "Failed to parse SDP: line 1"),
        (
            kamailio_offer(ICE="force"),
            "refused",
            "ICE=force refused: this relay is not an ICE agent",
        ),
        (kamailio_offer(ICE="sideways"), "unknown-option", "unknown value 'sideways' for ICE"),
        (kamailio_offer(flags=["asymmetric"]), "refused", "flag 'asymmetric' refused"),
        (
            kamailio_offer(flags=["codec-strip-PCMA"]),
            "refused",
            "(codec-strip-PCMA) refused: this relay forwards",
        ),
        (kamailio_offer(flags=["record-call"]), "refused", "records nothing"),
        (kamailio_offer(flags=["inject-DTMF"]), "refused", "DTMF"),
        (kamailio_offer(flags=["bogus"]), "unknown-option", "unknown flag 'bogus'"),
        (kamailio_offer(bogus="1"), "unknown-option", "unknown key 'bogus'"),
        (kamailio_offer(codec={"strip": ["PCMA"]}), "refused", "key 'codec' refused"),
        (kamailio_offer(**{"T.38": ["decode"]}), "refused", "T.38"),
        (
            kamailio_offer(SDES=["pad"]),
            "refused",
            "SDES=... (SDES=pad) refused: this relay neither",
        ),
        (kamailio_offer(DTLS="passive"), "refused", "DTLS=passive refused"),
        (kamailio_offer(**{"rtcp-mux": ["demux"]}), "refused", "rtcp-mux 'offer' (demux) refused"),
        (kamailio_offer(**{"transport-protocol": "RTP/SAVP"}), "refused", "m= line 1 is RTP/AVP"),
        (kamailio_offer(**{"address-family": "IP6"}), "refused", "IPv4 only"),
        (kamailio_offer(**{"rtpp-flags": "replace-origin"}), "refused", "one-argument form"),
        (kamailio_offer(replace=["SDP-version"]), "refused", "replace 'SDP-version' refused"),
        (kamailio_offer(**{"call-id": "has space"}), "bad-value", "printable ASCII"),
        (kamailio_offer(**{"call-id": "x" * 129}), "bad-value", "1-128 bytes"),
        (kamailio_offer(**{"from-tag": 7}), "bad-value", "is not a string"),
        (kamailio_offer(flags="trust-address"), "bad-value", "is not a list"),
        (kamailio_offer(direction=["a", "b", "c"]), "bad-value", "one or two interface names"),
        (
            kamailio_offer(**{"received-from": ["IP4", "nope"]}),
            "bad-value",
            "is not an IPv4 address",
        ),
        (kamailio_offer(**{"received-from": ["IP5", "1.2.3.4"]}), "bad-value", "IP4 or IP6"),
        (
            kamailio_offer(flags=["SIP-source-address"], **{"received-from": ["IP6", "::1"]}),
            "bad-value",
            "IPv6",
        ),
        ({"command": "delete", "call-id": "c", "delete-delay": -1}, "bad-value", "0-3600"),
        ({"command": "list", "limit": 0}, "bad-value", "1-1000000"),
        (
            kamailio_offer(sdp=SDP.replace(b"IP4 192.0.2.1\r\nt", b"IP6 ::1\r\nt")),
            "unsupported-sdp",
            "IPv4 only",
        ),
    ],
)
def test_errors(message: dict[str, object], code: str, reason: str) -> None:
    error = refused(message)
    assert error.code == code
    assert reason in error.reason, error.reason


def test_answer_that_accepts_mux_refuses_reject() -> None:
    muxed = SDP + b"a=rtcp-mux\r\n"
    error = refused(
        kamailio_offer(command="answer", sdp=muxed, **{"to-tag": "t", "rtcp-mux": ["reject"]})
    )
    assert "rtcp-mux reject refused in an answer" in error.reason
    offer = ng(kamailio_offer(sdp=muxed, **{"rtcp-mux": ["reject"]}))
    assert isinstance(offer, Offer) and offer.options.rewrite.strip_rtcp_mux


def test_transport_protocol_unchanged_or_accept_is_fine() -> None:
    for value in ("RTP/AVP", "accept"):
        assert isinstance(ng(kamailio_offer(**{"transport-protocol": value})), Offer)


def test_ignored_options_are_accepted_quietly() -> None:
    request = ng(
        kamailio_offer(
            flags=["unidirectional", "debug", "no-jitter-buffer", "SDES-off"],
            label="x",
            SDES=["off"],
            DTLS="off",
            **{"record-call": "no", "via-branch": "z9hG4bK776asdhds"},
        )
    )
    assert isinstance(request, Offer) and request.via_branch == "z9hG4bK776asdhds"


def test_ice_without_remove_warns() -> None:
    ice = SDP + b"a=ice-ufrag:x\r\na=candidate:1 1 UDP 1 192.0.2.1 4000 typ host\r\n"
    message = kamailio_offer(sdp=ice)
    del message["ICE"]
    request = ng(message)
    assert isinstance(request, Offer) and request.warnings == (ICE_WARNING,)
    quiet = ng(kamailio_offer(sdp=ice))
    assert isinstance(quiet, Offer) and quiet.warnings == ()


@pytest.mark.parametrize(
    ("data", "code", "cookie"),
    [
        (b"", "bad-cookie", None),
        (b"nocookie", "bad-cookie", None),
        (b"x" * 65 + b" d7:command4:pinge", "bad-cookie", None),
        (b"1_2 d7:command4:ping", "bad-bencode", "1_2"),
        (b"1_2 l4:pinge", "bad-bencode", "1_2"),
        (b'1_2 {"command":"ping"}', "bad-bencode", "1_2"),
    ],
)
def test_envelope_faults(data: bytes, code: str, cookie: str | None) -> None:
    with pytest.raises(NgError) as caught:
        parse(data)
    assert (caught.value.code, caught.value.cookie) == (code, cookie)
    reply = reply_error(caught.value)
    if cookie is None:
        assert reply is None  # nobody could match a reply
    else:
        assert reply is not None
        assert reply.startswith(cookie.encode() + b" ")
        body = decode(reply.partition(b" ")[2])
        assert isinstance(body, dict) and set(body) == {b"result", b"error-reason"}


def test_replies_are_canonical() -> None:
    assert (
        reply_ok("7_1", ("w1", "w2"), sdp=b"v=0")
        == b"7_1 d6:result2:ok3:sdp3:v=07:warning6:w1; w2e"
    )
    assert codec.reply_pong(Ping(cookie="7_1")) == b"7_1 d6:result4:ponge"


def test_every_honoured_key_and_flag_parses() -> None:
    """No row of the table is honoured in the doc but unknown to the parser."""
    for entry in flags.TABLE:
        if entry.disposition is not flags.Disposition.HONOURED:
            continue
        if entry.kind is flags.Kind.FLAG:
            assert isinstance(ng(kamailio_offer(flags=[entry.name])), Offer | codec.Request)
        elif entry.kind is flags.Kind.REPLACE:
            assert isinstance(ng(kamailio_offer(replace=[entry.name])), Offer)


request_keys = st.sampled_from(
    [
        "command",
        "call-id",
        "from-tag",
        "to-tag",
        "sdp",
        "flags",
        "replace",
        "ICE",
        "direction",
        "received-from",
        "rtcp-mux",
        "delete-delay",
        "limit",
        "transport-protocol",
        "bogus",
    ]
)
values = st.one_of(
    st.sampled_from([b"offer", b"answer", b"delete", b"query", b"list", b"ping", b"remove", SDP]),
    st.binary(max_size=12),
    st.integers(-5, 5),
    st.lists(
        st.sampled_from([b"origin", b"trust-address", b"IP4", b"1.2.3.4", b"internal", b"x"]),
        max_size=3,
    ),
)


@given(st.dictionaries(request_keys, values, max_size=8))
@settings(max_examples=500, deadline=None)
def test_any_dictionary_parses_or_raises_ngerror(message: dict[str, object]) -> None:
    try:
        ng(message)
    except NgError as error:
        assert error.cookie == "3_2910493551_17"
        assert error.reason


@given(st.binary(max_size=120))
@settings(max_examples=300, deadline=None)
def test_garbage_raises_only_ngerror(data: bytes) -> None:
    with contextlib.suppress(NgError):
        parse(COOKIE + data)


def test_retransmission_cache_keys_ng_datagrams_by_sender_cookie_and_digest() -> None:
    """Kamailio resends the same datagram (same cookie) on a timeout: retransmit.py's cache
    answers it. A 5.6 cookie (<server_id>_<pid>_<seq>) repeats after a restart: the digest
    keeps a new request with an old cookie apart, whatever the cookie's length."""
    from lrkp_tsl.retransmit import RetransmitCache, cache_key

    cookie = b"4294967295_4294967295_4294967295_x "  # longer than lrkproxy's 34 bytes
    offer = cookie + encode(kamailio_offer())  # type: ignore[arg-type]
    other = cookie + encode(kamailio_offer(**{"from-tag": "other"}))  # type: ignore[arg-type]
    sender = ("10.0.0.5", 5060)
    assert cache_key(sender, offer) == cache_key(sender, offer)
    assert cache_key(sender, offer) != cache_key(sender, other)
    cache = RetransmitCache(1 << 20, 30.0)
    cache.store(sender, offer, b"reply", 0.0)
    assert cache.lookup(sender, offer, 5.0) == b"reply"
    assert cache.lookup(sender, other, 5.0) is None
    assert cache.lookup(("10.0.0.6", 5060), offer, 5.0) is None
