"""`lrkp_command_duration_seconds` is what a client waits for: a reply sent as soon as its
change is committed is timed when it is sent, not after the bookkeeping that follows it;
a reply returned with the group is timed at the end of the group."""

from __future__ import annotations

import time
import types
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any, cast

import pytest

from lrkp_tsl import server as server_module
from lrkp_tsl.config import Config
from lrkp_tsl.engine import Engine
from lrkp_tsl.operations import LRKPROXY, SendNow
from lrkp_tsl.server import Server

COMMIT = 0.001  # store + kernel: until the change is committed
BOOKKEEPING = 0.5  # table, conntrack reads, stats, log lines: after the early reply


class Clock:
    """perf_counter, moved only by the fake front-end."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FrontEnd:
    """Two datagrams: the first is a change (replied early through `send`), the second
    is answered with the group (e.g. a retransmission or an error)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[int, bytes]] = []

    def on_datagrams(
        self, datagrams: Sequence[Any], now: float, send: SendNow | None = None
    ) -> list[bytes | None]:
        assert send is not None and len(datagrams) == 2
        self.clock.now += COMMIT
        send(0, b"cookie OK")
        self.clock.now += BOOKKEEPING
        return [None, b"cookie E1"]


class StubEngine:
    """What Server.datagrams asks of the engine: its counters, the front-end, no packet
    verdicts and no timer."""

    def __init__(self, front_end: FrontEnd) -> None:
        self.stats: Counter[str] = Counter()
        self.front_ends = {LRKPROXY: front_end}

    def take_verdicts(self) -> list[tuple[int, object]]:
        return []

    def next_deadline(self) -> float | None:
        return None


def fake_time(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
    """Only the server module's view of time: pytest's own perf_counter is left alone."""
    monkeypatch.setattr(
        server_module, "time", types.SimpleNamespace(perf_counter=clock, monotonic=time.monotonic)
    )


def make_server(front_end: FrontEnd) -> Server:
    ip = IPv4Address("10.0.0.1")
    return Server(cast(Engine, StubEngine(front_end)), Config(internal_ip=ip, external_ip=ip))


def test_an_early_reply_is_timed_when_sent_and_the_rest_with_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    fake_time(monkeypatch, clock)
    front_end = FrontEnd(clock)
    server = make_server(front_end)
    sent: list[tuple[int, bytes]] = []
    replies = server.datagrams(
        [(b"cookie S ...", ("10.0.0.5", 5060)), (b"cookie X", ("10.0.0.5", 5060))],
        send=lambda index, reply: sent.append((index, reply)),
    )
    assert sent == [(0, b"cookie OK")] and replies == [None, b"cookie E1"]
    assert server.latency.sum == pytest.approx(COMMIT + (COMMIT + BOOKKEEPING))
    assert sum(server.latency.counts) == 2


def test_without_early_send_every_reply_is_timed_with_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    fake_time(monkeypatch, clock)

    class Grouped(FrontEnd):
        def on_datagrams(
            self, datagrams: Sequence[Any], now: float, send: SendNow | None = None
        ) -> list[bytes | None]:
            assert send is None
            self.clock.now += COMMIT + BOOKKEEPING
            return [b"cookie OK", b"cookie E1"]

    ip = IPv4Address("10.0.0.1")
    server = Server(
        cast(Engine, StubEngine(Grouped(clock))), Config(internal_ip=ip, external_ip=ip)
    )
    server.datagrams([(b"a", ("10.0.0.5", 1)), (b"b", ("10.0.0.5", 1))])
    assert server.latency.sum == pytest.approx(2 * (COMMIT + BOOKKEEPING))
