"""Prometheus metrics over HTTP (`metrics.listen`; off by default): docs/metrics.md.

Nothing here runs per packet or per command. The engine already counts what happens in its
`stats` Counter (and the server times commands, latency.py); the kernel counts packets in
the named counters of lrkp_tsl/rules/lrkp.nft. A scrape reads both at scrape time:

- the engine's state lives in the asyncio loop, so the scrape thread asks the loop for a
  copy (`call_soon_threadsafe`: a dict copy of some 50 keys and a few lengths, one loop
  turn) instead of reading a dict that the loop may be changing;
- the kernel counters are read in the scrape thread itself over nf_tables netlink
  (nftcounters.py), a few small messages whatever the number of calls;
- the conntrack table's fill level and failures come from three small /proc reads
  (ctcapacity.py), never a dump.

Names follow rtpengine's (`rtpengine_sessions`, `..._closed_sessions_total{reason}`,
`..._packets_total{type="kernel|userspace"}`, `..._ports_used/free`) with the prefix `lrkp_`.
The page is rendered by prometheus_client and served by scrape.py on the node's event loop
(bounded connections, timeouts, one render thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from lrkp_tsl import ctcapacity
from lrkp_tsl.ctcapacity import Fill
from lrkp_tsl.engine import Engine
from lrkp_tsl.latency import Latency

PREFIX = "lrkp"
# How long a scrape waits for the event loop before it fails (a stalled loop is news).
LOOP_TIMEOUT = 5.0
# Drop counters of lrkp_tsl/rules/lrkp.nft: nft counter name -> `reason` label.
KERNEL_DROPS = {
    "unknown_dropped": "unknown",
    "displaced_dropped": "displaced",
    "queue_overlimit": "queue_overlimit",
}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The engine's state as one loop turn saw it."""

    stats: dict[str, int]
    calls: int
    ports_used: int
    ports_total: int
    active: bool
    held: int
    latency: Latency
    protocols: dict[str, int] = field(default_factory=dict)  # live calls by protocol
    pair: dict[str, Any] | None = None  # a pair's health (pairhealth.py); None: no pair


def take_snapshot(
    engine: Engine,
    latency: Latency,
    ports_total: int,
    pair: Callable[[], dict[str, Any]] | None = None,
) -> Snapshot:
    """On the event loop only: O(stats keys + calls holding a first packet)."""
    return Snapshot(
        dict(engine.stats),
        len(engine.table),
        len(engine.table.ports),
        ports_total,
        bool(engine.active),
        sum(len(held) for held in engine.held.values()),
        latency.copy(),
        dict(engine.table.protocols),
        None if pair is None else pair(),
    )


def on_loop(loop: asyncio.AbstractEventLoop, function: Callable[[], Snapshot]) -> Snapshot:
    """Run `function` in the loop's thread and wait for its result (from another thread)."""
    future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as exc:
            future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return future.result(LOOP_TIMEOUT)


def _prefixed(stats: dict[str, int], prefix: str) -> Iterator[tuple[str, int]]:
    for key, value in stats.items():
        if key.startswith(prefix):
            yield key[len(prefix) :], value


def _label(text: str) -> str:
    return text.replace("-", "_").replace(".", "_")


# Latching outcomes: the engine's `packets.<event>` keys (session.PacketEvent, and what the
# engine does with held and displaced packets).
LATCHING = {
    "learned": "learned",
    "relearned": "relearned",
    "stranger": "stranger",
    "held": "held",
    "released": "released",
    "hold_dropped": "hold_dropped",
    "no-call": "no_call",
    "none": "already_latched",
    "displaced": "displaced",
    "standby": "standby",
}


# Why calls end (session.Reason), shown at 0 before the first one so dashboards see them.
CLOSED_REASONS = ("deleted", "idle", "lifetime", "replaced", "replicated", "operator")


def _by_prefix(
    name: str, doc: str, label: str, stats: dict[str, int], prefix: str
) -> CounterMetricFamily:
    """One counter family labelled by what follows `prefix` in the engine's stats keys."""
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    for key, count in sorted(_prefixed(stats, prefix)):
        family.add_metric([_label(key)], count)
    return family


