"""SDP rewrite: only addresses, ports and a=rtcp change; everything else byte for byte."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl.ng.sdp import (
    MAX_STREAMS,
    RelayPorts,
    Rewrite,
    Rtcp,
    SdpError,
    parse,
    rewrite,
)

RELAY = IPv4Address("10.0.0.1")
KAMAILIO = Rewrite(replace_origin=True, replace_session_connection=True)


def sdp(*lines: str, end: str = "\r\n") -> bytes:
    return "".join(line + end for line in lines).encode()


HEAD = (
    "v=0",
    "o=alice 2890844526 2890844527 IN IP4 192.0.2.10",
    "s=Talk",
    "c=IN IP4 192.0.2.10",
    "t=0 0",
)


def test_rewrites_addresses_ports_and_adds_rtcp_keeping_the_rest() -> None:
    body = sdp(
        *HEAD,
        "b=AS:84",
        "m=audio 49170 RTP/AVP 9 0 8 101",
        "b=TIAS:64000",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=x-vendor:keep me",
        "a=ptime:20",
        "a=maxptime:40",
        "a=sendrecv",
    )
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001)], KAMAILIO)
    assert out == sdp(
        "v=0",
        "o=alice 2890844526 2890844527 IN IP4 10.0.0.1",  # address only; version kept
        "s=Talk",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "b=AS:84",
        "m=audio 30000 RTP/AVP 9 0 8 101",  # payload types and their order kept
        "b=TIAS:64000",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=x-vendor:keep me",
        "a=ptime:20",
        "a=maxptime:40",
        "a=sendrecv",
        "a=rtcp:30001",
    )


def test_without_replace_flags_origin_is_kept_but_the_used_connection_is_not() -> None:
    out = rewrite(
        parse(sdp(*HEAD, "m=audio 4000 RTP/AVP 0")), RELAY, [RelayPorts(30000, 30001)], Rewrite()
    )
    assert b"o=alice 2890844526 2890844527 IN IP4 192.0.2.10\r\n" in out
    assert b"c=IN IP4 10.0.0.1\r\n" in out  # the stream relies on it: rtpengine rewrites it too


def test_session_connection_not_relied_on_is_kept_without_the_flag() -> None:
    body = sdp(*HEAD, "m=audio 4000 RTP/AVP 0", "c=IN IP4 192.0.2.99")
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001)], Rewrite())
    assert out.count(b"c=IN IP4 10.0.0.1") == 1
    assert b"c=IN IP4 192.0.2.10\r\n" in out
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001)], KAMAILIO)
    assert out.count(b"c=IN IP4 10.0.0.1") == 2


def test_hold_is_kept() -> None:
    sendonly = parse(sdp(*HEAD, "m=audio 4000 RTP/AVP 0", "a=sendonly"))
    assert b"a=sendonly\r\n" in rewrite(sendonly, RELAY, [RelayPorts(30000, 30001)], KAMAILIO)
    zero = parse(sdp(*HEAD[:3], "c=IN IP4 0.0.0.0", "t=0 0", "m=audio 4000 RTP/AVP 0"))
    out = rewrite(zero, RELAY, [RelayPorts(30000, 30001)], KAMAILIO)
    assert b"c=IN IP4 0.0.0.0\r\n" in out  # rtpengine keeps it too
    assert b"m=audio 30000 " in out
    assert zero.address(zero.media[0]) == IPv4Address("0.0.0.0")
    replaced = rewrite(zero, RELAY, [RelayPorts(30000, 30001)], Rewrite(replace_zero_address=True))
    assert b"c=IN IP4 10.0.0.1\r\n" in replaced


def test_rejected_streams_stay_as_they_are() -> None:
    body = sdp(*HEAD, "m=audio 4000 RTP/AVP 0", "m=video 0 RTP/AVP 96", "a=rtpmap:96 H264/90000")
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001), None], KAMAILIO)
    assert out.endswith(b"m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n")
    with pytest.raises(ValueError, match="active but has no relay ports"):
        rewrite(parse(body), RELAY, [None, None], KAMAILIO)


def test_audio_and_video_each_get_their_ports_and_own_connection_lines() -> None:
    body = sdp(
        "v=0",
        "o=- 1 1 IN IP4 192.0.2.1",
        "s=-",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0",
        "c=IN IP4 192.0.2.1",
        "m=video 4002 RTP/AVP 96",
        "c=IN IP4 192.0.2.9",
        "a=rtpmap:96 VP8/90000",
    )
    out = rewrite(
        parse(body), RELAY, [RelayPorts(30000, 30001), RelayPorts(30002, 30003)], KAMAILIO
    )
    assert out == sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "t=0 0",
        "m=audio 30000 RTP/AVP 0",
        "c=IN IP4 10.0.0.1",
        "a=rtcp:30001",
        "m=video 30002 RTP/AVP 96",
        "c=IN IP4 10.0.0.1",
        "a=rtpmap:96 VP8/90000",
        "a=rtcp:30003",
    )


def test_existing_rtcp_is_replaced_in_place_and_mux_passes() -> None:
    body = sdp(
        *HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:4001 IN IP4 192.0.2.10", "a=rtcp-mux", "a=mid:0"
    )
    parsed = parse(body)
    assert parsed.media[0].rtcp_port == 4001
    assert parsed.media[0].rtcp_mux
    out = rewrite(parsed, RELAY, [RelayPorts(30000, 30000)], KAMAILIO)
    assert out.endswith(b"m=audio 30000 RTP/AVP 0\r\na=rtcp:30000\r\na=rtcp-mux\r\na=mid:0\r\n")
    full = rewrite(parsed, RELAY, [RelayPorts(30000, 30001)], Rewrite(rtcp=Rtcp.FULL))
    assert b"a=rtcp:30001 IN IP4 10.0.0.1\r\n" in full
    none = rewrite(parsed, RELAY, [RelayPorts(30000, 30001)], Rewrite(rtcp=Rtcp.NONE))
    assert b"a=rtcp:" not in none
    rejected = rewrite(parsed, RELAY, [RelayPorts(30000, 30001)], Rewrite(strip_rtcp_mux=True))
    assert b"a=rtcp-mux" not in rejected


def test_ice_and_bundle_are_removed() -> None:
    body = sdp(
        *HEAD,
        "a=ice-lite",
        "a=group:BUNDLE 0",
        "a=msid-semantic: WMS",
        "m=audio 4000 RTP/AVPF 111",
        "a=rtpmap:111 opus/48000/2",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:0123456789012345678901",
        "a=ice-options:trickle",
        "a=candidate:1 1 UDP 2130706431 192.0.2.10 4000 typ host",
        "a=end-of-candidates",
        "a=mid:0",
    )
    parsed = parse(body)
    assert parsed.has_ice
    out = rewrite(parsed, RELAY, [RelayPorts(30000, 30001)], KAMAILIO)
    for gone in (b"a=ice", b"candidate", b"BUNDLE"):
        assert gone not in out
    assert b"a=msid-semantic: WMS\r\n" in out and b"a=mid:0\r\n" in out


def test_t38_udptl_passes_without_rtcp() -> None:
    body = sdp(*HEAD, "m=image 4000 udptl t38", "a=T38FaxVersion:0", "a=T38MaxBitRate:14400")
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001)], KAMAILIO)
    assert out.endswith(
        b"m=image 30000 udptl t38\r\na=T38FaxVersion:0\r\na=T38MaxBitRate:14400\r\n"
    )


def test_line_endings_and_a_missing_last_newline_are_kept() -> None:
    body = b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nc=IN IP4 192.0.2.1\nt=0 0\nm=audio 4000 RTP/AVP 0"
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001)], Rewrite())
    assert (
        out == b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\n"
        b"m=audio 30000 RTP/AVP 0\na=rtcp:30001"
    )


def test_rtcp_goes_before_trailing_blank_lines() -> None:
    body = sdp(*HEAD, "m=audio 4000 RTP/AVP 0", "")
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001)], Rewrite())
    assert out.endswith(b"m=audio 30000 RTP/AVP 0\r\na=rtcp:30001\r\n\r\n")


def test_bytes_outside_ascii_pass_unchanged() -> None:
    body = sdp(*HEAD[:2], "s=Caf\u00e9 \u2603", *HEAD[3:], "m=audio 4000 RTP/AVP 0", "i=\u00fc")
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001)], KAMAILIO)
    assert "s=Caf\u00e9 \u2603\r\n".encode() in out and "i=\u00fc\r\n".encode() in out


@pytest.mark.parametrize(
    ("body", "code", "reason"),
    [
        (sdp("o=- 1 1 IN IP4 192.0.2.1"), "bad-sdp", "SDP does not start with v=0"),
        (sdp("v=0", "garbage"), "bad-sdp", "line 2 is not <letter>=<value>"),
        (sdp("v=0", "s=-"), "bad-sdp", "SDP has 0 o= lines, expected 1"),
        (sdp("v=0", "o=- 1 1 IN IP4"), "bad-sdp", "o= line has 5 fields, expected 6"),
        (
            sdp("v=0", "o=- 1 1 IN IP4 192.0.2.1", "m=audio 4000 RTP/AVP 0"),
            "bad-sdp",
            "has no c= line",
        ),
        (sdp(*HEAD, "m=audio 70000 RTP/AVP 0"), "bad-sdp", "port 70000 is outside 0-65535"),
        (sdp(*HEAD, "m=audio 4000"), "bad-sdp", "is not '<media> <port> <proto> <format>...'"),
        (sdp(*HEAD, "m=audio 4000 RTP/AVP 0", "a=rtcp:x"), "bad-sdp", "is not a=rtcp:<port>"),
        (
            sdp(*HEAD[:3], "c=IN IP6 2001:db8::1", "t=0 0", "m=audio 4000 RTP/AVP 0"),
            "unsupported-sdp",
            "IPv4 only",
        ),
        (
            sdp(*HEAD[:3], "c=IN IP4 224.2.1.1/127", "t=0 0", "m=audio 4000 RTP/AVP 0"),
            "unsupported-sdp",
            "multicast",
        ),
        (sdp(*HEAD, "m=audio 4000/2 RTP/AVP 0"), "unsupported-sdp", "asks for 2 ports"),
        (sdp(*HEAD, "m=application 9 TCP/BFCP *"), "unsupported-sdp", "is not carried over UDP"),
        (
            sdp(*HEAD, *(["m=audio 4000 RTP/AVP 0"] * (MAX_STREAMS + 1))),
            "unsupported-sdp",
            "at most 16",
        ),
        (b"v=0\r\nx=1\rx\r\n", "bad-sdp", "bare carriage return"),
    ],
)
def test_refusals_say_why(body: bytes, code: str, reason: str) -> None:
    with pytest.raises(SdpError) as caught:
        parse(body)
    assert caught.value.code == code
    assert reason in caught.value.reason


def test_rejected_tcp_or_ipv6_streams_pass() -> None:
    body = sdp(
        *HEAD,
        "m=audio 4000 RTP/AVP 0",
        "m=application 0 TCP/BFCP *",
        "m=video 0 RTP/AVP 96",
        "c=IN IP6 ::1",
    )
    out = rewrite(parse(body), RELAY, [RelayPorts(30000, 30001), None, None], KAMAILIO)
    assert out.endswith(b"m=application 0 TCP/BFCP *\r\nm=video 0 RTP/AVP 96\r\nc=IN IP6 ::1\r\n")


def test_session_direction_and_effective_values() -> None:
    parsed = parse(
        sdp(*HEAD, "a=sendonly", "m=audio 4000 RTP/AVP 0", "m=audio 4002 RTP/AVP 8", "a=recvonly")
    )
    assert [parsed.direction_of(m) for m in parsed.media] == ["sendonly", "recvonly"]
    assert parse(sdp(*HEAD, "m=audio 4000 RTP/AVP 0")).direction_of(parsed.media[0]) == "sendrecv"


lines = st.sampled_from(
    [
        "v=0",
        "o=- 1 1 IN IP4 192.0.2.1",
        "s=-",
        "c=IN IP4 192.0.2.1",
        "c=IN IP4 0.0.0.0",
        "c=IN IP6 ::1",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0 8",
        "m=video 0 RTP/AVP 96",
        "m=image 4002 udptl t38",
        "m=application 9 TCP/BFCP *",
        "a=rtcp:4001",
        "a=rtcp:1 IN IP4 192.0.2.3",
        "a=rtcp-mux",
        "a=sendonly",
        "a=candidate:1 1 UDP 1 192.0.2.1 4000 typ host",
        "a=group:BUNDLE 0",
        "b=AS:64",
        "",
        "x",
    ]
)


@given(st.lists(lines, max_size=14), st.sampled_from(["\r\n", "\n"]), st.binary(max_size=8))
@settings(max_examples=400, deadline=None)
def test_parse_and_rewrite_raise_only_sdp_errors(chosen: list[str], end: str, junk: bytes) -> None:
    body = ("v=0" + end + end.join(chosen)).encode() + junk
    with contextlib.suppress(SdpError):
        parsed = parse(body)
        ports = [
            None if m.rejected else RelayPorts(30000 + 2 * m.index, 30001 + 2 * m.index)
            for m in parsed.media
        ]
        out = rewrite(parsed, RELAY, ports, KAMAILIO)
        again = parse(out)  # what we write, we can read
        assert len(again.media) == len(parsed.media)
        assert [m.port for m in again.media] == [0 if p is None else p.rtp for p in ports]
