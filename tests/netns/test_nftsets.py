"""The netlink set reader against the real kernel: it reads back exactly what libnftables'
JSON listing reads (the path it replaced), for 40,000 flows with every kind of element the
node can meet after a restart, in the lab's relay namespace.

`LRKP_NFTSETS_BENCH=1 pytest -s tests/netns/test_nftsets.py -k measure` also times both
paths at 40,000, 80,000 and 400,000 map elements and prints the RSS left behind.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import nftables
import pytest

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.processes import rss_kib
from lrkp_tsl.dataplane.nft import NftTable, element_comment
from lrkp_tsl.dataplane.nftsets import SetReader
from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import CallMedia, Endpoint, Flow, InstalledFlow, PortRange

PORTS = PortRange(20000, 59999)
CALLS = 10_000  # 40,000 flows, 80,000 map elements

# Characters element_comment keeps (printable, not '"' or '\\'), and some it replaces.
ODD = "\u00e7\u65e5\u672c 'q' {x}; #$`|<>&*?!~^%=+[]()\u00a0\u2603 \"quoted\" back\\slash\ttab\x7f"


def call_id(i: int) -> str:
    if i % 7 == 0:
        return f"{i}-" + "\u65e5" * 60  # 180 bytes: cut to 128 inside a 3-byte character
    return f"{i:05d}@{ODD[: i % len(ODD)]}" + "x" * (i % 150)


def call(i: int) -> CallMedia:
    port = PORTS.start + (2 * i) % (PORTS.end - PORTS.start)
    caller = Endpoint(IPv4Address(0x0A640000 + i // 8), 10000 + 2 * (i % 8))
    callee = Endpoint(IPv4Address(0x0A650000 + i // 8), 10000 + 2 * (i % 8))
    return CallMedia(
        call_id(i), caller, Endpoint(INTERNAL_IP, port), callee, Endpoint(EXTERNAL_IP, port)
    )


def learning_of(media: CallMedia, i: int) -> frozenset[Endpoint]:
    """Every third call still learns its senders."""
    return media.relay_endpoints() if i % 3 == 0 else frozenset()


def install(table: NftTable, calls: Iterable[int]) -> None:
    table.install(
        (media.call_id, media.flows(), learning_of(media, i)) for i in calls for media in (call(i),)
    )


def key(flow: Flow) -> str:
    return f"{flow.sender.ip} . {flow.sender.port} . {flow.relay.ip} . {flow.relay.port}"


def endpoint(at: Endpoint) -> str:
    return f"{at.ip} . {at.port}"


# -- the JSON path the reader replaced (NftTable._map, installed() and learning() before) -----


class JsonListing:
    """libnftables' JSON listing, as NftTable read its maps and sets before nftsets."""

    def __init__(self) -> None:
        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)

    def _list(self, what: str) -> list[dict[str, Any]]:
        rc, output, error = self.nft.cmd(f"list {what}")
        if rc != 0:
            raise KernelError(f"{what}: nft said: {error.strip()}")
        items: list[dict[str, Any]] = json.loads(output)["nftables"]
        return items

    def map(self, name: str) -> dict[tuple[Endpoint, Endpoint], tuple[Endpoint, str]]:
        elements = {}
        for item in self._list(f"map ip lrkp {name}"):
            for key, data in item.get("map", {}).get("elem", []):
                comment = ""
                if "elem" in key:
                    comment = key["elem"].get("comment", "")
                    key = key["elem"]["val"]
                sender_ip, sender_port, relay_ip, relay_port = key["concat"]
                data_ip, data_port = data["concat"]
                elements[
                    (
                        Endpoint(IPv4Address(sender_ip), int(sender_port)),
                        Endpoint(IPv4Address(relay_ip), int(relay_port)),
                    )
                ] = (Endpoint(IPv4Address(data_ip), int(data_port)), comment)
        return elements

    def installed(self) -> list[InstalledFlow]:
        dnat, snat = self.map("dnat_to"), self.map("snat_to")
        flows = []
        for key in dnat.keys() | snat.keys():
            target, comment = dnat.get(key, (None, ""))
            relay_out, snat_comment = snat.get(key, (None, ""))
            flows.append(InstalledFlow(comment or snat_comment, key[0], key[1], target, relay_out))
        return flows

    def learning(self) -> frozenset[Endpoint]:
        found = set()
        for item in self._list("set ip lrkp learning"):
            for elem in item.get("set", {}).get("elem", []):
                value = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
                ip, port = value["concat"]
                found.add(Endpoint(IPv4Address(ip), int(port)))
        return frozenset(found)