def engine_metrics(snap: Snapshot) -> Iterator[Metric]:
    stats = snap.stats
    yield GaugeMetricFamily(f"{PREFIX}_sessions", "Live calls", snap.calls)
    yield CounterMetricFamily(
        f"{PREFIX}_sessions_started",
        "Calls set up by an S command",
        value=stats.get("calls.relaying", 0),
    )
    yield from protocol_metrics(snap)
    closed = CounterMetricFamily(
        f"{PREFIX}_closed_sessions", "Calls ended, by reason", labels=["reason"]
    )
    ended = dict.fromkeys(CLOSED_REASONS, 0) | dict(_prefixed(stats, "calls.removed."))
    for reason, count in sorted(ended.items()):
        closed.add_metric([_label(reason)], count)
    yield closed
    commands = CounterMetricFamily(
        f"{PREFIX}_commands",
        "Control commands answered, by command and result",
        labels=["command", "result"],
    )
    for key, count in sorted(_prefixed(stats, "command.")):
        command, _, result = key.partition(".")
        commands.add_metric([command, result], count)
    yield commands
    yield CounterMetricFamily(
        f"{PREFIX}_command_retransmissions",
        "Retransmitted commands answered from the cache",
        value=stats.get("retransmissions", 0),
    )
    histogram = HistogramMetricFamily(
        f"{PREFIX}_command_duration_seconds",
        "Time from reading a command to sending its reply",
        labels=[],
    )
    histogram.add_metric([], snap.latency.cumulative(), snap.latency.sum)
    yield histogram
    latching = CounterMetricFamily(
        f"{PREFIX}_latching",
        "First packets brought to userspace, by what the node made of them",
        labels=["outcome"],
    )
    for event, outcome in LATCHING.items():
        latching.add_metric([outcome], stats.get(f"packets.{event}", 0))
    yield latching
    verdicts = CounterMetricFamily(
        f"{PREFIX}_queue_verdicts", "Verdicts on queued packets", labels=["verdict"]
    )
    for verdict in ("accept", "drop"):
        verdicts.add_metric([verdict], stats.get(f"queue.verdict.{verdict}", 0))
    yield verdicts
    yield GaugeMetricFamily(
        f"{PREFIX}_queue_held_packets", "First packets held for the other party", snap.held
    )
    yield _by_prefix(
        "control_dropped", "Control datagrams dropped unanswered, by why", "reason",
        stats, "dropped.",
    )  # fmt: skip
    yield _by_prefix("errors", "Errors counted by the node, by kind", "kind", stats, "error.")
    yield _by_prefix(
        "stream_events", "Conntrack events of relayed streams", "event", stats, "streams."
    )
    yield CounterMetricFamily(
        f"{PREFIX}_kernel_repairs",
        "Times the node put its kernel state back (table flushed or rule removed)",
        value=stats.get("kernel.repairs", 0),
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_ports_used", "Relay ports held by live calls", snap.ports_used
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_ports_free", "Relay ports no live call holds", snap.ports_total - snap.ports_used
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_active",
        "1 if this node answers commands (0: a pair's standby)",
        int(snap.active),
    )
    if snap.pair is not None:
        yield from pair_metrics(snap.pair)


def _number(value: object) -> float:
    """A gauge's value; NaN for what is not known (never measured)."""
    return float(value) if isinstance(value, int | float) else math.nan


def pair_metrics(pair: dict[str, Any]) -> Iterator[Metric]:
    """An active/standby pair's health (only in pair mode): docs/metrics.md says how to
    alarm on it."""
    yield GaugeMetricFamily(
        f"{PREFIX}_pair_in_sync",
        "1 if a takeover now keeps every call: on the standby, it is in sync with the "
        "active; on the active, a standby follows it in sync",
        int(bool(pair.get("in_sync"))),
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_pair_lag_seconds",
        "How old the newest state of the active the standby is known to hold is (NaN: never)",
        _number(pair.get("lag")),
    )
    other = "active_calls" if pair.get("role") == "standby" else "standby_calls"
    yield GaugeMetricFamily(
        f"{PREFIX}_pair_peer_calls",
        "Calls the other node holds: the active's Redis on a standby, the standby's own "
        "report on the active (NaN: unknown)",
        _number(pair.get(other)),
    )
    yield CounterMetricFamily(
        f"{PREFIX}_pair_changes_applied",
        "Changes of the active's calls this node applied as a standby",
        value=int(pair.get("applied", 0)),
    )
    yield CounterMetricFamily(
        f"{PREFIX}_pair_changes_published",
        "Changes of this node's calls written to its Redis as the active",
        value=int(pair.get("published", 0)),
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_pair_publish_queue",
        "Changes waiting to be written to this node's Redis",
        int(pair.get("queued", 0)),
    )


PROTOCOLS = ("lrkproxy", "ng")  # shown at 0 before their first call
# The ng front-end's counters (frontends/ng.py): stats prefix -> (metric, doc, label).
NG_FAMILIES = {
    "ng.request.": ("ng_requests", "ng requests read, by command", "command"),
    "ng.error.": ("ng_errors", "ng requests answered with an error, by code", "code"),
    "ng.call.": ("ng_calls", "ng call changes carried out, by outcome", "outcome"),
}


def protocol_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Calls by control protocol (lrkproxy, ng), and the ng front-end's own counters."""
    stats = snap.stats
    live = GaugeMetricFamily(
        f"{PREFIX}_sessions_by_protocol", "Live calls, by control protocol", labels=["protocol"]
    )
    started = CounterMetricFamily(
        f"{PREFIX}_protocol_sessions_started",
        "Calls set up, by control protocol (lrkproxy S, ng offer)",
        labels=["protocol"],
    )
    closed = CounterMetricFamily(
        f"{PREFIX}_protocol_closed_sessions",
        "Calls ended, by control protocol",
        labels=["protocol"],
    )
    names = sorted({*PROTOCOLS, *snap.protocols})
    for protocol in names:
        live.add_metric([protocol], snap.protocols.get(protocol, 0))
        started.add_metric([protocol], stats.get(f"protocol.{protocol}.started", 0))
        closed.add_metric([protocol], stats.get(f"protocol.{protocol}.ended", 0))
    yield live
    yield started
    yield closed
    for prefix, (name, doc, label) in NG_FAMILIES.items():
        yield _by_prefix(name, doc, label, stats, prefix)


