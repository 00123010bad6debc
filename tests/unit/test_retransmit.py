"""The retransmission cache: a resend gets the first reply; bounds hold with a fake clock."""

from __future__ import annotations

import pytest

from lrkp_tsl.errors import ConfigError
from lrkp_tsl.retransmit import ENTRY_OVERHEAD, RetransmitCache

SLOT = ENTRY_OVERHEAD + 8  # the bound counts each entry as its reply + the overhead

KAMAILIO = ("10.0.0.5", 40001)
OTHER_WORKER = ("10.0.0.5", 40002)
S = b"1957747793_44 S 10.0.0.21 10.0.0.10 10.0.0.10 10.0.1.31 4000 20000 20002 6000 60 cid "
S_REPLY = S + b"OK"


def test_a_resend_gets_the_stored_reply() -> None:
    cache = RetransmitCache(max_bytes=8 * SLOT, max_age=30.0)
    assert cache.lookup(KAMAILIO, S, now=0.0) is None
    cache.store(KAMAILIO, S, S_REPLY, now=0.0)
    for now in (1.0, 2.0, 3.0, 4.0):  # lrkproxy_retr=5, lrkproxy_tout=1
        assert cache.lookup(KAMAILIO, S, now=now) == S_REPLY


@pytest.mark.parametrize(
    ("sender", "datagram"),
    [
        pytest.param(OTHER_WORKER, S, id="same-bytes-other-sender"),
        pytest.param(("10.0.0.6", 40001), S, id="same-port-other-ip"),
        pytest.param(KAMAILIO, S.replace(b"_44 ", b"_45 "), id="other-cookie"),
        pytest.param(KAMAILIO, S.replace(b" S ", b" D "), id="same-cookie-other-bytes"),
        pytest.param(KAMAILIO, S[:-1], id="prefix"),
    ],
)
def test_anything_but_the_same_datagram_from_the_same_sender_is_new(
    sender: tuple[str, int], datagram: bytes
) -> None:
    cache = RetransmitCache(max_bytes=8 * SLOT, max_age=30.0)
    cache.store(KAMAILIO, S, S_REPLY, now=0.0)
    assert cache.lookup(sender, datagram, now=1.0) is None
    assert cache.lookup(KAMAILIO, S, now=1.0) == S_REPLY


def test_storing_again_replaces_the_reply() -> None:
    cache = RetransmitCache(max_bytes=8 * SLOT, max_age=30.0)
    cache.store(KAMAILIO, S, b"first", now=0.0)
    cache.store(KAMAILIO, S, b"second", now=1.0)
    assert cache.lookup(KAMAILIO, S, now=2.0) == b"second"
    assert len(cache) == 1


def test_size_bound_evicts_the_oldest_first() -> None:
    cache = RetransmitCache(max_bytes=3 * SLOT, max_age=30.0)
    datagrams = [f"{n}_1 P".encode() for n in range(5)]
    for n, datagram in enumerate(datagrams):
        cache.store(KAMAILIO, datagram, b"reply %d" % n, now=float(n))
    assert len(cache) == 3
    assert [cache.lookup(KAMAILIO, d, now=5.0) for d in datagrams] == [
        None,
        None,
        b"reply 2",
        b"reply 3",
        b"reply 4",
    ]


def test_restoring_moves_an_entry_to_the_young_end() -> None:
    cache = RetransmitCache(max_bytes=2 * SLOT, max_age=30.0)
    cache.store(KAMAILIO, b"1_1 P", b"a", now=0.0)
    cache.store(KAMAILIO, b"1_2 P", b"b", now=1.0)
    cache.store(KAMAILIO, b"1_1 P", b"a2", now=2.0)
    cache.store(KAMAILIO, b"1_3 P", b"c", now=3.0)
    assert cache.lookup(KAMAILIO, b"1_1 P", now=3.0) == b"a2"
    assert cache.lookup(KAMAILIO, b"1_2 P", now=3.0) is None


@pytest.mark.parametrize(
    ("age", "hit"),
    [(0.0, True), (9.999, True), (10.0, True), (10.001, False), (1e9, False)],
)
def test_age_bound_with_an_injected_clock(age: float, hit: bool) -> None:
    start = 1000.0
    cache = RetransmitCache(max_bytes=8 * SLOT, max_age=10.0)
    cache.store(KAMAILIO, S, S_REPLY, now=start)
    assert (cache.lookup(KAMAILIO, S, now=start + age) == S_REPLY) is hit


def test_a_hit_does_not_extend_the_age() -> None:
    cache = RetransmitCache(max_bytes=8 * SLOT, max_age=10.0)
    cache.store(KAMAILIO, S, S_REPLY, now=0.0)
    assert cache.lookup(KAMAILIO, S, now=9.0) == S_REPLY
    assert cache.lookup(KAMAILIO, S, now=11.0) is None


def test_expired_entries_are_dropped_without_being_looked_up() -> None:
    cache = RetransmitCache(max_bytes=100 * SLOT, max_age=10.0)
    for n in range(50):
        cache.store(KAMAILIO, b"%d_1 P" % n, b"x", now=0.0)
    cache.store(KAMAILIO, S, S_REPLY, now=10.5)
    assert len(cache) == 1
    assert cache.lookup(OTHER_WORKER, b"unrelated", now=21.0) is None
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("max_bytes", "max_age", "message"),
    [(0, 10.0, "max_bytes: 0"), (SLOT, 0.0, "max_age: 0.0"), (SLOT, -1.0, "max_age: -1.0")],
)
def test_unusable_bounds_are_refused(max_bytes: int, max_age: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RetransmitCache(max_bytes=max_bytes, max_age=max_age)


def test_a_flood_of_big_unique_datagrams_stays_within_the_byte_budget() -> None:
    cache = RetransmitCache(max_bytes=64 * 1024, max_age=30.0)
    for n in range(10_000):
        datagram = b"%d_1 S " % n + b"x" * 60_000  # big requests: the key keeps a digest
        cache.store(KAMAILIO, datagram, b"%d_1 E too-long ..." % n, now=0.0)
        assert cache.size <= 64 * 1024
    assert cache.lookup(KAMAILIO, b"9999_1 S " + b"x" * 60_000, now=1.0) is not None
