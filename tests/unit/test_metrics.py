"""The metrics a scrape builds from the engine's counters and the kernel's, parsed back
with prometheus_client's own parser; and the command-latency histogram."""

from __future__ import annotations

import asyncio
import math
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from lrkp_tsl.ctcapacity import Fill
from lrkp_tsl.latency import BUCKETS, Latency
from lrkp_tsl.metrics import NodeCollector, Snapshot, on_loop

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(collector: NodeCollector) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def snapshot(**stats: int) -> Snapshot:
    latency = Latency()
    latency.observe(0.0002)
    latency.observe(0.003)
    return Snapshot(
        {k.replace("__", "."): v for k, v in stats.items()}, 3, 12, 2000, True, 2, latency
    )


def test_calls_are_counted_by_protocol_and_ng_has_its_own_counters() -> None:
    snap = replace(
        snapshot(
            protocol__lrkproxy__started=9, protocol__ng__started=4, protocol__ng__ended=1,
            ng__request__offer=5, ng__request__answer=4, ng__error__refused=1,
            ng__call__new=4, ng__call__forked=1,
        ),
        protocols={"lrkproxy": 2, "ng": 1},
    )  # fmt: skip
    got = scrape(NodeCollector(lambda: snap, lambda: None))

    def v(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert v("lrkp_sessions_by_protocol", protocol="lrkproxy") == 2
    assert v("lrkp_sessions_by_protocol", protocol="ng") == 1
    assert v("lrkp_protocol_sessions_started_total", protocol="ng") == 4
    assert v("lrkp_protocol_closed_sessions_total", protocol="ng") == 1
    assert v("lrkp_protocol_closed_sessions_total", protocol="lrkproxy") == 0  # shown at 0
    assert v("lrkp_ng_requests_total", command="offer") == 5
    assert v("lrkp_ng_errors_total", code="refused") == 1
    assert v("lrkp_ng_calls_total", outcome="forked") == 1


def test_engine_counters_become_rtpengine_style_metrics() -> None:
    snap = snapshot(
        calls__removed__idle=4, calls__removed__deleted=7, calls__relaying=14,
        command__set__ok=14, command__set__refused=1, command__unparsed__error=2,
        packets__learned=5, packets__stranger=3, packets__relearned=1,
        queue__verdict__accept=6, error__kernel=1, dropped__not_allowed=9,
    )  # fmt: skip
    kernel = {"relayed": (1000, 172000), "queued": (9, 1500), "unknown_dropped": (4, 400),
              "displaced_dropped": (0, 0), "queue_overlimit": (2, 300),
              "local_socket": (12, 900)}  # fmt: skip
    got = scrape(NodeCollector(lambda: snap, lambda: kernel))

    def v(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert v("lrkp_sessions") == 3 and v("lrkp_sessions_started_total") == 14
    assert v("lrkp_closed_sessions_total", reason="idle") == 4
    assert v("lrkp_closed_sessions_total", reason="deleted") == 7
    assert v("lrkp_closed_sessions_total", reason="lifetime") == 0  # shown before it happens
    assert v("lrkp_commands_total", command="set", result="refused") == 1
    assert v("lrkp_commands_total", command="unparsed", result="error") == 2
    assert v("lrkp_latching_total", outcome="learned") == 5
    assert v("lrkp_latching_total", outcome="relearned") == 1
    assert v("lrkp_latching_total", outcome="stranger") == 3
    assert v("lrkp_queue_verdicts_total", verdict="accept") == 6
    assert v("lrkp_queue_held_packets") == 2
    assert v("lrkp_errors_total", kind="kernel") == 1
    assert v("lrkp_control_dropped_total", reason="not_allowed") == 9
    assert v("lrkp_ports_used") == 12 and v("lrkp_ports_free") == 1988
    assert v("lrkp_packets_total", type="kernel") == 1000
    assert v("lrkp_bytes_total", type="kernel") == 172000
    assert v("lrkp_packets_total", type="userspace") == 9
    assert v("lrkp_kernel_dropped_packets_total", reason="unknown") == 4
    assert v("lrkp_kernel_dropped_packets_total", reason="queue_overlimit") == 2
    assert v("lrkp_kernel_local_socket_packets_total") == 12
    assert v("lrkp_command_duration_seconds_count") == 2
    assert v("lrkp_command_duration_seconds_bucket", le="0.00025") == 1
    assert v("lrkp_command_duration_seconds_bucket", le="+Inf") == 2
    assert v("lrkp_kernel_table_present") == 1 and v("lrkp_active") == 1


FILL = Fill(1990, 2000, {"insert_failed": 1, "drop": 5, "early_drop": 0})


def test_conntrack_fill_level_and_failures() -> None:
    """2000 relay ports hold 500 calls; 3 are live: the 497 others need 994 entries, 10
    are free."""
    got = scrape(NodeCollector(snapshot, lambda: None, lambda: FILL))

    def v(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert v("lrkp_conntrack_entries") == 1990 and v("lrkp_conntrack_max") == 2000
    assert v("lrkp_conntrack_shortfall") == 994 - 10
    assert v("lrkp_conntrack_failures_total", kind="drop") == 5
    assert v("lrkp_conntrack_failures_total", kind="insert_failed") == 1
    assert v("lrkp_conntrack_failures_total", kind="early_drop") == 0
    roomy = scrape(NodeCollector(snapshot, lambda: None, lambda: Fill(10, 262144, FILL.failures)))
    assert roomy[("lrkp_conntrack_shortfall", frozenset())] == 0
    absent = scrape(NodeCollector(snapshot, lambda: None, lambda: None))
    assert not any(name.startswith("lrkp_conntrack") for name, _labels in absent)


def test_a_missing_table_is_reported_not_an_error() -> None:
    got = scrape(NodeCollector(snapshot, lambda: None))
    assert got[("lrkp_kernel_table_present", frozenset())] == 0
    assert not any(name == "lrkp_packets_total" for name, _labels in got)


def test_latency_buckets_are_cumulative_and_bounded() -> None:
    latency = Latency()
    for seconds in (0.00005, 0.0001, 0.0004, 0.02, 3.0):
        latency.observe(seconds)
    cumulative = dict(latency.cumulative())
    assert cumulative["0.0001"] == 2  # le: an observation on the bound counts in it
    assert cumulative["0.0005"] == 3
    assert cumulative["0.025"] == 4
    assert cumulative[str(BUCKETS[-1])] == 4 and cumulative["+Inf"] == 5
    assert latency.sum == pytest.approx(3.02055)


def test_a_scrape_reads_the_engine_on_the_loop_thread() -> None:
    """The engine is only ever read in the event loop's thread, never the scrape's."""
    seen: list[int] = []

    def take() -> Snapshot:
        seen.append(threading.get_ident())
        return snapshot()

    async def main() -> Snapshot:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, on_loop, loop, take)

    assert asyncio.run(main()).calls == 3
    assert seen == [threading.main_thread().ident]


PAIR = {
    "role": "standby",
    "in_sync": True,
    "lag": 0.004,
    "active_calls": 3,
    "applied": 17,
    "published": 0,
    "queued": 0,
}


def pair_snapshot() -> Snapshot:
    return replace(snapshot(), pair=PAIR)


def test_a_pair_shows_its_health() -> None:
    got = scrape(NodeCollector(pair_snapshot, lambda: None))

    def v(name: str) -> float:
        return got[(name, frozenset())]

    assert v("lrkp_pair_in_sync") == 1 and v("lrkp_pair_lag_seconds") == 0.004
    assert v("lrkp_pair_peer_calls") == 3 and v("lrkp_pair_changes_applied_total") == 17
    never = replace(snapshot(), pair=PAIR | {"in_sync": False, "lag": None})
    got = scrape(NodeCollector(lambda: never, lambda: None))
    assert v("lrkp_pair_in_sync") == 0 and math.isnan(v("lrkp_pair_lag_seconds"))
    single = scrape(NodeCollector(snapshot, lambda: None))  # no pair: no pair metrics
    assert not any(name.startswith("lrkp_pair_") for name, _labels in single)


def test_docs_describe_every_metric_and_no_other() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(lrkp_[a-z_]+)` \|", doc, re.MULTILINE))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(pair_snapshot, lambda: {"relayed": (1, 1)}, lambda: FILL))
    exposed = {family.name for family in registry.collect()}
    # prometheus_client names a counter family without its _total suffix
    types = {family.name: family.type for family in registry.collect()}
    exposed = {name + ("_total" if types[name] == "counter" else "") for name in exposed}
    assert documented == exposed