def kernel_metrics(counters: dict[str, tuple[int, int]] | None) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        f"{PREFIX}_kernel_table_present",
        "1 if the node's table is in the kernel (0 for the second before it is repaired)",
        int(counters is not None),
    )
    if counters is None:
        return
    packets = CounterMetricFamily(
        f"{PREFIX}_packets",
        "Packets to relay ports of live calls: relayed by the kernel, or brought to userspace",
        labels=["type"],
    )
    octets = CounterMetricFamily(
        f"{PREFIX}_bytes", "Bytes of the packets in lrkp_packets_total", labels=["type"]
    )
    for name, kind in (("relayed", "kernel"), ("queued", "userspace")):
        if name in counters:
            packets.add_metric([kind], counters[name][0])
            octets.add_metric([kind], counters[name][1])
    yield packets
    yield octets
    drops = CounterMetricFamily(
        f"{PREFIX}_kernel_dropped_packets",
        "Packets to relay ports dropped in the kernel, by why",
        labels=["reason"],
    )
    for name, reason in KERNEL_DROPS.items():
        if name in counters:
            drops.add_metric([reason], counters[name][0])
    yield drops
    yield CounterMetricFamily(
        f"{PREFIX}_kernel_local_socket_packets",
        "Packets to relay ports delivered to a socket of the node's own host",
        value=counters.get("local_socket", (0, 0))[0],
    )


def conntrack_metrics(fill: Fill | None, snap: Snapshot) -> Iterator[Metric]:
    """The conntrack table's fill level and the entries it could not keep (ctcapacity.py)."""
    if fill is None:
        return  # no conntrack in this namespace yet
    yield GaugeMetricFamily(
        f"{PREFIX}_conntrack_entries",
        "Conntrack entries in use in the node's network namespace (nf_conntrack_count)",
        fill.count,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_conntrack_max",
        "The kernel's conntrack limit (nf_conntrack_max; 0: none)",
        fill.max,
    )
    calls_in_range = snap.ports_total // ctcapacity.PORTS_PER_CALL
    yield GaugeMetricFamily(
        f"{PREFIX}_conntrack_shortfall",
        "Conntrack entries the calls the relay range can still take could need beyond those "
        "free (0: room enough)",
        ctcapacity.shortfall(fill, calls_in_range, snap.calls),
    )
    failures = CounterMetricFamily(
        f"{PREFIX}_conntrack_failures",
        "New conntrack entries the kernel could not keep, by kind",
        labels=["kind"],
    )
    for kind in ctcapacity.FAILURES:
        failures.add_metric([kind], fill.failures.get(kind, 0))
    yield failures


class NodeCollector(Collector):
    """Builds every metric at scrape time from `snapshot()`, `kernel()` and `conntrack()`."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        kernel: Callable[[], dict[str, tuple[int, int]] | None],
        conntrack: Callable[[], Fill | None] = lambda: None,
    ) -> None:
        self._snapshot = snapshot
        self._kernel = kernel
        self._conntrack = conntrack
        self._kernel_lock = threading.Lock()  # one netlink socket, scrapes in threads

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from engine_metrics(snap)
        with self._kernel_lock:
            counters = self._kernel()
        yield from kernel_metrics(counters)
        yield from conntrack_metrics(self._conntrack(), snap)


class Exporter:
    """The /metrics HTTP endpoint of a running node; `close()` stops it."""

    def __init__(
        self,
        listen: tuple[str, int],
        engine: Engine,
        latency: Latency,
        ports_total: int,
        loop: asyncio.AbstractEventLoop,
        pair: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from lrkp_tsl.dataplane.nft import FAMILY, TABLE
        from lrkp_tsl.dataplane.nftcounters import CounterReader
        from lrkp_tsl.scrape import ScrapeServer

        self._reader = CounterReader()  # opened here: in the node's network namespace
        collector = NodeCollector(
            lambda: on_loop(loop, lambda: take_snapshot(engine, latency, ports_total, pair)),
            lambda: self._reader.counters(FAMILY, TABLE),
            ctcapacity.read_fill,  # /proc of this process: the node's network namespace
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)  # process_*: CPU, memory, descriptors
        try:
            self._server = ScrapeServer(
                listen, lambda: generate_latest(self.registry), loop, CONTENT_TYPE_LATEST
            )
        except OSError:
            self._reader.close()
            raise
        self.address = self._server.address

    def close(self) -> None:
        self._server.close(then=self._reader.close)
