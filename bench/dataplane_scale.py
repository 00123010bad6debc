"""Commit/remove latency and rate of the kernel data plane at 1k, 10k and 50k live calls.

Runs as root in a lab's relay namespace. For each size the table is first filled to that
many live calls (in large batched transactions, not measured), then SAMPLE calls are
committed one by one and removed one by one through `DataPlane`, exactly as the node does
per `S`/`D` (one nftables transaction + the conntrack deletions). The ratio of p50 at the
largest size to p50 at the smallest is the flatness figure (goal <= 1.5).

    .venv/bin/python bench/dataplane_scale.py [--sizes 1000,10000,50000] [--sample 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

from lrkp_lab.lab import Lab
from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.nft import add_commands
from lrkp_tsl.media import CallMedia, Endpoint, PortRange

PORTS = PortRange(1024, 65535)
# Relay addresses for the benchmark's calls: 16k calls of 4 ports each fit on one address.
RELAY_IPS = [IPv4Address(f"10.201.4.{i}") for i in range(1, 9)]
CALLS_PER_IP = (PORTS.end - PORTS.start + 1) // 4


def synthetic_call(index: int) -> CallMedia:
    relay_ip = RELAY_IPS[index // CALLS_PER_IP]
    port = PORTS.start + 4 * (index % CALLS_PER_IP)
    return CallMedia(
        f"bench-{index}@lrkp",
        Endpoint(IPv4Address("10.201.1.10"), 2000 + 2 * (index % 30000)),
        Endpoint(relay_ip, port + 2),
        Endpoint(IPv4Address("10.201.2.10"), 2000 + 2 * (index % 30000)),
        Endpoint(relay_ip, port),
    )


def chunks(start: int, stop: int, size: int) -> Iterator[range]:
    for first in range(start, stop, size):
        yield range(first, min(first + size, stop))


def fill(plane: DataPlane, start: int, stop: int) -> None:
    for block in chunks(start, stop, 1000):
        commands = []
        for index in block:
            media = synthetic_call(index)
            commands += add_commands(media.call_id, media.flows())
        plane.nft.transaction(commands, "bench fill")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(plane: DataPlane, live: int, sample: int) -> dict[str, float]:
    calls = [synthetic_call(live + i) for i in range(sample)]
    commit, remove = [], []
    started = time.perf_counter()
    for media in calls:
        t0 = time.perf_counter()
        plane.commit(media)
        commit.append(time.perf_counter() - t0)
    commit_wall = time.perf_counter() - started
    started = time.perf_counter()
    for media in calls:
        t0 = time.perf_counter()
        plane.remove_call(media)
        remove.append(time.perf_counter() - t0)
    remove_wall = time.perf_counter() - started
    return {
        "live": live,
        "commit_p50_ms": 1000 * statistics.median(commit),
        "commit_p99_ms": 1000 * percentile(commit, 0.99),
        "commit_per_s": sample / commit_wall,
        "remove_p50_ms": 1000 * statistics.median(remove),
        "remove_p99_ms": 1000 * percentile(remove, 0.99),
        "remove_per_s": sample / remove_wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dataplane_scale.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if sizes[-1] + args.sample > CALLS_PER_IP * len(RELAY_IPS):
        print(f"bench: at most {CALLS_PER_IP * len(RELAY_IPS)} calls", file=sys.stderr)
        return 2
    rows = []
    with Lab() as lab:
        with lab.inside("relay"):
            plane = DataPlane()
            plane.start(RELAY_IPS, PORTS, 60)
        try:
            live = 0
            for size in sizes:
                fill(plane, live, size)
                live = size
                rows.append(measure(plane, live, args.sample))
        finally:
            plane.shutdown(flush=True)
    print(f"{'live calls':>10} | commit p50 / p99 ms | commits/s | remove p50 / p99 ms | removes/s")
    for row in rows:
        print(
            f"{row['live']:>10} | {row['commit_p50_ms']:8.3f} / {row['commit_p99_ms']:6.3f}  |"
            f" {row['commit_per_s']:9.0f} |"
            f" {row['remove_p50_ms']:8.3f} / {row['remove_p99_ms']:6.3f}"
            f"  | {row['remove_per_s']:9.0f}"
        )
    ratio_commit = rows[-1]["commit_p50_ms"] / rows[0]["commit_p50_ms"]
    ratio_remove = rows[-1]["remove_p50_ms"] / rows[0]["remove_p50_ms"]
    print(
        f"p50 ratio {sizes[-1]} / {sizes[0]} live calls: commit {ratio_commit:.2f}, "
        f"remove {ratio_remove:.2f} (goal <= 1.5)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"rows": rows, "ratio_commit": ratio_commit, "ratio_remove": ratio_remove}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
