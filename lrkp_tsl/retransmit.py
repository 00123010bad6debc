"""Replay cache for Kamailio's retransmissions: answer a resend, never apply it twice.

Kamailio resends the *same* datagram (same cookie, same bytes, from the same per-process
socket) up to `lrkproxy_retr` times, `lrkproxy_tout` seconds apart, whenever it did not
accept a reply: the reply was lost, was late, or the node was slow. Each resend must get
the reply the first copy got, and an `S`/`D` must not be handed to the session layer again
(a second `S` would be a second install; a `D` replayed after a new `S` for the same call
would delete the new session).

Pure: the caller passes `now` (use `time.monotonic()`), so expiry is tested with a fake
clock. The key is (sender, cookie, digest of the whole datagram): the cookie alone is not
enough, because old releases make it from the pid and a sequence number, which repeat
across restarts, and every Kamailio process counts on its own; keeping a 16-byte digest
instead of the datagram itself bounds what a key costs whatever the sender sends. The
sender is whatever hashable address the server has, normally the `(ip, port)` tuple from
`recvfrom`.

Bounded both ways: at most `max_bytes` of replies and keys (each entry counted as its
reply plus ENTRY_OVERHEAD), none older than `max_age` seconds. Entries sit in an
OrderedDict in insertion order, which is age order while `now` never goes back, so
eviction only ever looks at the front. Set `max_age` above `lrkproxy_retr x
lrkproxy_tout` (5 s by default); the byte bound caps memory against a flood of unique
datagrams, at the cost of forgetting the oldest replies first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from lrkp_tsl.errors import ConfigError

# What one entry costs besides its reply: the key tuple, the digest, the cookie, the
# entry object and the dict slot (measured with sys.getsizeof, rounded up).
ENTRY_OVERHEAD = 400
COOKIE_MAX = 34

Key = tuple[Hashable, bytes, bytes]


@dataclass(frozen=True, slots=True)
class _Entry:
    reply: bytes
    stored_at: float


def cache_key(sender: Hashable, datagram: bytes) -> Key:
    cookie = datagram[:COOKIE_MAX].partition(b" ")[0]
    return (sender, cookie, hashlib.blake2b(datagram, digest_size=16).digest())


class RetransmitCache:
    """Replies by (sender, cookie, digest), bounded in bytes and age."""

    __slots__ = ("_bytes", "_entries", "max_age", "max_bytes")

    def __init__(self, max_bytes: int, max_age: float) -> None:
        if max_bytes < ENTRY_OVERHEAD:
            raise ConfigError(f"retransmit cache max_bytes: {max_bytes} holds no entry")
        if not max_age > 0:
            raise ConfigError(f"retransmit cache max_age: {max_age} s is not positive")
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._bytes = 0

    def lookup(self, sender: Hashable, datagram: bytes, now: float) -> bytes | None:
        """The reply already sent for this exact datagram from this sender, if still fresh.

        A hit does not refresh the entry: its age counts from the first answer, since
        Kamailio's resends of one command stop after a fixed time anyway.
        """
        self._expire(now)
        entry = self._entries.get(cache_key(sender, datagram))
        if entry is None or now - entry.stored_at > self.max_age:
            return None
        return entry.reply

    def store(self, sender: Hashable, datagram: bytes, reply: bytes, now: float) -> None:
        """Remember `reply` as the answer to `datagram` from `sender`, evicting the oldest."""
        key = cache_key(sender, datagram)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.reply) + ENTRY_OVERHEAD
        self._entries[key] = _Entry(reply, now)
        self._bytes += len(reply) + ENTRY_OVERHEAD
        self._expire(now)
        while self._bytes > self.max_bytes:
            _key, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.reply) + ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes held, as the bound counts them."""
        return self._bytes

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.stored_at <= self.max_age:
                return
            _key, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.reply) + ENTRY_OVERHEAD
