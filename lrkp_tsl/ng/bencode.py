"""Bencode, lenient in and canonical out, for ng dictionaries. Pure.

rtpengine's ng protocol carries one bencoded dictionary per datagram. Its own decoder does
not require dictionary keys in order ("not currently honoured", ng_control_protocol.md) and
Kamailio's module writes them in the order it adds them, so a strict decoder (fastbencode,
bencode2) refuses every Kamailio request. bencode.py accepts them but reports every fault as
one generic message and has no types. Hence this module: about a hundred lines, typed, with a
reason and a byte offset for every fault.

Decoding accepts: keys in any order; integers and string lengths with leading zeros (as
rtpengine's strtoll does). It refuses, with a `BencodeError`: duplicate keys (which copy
would a relay use?), non-string keys, bytes after the top-level value, nesting deeper than
`MAX_DEPTH`, integers longer than `MAX_INT_DIGITS` digits, truncation. Strings decode to
`bytes`: text or not is the caller's business.

Cost: linear in the input. Every string is copied once; the searches for a length's `:`
and an integer's `e` look at most a few bytes ahead, so no input makes them rescan it.

Encoding is canonical (keys sorted by their bytes, as the spec requires): `str` is written
as UTF-8, so a key or a value may be given as `str` or `bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias

from lrkp_tsl.errors import LrkpError

Value: TypeAlias = bytes | int | list["Value"] | dict[bytes, "Value"]
"""What `decode` returns."""

Encodable: TypeAlias = (
    str
    | bytes
    | int
    | Sequence["Encodable"]
    | Mapping[str, "Encodable"]
    | Mapping[bytes, "Encodable"]
    | Mapping[str | bytes, "Encodable"]
)
"""What `encode` takes."""

MAX_DEPTH: Final = 32
"""Nesting accepted: an ng request is a dictionary of strings, lists and small dictionaries
(depth 3 at most: `codec` in a dictionary); 32 leaves room and bounds the recursion."""

MAX_INT_DIGITS: Final = 19
"""rtpengine reads integers as `long long`: 19 digits is where that ends."""

MAX_LENGTH_DIGITS: Final = 10
"""A string length longer than 10 digits cannot fit in any datagram."""


class BencodeError(LrkpError):
    """The input is not one well-formed bencoded value; `offset` is where it went wrong."""

    code = "bad-bencode"

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(f"{reason} at byte {offset}")
        self.offset = offset


def decode(data: bytes, *, max_depth: int = MAX_DEPTH) -> Value:
    """The one value `data` holds; BencodeError (and nothing else) if it holds anything else."""
    if not data:
        raise BencodeError("empty input", 0)
    value, end = _Decoder(data, max_depth).value(0, 0)
    if end != len(data):
        extra = len(data) - end
        raise BencodeError(f"{extra} byte{'s' * (extra != 1)} after the end of the value", end)
    return value


def decode_dict(data: bytes, *, max_depth: int = MAX_DEPTH) -> dict[bytes, Value]:
    """`decode`, for input that must be a dictionary (an ng message)."""
    value = decode(data, max_depth=max_depth)
    if not isinstance(value, dict):
        raise BencodeError(f"expected a dictionary, got {_kind(value)}", 0)
    return value


class _Decoder:
    __slots__ = ("data", "max_depth")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.max_depth = max_depth

    def value(self, at: int, depth: int) -> tuple[Value, int]:
        lead = self.data[at : at + 1]
        if lead == b"i":
            return self.integer(at)
        if lead in (b"l", b"d"):
            if depth >= self.max_depth:
                raise BencodeError(f"nested deeper than {self.max_depth}", at)
            return self.list(at, depth) if lead == b"l" else self.dict(at, depth)
        if lead.isdigit():
            return self.string(at)
        if not lead:
            raise BencodeError("truncated: a value is missing", at)
        raise BencodeError(f"{lead!r} does not start a value", at)

    def integer(self, at: int) -> tuple[int, int]:
        end = self.data.find(b"e", at + 1, at + 3 + MAX_INT_DIGITS)
        if end < 0:
            raise BencodeError(f"integer without an 'e' within {MAX_INT_DIGITS} digits", at)
        text = self.data[at + 1 : end]
        digits = text[1:] if text[:1] == b"-" else text
        if not digits.isdigit():
            raise BencodeError(f"integer {bytes(text)!r} is not a number", at)
        return int(text), end + 1

    def string(self, at: int) -> tuple[bytes, int]:
        colon = self.data.find(b":", at, at + 1 + MAX_LENGTH_DIGITS)
        if colon < 0:
            raise BencodeError(f"string length without ':' within {MAX_LENGTH_DIGITS} digits", at)
        length = self.data[at:colon]
        if not length.isdigit():
            raise BencodeError(f"string length {bytes(length)!r} is not a number", at)
        start, end = colon + 1, colon + 1 + int(length)
        if end > len(self.data):
            raise BencodeError(
                f"truncated: a {int(length)}-byte string has {len(self.data) - start} bytes", at
            )
        return self.data[start:end], end

    def list(self, at: int, depth: int) -> tuple[list[Value], int]:
        items: list[Value] = []
        at += 1
        while self.data[at : at + 1] != b"e":
            item, at = self.value(at, depth + 1)
            items.append(item)
        return items, at + 1

    def dict(self, at: int, depth: int) -> tuple[dict[bytes, Value], int]:
        items: dict[bytes, Value] = {}
        at += 1
        while self.data[at : at + 1] != b"e":
            if not self.data[at : at + 1].isdigit():
                if at >= len(self.data):
                    raise BencodeError("truncated: a dictionary is not closed", at)
                raise BencodeError("dictionary key is not a string", at)
            key, value_at = self.string(at)
            if key in items:
                raise BencodeError(f"duplicate key {_show(key)}", at)
            items[key], at = self.value(value_at, depth + 1)
        return items, at + 1


def encode(value: Encodable) -> bytes:
    """Canonical bencoding; TypeError for what bencode cannot hold (floats, None, bools)."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Encodable, out: list[bytes]) -> None:
    if isinstance(value, bytes | str):
        raw = value.encode() if isinstance(value, str) else value
        out += (str(len(raw)).encode(), b":", raw)
    elif isinstance(value, bool):
        raise TypeError("bencode has no booleans: write 0/1 or a string")
    elif isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, Mapping):
        items: dict[bytes, Encodable] = {}
        for key, item in value.items():
            raw = key.encode() if isinstance(key, str) else key
            if not isinstance(raw, bytes):
                raise TypeError(f"bencode dictionary key {key!r} is not a string")
            if raw in items:
                raise ValueError(f"dictionary key {_show(raw)} given twice (as str and bytes)")
            items[raw] = item
        out.append(b"d")
        for raw in sorted(items):
            out += (str(len(raw)).encode(), b":", raw)
            _encode(items[raw], out)
        out.append(b"e")
    elif isinstance(value, Sequence):
        out.append(b"l")
        for item in value:
            _encode(item, out)
        out.append(b"e")
    else:
        raise TypeError(f"bencode cannot hold {type(value).__name__}")


def _kind(value: Value) -> str:
    return {bytes: "a string", int: "an integer", list: "a list"}.get(type(value), "a dictionary")


def _show(raw: bytes, limit: int = 40) -> str:
    shown = ascii(raw)[1:]  # b'...' -> '...'
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
