"""ng's bencode: lenient in (unsorted keys, as Kamailio sends them), canonical out, and every
fault a BencodeError with a reason, whatever the input (fuzzed)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrkp_tsl.ng.bencode import MAX_DEPTH, BencodeError, Value, decode, decode_dict, encode


def unsorted(value: object) -> bytes:
    """Bencode keeping the dictionary's own key order, as Kamailio's module writes it."""
    if isinstance(value, str):
        return b"%d:%s" % (len(value.encode()), value.encode())
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, list):
        return b"l" + b"".join(unsorted(item) for item in value) + b"e"
    assert isinstance(value, dict)
    return b"d" + b"".join(unsorted(k) + unsorted(v) for k, v in value.items()) + b"e"


# What Kamailio 6.x's rtpengine module sends for an offer, keys in the order it adds them.
KAMAILIO_OFFER = unsorted(
    {
        "supports": ["load limit"],
        "sdp": "v=0\r\n...",
        "direction": ["internal", "external"],
        "replace": ["origin", "session-connection"],
        "ICE": "remove",
        "received-from": ["IP4", "10.0.0.10"],
        "call-id": "abc@x",
        "from-tag": "f1t",
        "command": "offer",
        "sip-message-type": "sip_request",
        "flags": ["trust-address"],
    }
)


def test_decodes_kamailios_unsorted_keys() -> None:
    message = decode_dict(KAMAILIO_OFFER)
    assert message[b"command"] == b"offer"
    assert message[b"replace"] == [b"origin", b"session-connection"]
    assert message[b"received-from"] == [b"IP4", b"10.0.0.10"]
    assert next(iter(message)) == b"supports"  # order as sent


def test_encodes_canonically_whatever_the_order_and_string_type() -> None:
    assert encode({"result": "ok", b"error-reason": b"x"}) == b"d12:error-reason1:x6:result2:oke"
    assert encode({"b": [1, -2, "é"], "a": {}}) == b"d1:ade1:bli1ei-2e2:\xc3\xa9ee"
    assert decode(encode({"z": 1, "a": 2})) == {b"a": 2, b"z": 1}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty input at byte 0"),
        (b"d", "truncated: a dictionary is not closed at byte 1"),
        (b"d3:abc", "truncated: a value is missing at byte 6"),
        (b"d1:ai1e1:ai2ee", "duplicate key 'a' at byte 7"),
        (b"di1ei2ee", "dictionary key is not a string at byte 1"),
        (b"5:ab", "truncated: a 5-byte string has 2 bytes at byte 0"),
        (b"i12", "integer without an 'e' within 19 digits at byte 0"),
        (b"i-e", "integer b'-' is not a number at byte 0"),
        (b"i1ee", "1 byte after the end of the value at byte 3"),
        (b"d7:command4:pinge garbage", "8 bytes after the end of the value at byte 17"),
        (b"x", "b'x' does not start a value at byte 0"),
        (b"l" * 40, f"nested deeper than {MAX_DEPTH} at byte {MAX_DEPTH}"),
    ],
)
def test_faults_have_a_reason_and_an_offset(data: bytes, reason: str) -> None:
    with pytest.raises(BencodeError) as caught:
        decode(data)
    assert caught.value.reason == reason
    assert caught.value.code == "bad-bencode"


def test_lenient_numbers_as_rtpengine_reads_them() -> None:
    assert decode(b"i007e") == 7
    assert decode(b"03:abc") == b"abc"
    assert decode(b"i-0e") == 0


def test_a_message_must_be_a_dictionary() -> None:
    with pytest.raises(BencodeError, match="expected a dictionary, got a list"):
        decode_dict(b"l4:pinge")


def test_encode_refuses_what_bencode_cannot_hold() -> None:
    for bad in (1.5, None, True):
        with pytest.raises(TypeError):
            encode(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="given twice"):
        encode({"a": 1, b"a": 2})


def test_decode_is_linear_not_quadratic() -> None:
    """A 60 KB list of 20,000 short strings decodes in one pass (no rescans)."""
    many = b"l" + b"1:x" * 20000 + b"e"
    assert len(decode(many)) == 20000  # type: ignore[arg-type]
    deep_ok = b"l" * (MAX_DEPTH) + b"e" * MAX_DEPTH
    decode(deep_ok)


values: st.SearchStrategy[Value] = st.recursive(
    st.binary(max_size=20) | st.integers(min_value=-(10**18), max_value=10**18),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.binary(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@given(values)
@settings(max_examples=300, deadline=None)
def test_round_trip(value: Value) -> None:
    assert decode(encode(value)) == value
    assert encode(decode(encode(value))) == encode(value)  # canonical: a fixed point


@given(values, st.data())
@settings(max_examples=500, deadline=None)
def test_mutated_input_raises_only_bencode_errors(value: Value, data: st.DataObject) -> None:
    raw = bytearray(encode(value))
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if action == "flip":
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[at:]
        elif action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del raw[at]
    with contextlib.suppress(BencodeError):
        decode(bytes(raw))


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_garbage_raises_only_bencode_errors(raw: bytes) -> None:
    with contextlib.suppress(BencodeError):
        decode(raw)