# -- fixtures -------------------------------------------------------------------------------


def drop_table(lab: Lab) -> None:
    lab.run("relay", "nft", "delete", "table", "ip", "lrkp", check=False)


@pytest.fixture
def table(lab: Lab) -> Iterator[NftTable]:
    drop_table(lab)
    try:
        with lab.inside("relay"):
            made = NftTable()
            made.load([INTERNAL_IP, EXTERNAL_IP], PORTS, 60)
        yield made
        made.close()
    finally:
        drop_table(lab)


def nft_file(lab: Lab, path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")
    lab.run("relay", "nft", "-f", str(path))


# -- tests ----------------------------------------------------------------------------------


def test_reads_what_the_json_listing_reads(lab: Lab, table: NftTable, tmp_path: Path) -> None:
    install(table, range(CALLS))
    # What a restart can find besides whole calls: half-flows (an element deleted by an
    # operator or an earlier failure, on either side), elements without a comment, and a
    # comment on one side only.
    half = [call(i).flows()[0] for i in range(1, CALLS, 97)]
    snat_gone, dnat_gone = half[::2], half[1::2]
    extra = [call(CALLS + i) for i in range(50)]
    plain, snat_commented = [m.flows()[0] for m in extra[:25]], [m.flows()[0] for m in extra[25:]]
    lines = [f"delete element ip lrkp snat_to {{ {key(f)} }}" for f in snat_gone]
    lines += [f"delete element ip lrkp dnat_to {{ {key(f)} }}" for f in dnat_gone]
    for f in plain + snat_commented:
        lines.append(f"add element ip lrkp dnat_to {{ {key(f)} : {endpoint(f.target)} }}")
    for f in plain:
        lines.append(f"add element ip lrkp snat_to {{ {key(f)} : {endpoint(f.relay_out)} }}")
    for f in snat_commented:
        lines.append(
            f'add element ip lrkp snat_to {{ {key(f)} comment "snat only" : '
            f"{endpoint(f.relay_out)} }}"
        )
    lines.append("add element ip lrkp learning { 10.201.1.1 . 59999, 10.201.2.1 . 59998 }")
    nft_file(lab, tmp_path / "edits.nft", lines)

    with lab.inside("relay"):
        reader = SetReader()
        reference = JsonListing()
    with reader:
        before = rss_kib()
        started = time.perf_counter()
        flows = reader.read_flows()
        netlink_flows = time.perf_counter() - started
        learning = reader.read_learning()
        netlink_learning = time.perf_counter() - started - netlink_flows
        count, learning_count = len(flows), len(learning)
        del flows, learning
        gc.collect()
        left = rss_kib() - before
        flows, learning = reader.read_flows(), reader.read_learning()
    started = time.perf_counter()
    expected = reference.installed()
    json_flows = time.perf_counter() - started
    expected_learning = reference.learning()
    json_learning = time.perf_counter() - started - json_flows
    print(
        f"\n{len(flows)} flows: netlink {netlink_flows:.3f} s, JSON {json_flows:.3f} s; "
        f"{len(learning)} learning: netlink {netlink_learning:.3f} s, JSON {json_learning:.3f} s; "
        f"RSS left after a netlink read: {left} KiB"
    )

    assert (count, learning_count) == (len(flows), len(learning))
    assert len(flows) == len(expected) == 4 * CALLS + len(extra)
    assert Counter(flows) == Counter(expected)
    assert learning == expected_learning
    # The kinds of elements are all there, and read as installed() reads them.
    by_key = {(f.sender, f.relay): f for f in flows}
    for f in snat_gone:
        assert by_key[f.sender, f.relay].relay_out is None
        assert by_key[f.sender, f.relay].target == f.target
    for f in dnat_gone:
        assert by_key[f.sender, f.relay].target is None
        assert by_key[f.sender, f.relay].relay_out == f.relay_out
    assert {by_key[f.sender, f.relay].comment for f in plain} == {""}
    assert {by_key[f.sender, f.relay].comment for f in snat_commented} == {"snat only"}
    comments = {element_comment(call(i).call_id) for i in range(CALLS)}
    assert comments <= {f.comment for f in flows}
    assert max(len(c.encode()) for c in comments) == 128
    learnt = {e for i in range(0, CALLS, 3) for e in learning_of(call(i), i)}
    assert learning == learnt | {Endpoint(INTERNAL_IP, 59999), Endpoint(EXTERNAL_IP, 59998)}

    # NftTable reads through the reader now, in the namespace of the caller.
    with lab.inside("relay"):
        assert Counter(table.installed()) == Counter(expected)
        assert table.learning() == expected_learning
    assert netlink_flows < json_flows
    assert left < 16 * 1024, "a netlink read left memory behind"


def test_empty_and_missing(lab: Lab, table: NftTable) -> None:
    with lab.inside("relay"):
        reader = SetReader()
    with reader:
        assert reader.read_flows() == []
        assert reader.read_learning() == frozenset()
        drop_table(lab)
        with pytest.raises(KernelError, match="no such table or set"):
            reader.read_flows()
        with pytest.raises(KernelError, match="no such table or set"):
            reader.read_learning()
        # Still usable after the errors.
        with lab.inside("relay"):
            table.load([INTERNAL_IP, EXTERNAL_IP], PORTS, 60)
        install(table, range(3))
        assert len(reader.read_flows()) == 12


@pytest.mark.parametrize("pause", [0.02, 0.0], ids=["some-churn", "constant-churn"])
def test_reads_stay_whole_while_the_ruleset_changes(
    lab: Lab, table: NftTable, pause: float
) -> None:
    """Every transaction, even on another set, interrupts a dump (NLM_F_DUMP_INTR): the
    reader reads again and never returns a partial map; a ruleset that never holds still
    for a whole dump, ATTEMPTS times in a row, is a KernelError."""
    install(table, range(1000))
    with lab.inside("relay"):
        reader = SetReader()
        writer = nftables.Nftables()
        expected = JsonListing().installed()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            writer.cmd("add element ip lrkp learning { 10.201.1.1 . 59990 }")
            writer.cmd("delete element ip lrkp learning { 10.201.1.1 . 59990 }")
            time.sleep(pause)

    thread = threading.Thread(target=churn)
    thread.start()
    whole = refused = 0
    received = []
    try:
        with reader:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                before = reader.bytes_received
                try:
                    flows = reader.read_flows()
                except KernelError as exc:
                    assert "changed" in exc.reason
                    refused += 1
                    continue
                received.append(reader.bytes_received - before)
                assert Counter(flows) == Counter(expected)
                whole += 1
    finally:
        stop.set()
        thread.join()
    print(f"\n{whole} whole reads, {refused} refused; bytes per read {sorted(set(received))}")
    if pause:
        # Some dumps were interrupted and read again: more bytes for one read.
        assert whole > 0
        assert max(received) > min(received), "no read was interrupted: no churn?"
    else:
        assert whole + refused > 0


# -- measurement (opt-in) ---------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("LRKP_NFTSETS_BENCH"), reason="LRKP_NFTSETS_BENCH=1")
@pytest.mark.parametrize("calls", [5_000, 10_000, 50_000])
def test_measure(lab: Lab, table: NftTable, calls: int) -> None:
    install(table, range(calls))
    with lab.inside("relay"):
        reader = SetReader()
        reference = JsonListing()
    gc.collect()
    start_rss = rss_kib()
    with reader:
        started = time.perf_counter()
        flows = reader.read_flows()
        netlink_flows = time.perf_counter() - started
        learning = reader.read_learning()
        netlink_learning = time.perf_counter() - started - netlink_flows
        holding = rss_kib() - start_rss
        count = len(flows)
        del flows, learning
        gc.collect()
    netlink_left = rss_kib() - start_rss
    started = time.perf_counter()
    expected = reference.installed()
    json_flows = time.perf_counter() - started
    expected_learning = reference.learning()
    json_learning = time.perf_counter() - started - json_flows
    assert len(expected) == count
    del expected, expected_learning
    gc.collect()
    json_left = rss_kib() - start_rss - netlink_left
    print(
        f"\n{calls} calls, {2 * count} map elements: read_flows {netlink_flows:.3f} s "
        f"({netlink_flows / (2 * count) * 1e6:.1f} us/element) "
        f"(JSON {json_flows:.3f} s), read_learning {netlink_learning:.3f} s "
        f"(JSON {json_learning:.3f} s); RSS while holding the result +{holding} KiB, "
        f"after dropping it +{netlink_left} KiB; JSON path then left +{json_left} KiB"
    )
