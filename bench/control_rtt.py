"""Control path: `S` round trip and sustained `S`+`D` pairs per second at 1k and 20k calls.

Runs as root in a lab: the real daemon (`lrkp-tsl run`) in the relay namespace, controlled
over loopback like a co-located Kamailio. For each size the node is first filled to that
many live calls with `S` (not measured); then SAMPLE new calls are set up one at a time
(`S` round trip: from sendto to the `OK`, which the node sends after the kernel commit),
and SAMPLE `S`+`D` pairs are run back to back (a closed loop: pairs per second).

    .venv/bin/python bench/control_rtt.py [--sizes 1000,20000] [--sample 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from lrkp_tsl.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from tests.netns.daemon import Controller, Node, set_command

CONTROL = ("127.0.0.1", 22333)
PORTS = (1024, 65535)
CALLS_PER_IP = (PORTS[1] - PORTS[0] + 1) // 4


def s_body(index: int, verb: str = "S") -> bytes:
    relay_ip = (INTERNAL_IP, EXTERNAL_IP)[index // CALLS_PER_IP]
    port = PORTS[0] + 4 * (index % CALLS_PER_IP)
    return set_command(verb, "10.201.1.10", str(relay_ip), str(relay_ip), "10.201.1.11",
                       2000 + 2 * (index % 30000), port, port + 2, 2000 + 2 * (index % 30000),
                       f"bench-{index}@control")  # fmt: skip


def exchange(client: Controller, body: bytes) -> float:
    started = time.perf_counter()
    reply = client.command(body, CONTROL, wait=5.0)
    elapsed = time.perf_counter() - started
    if reply != body + b"OK":
        raise RuntimeError(f"unexpected reply {reply!r} to {body!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/control_rtt.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows = []
    with Lab() as lab:
        node = Node(lab, "relay", "--internal-ip", str(INTERNAL_IP), "--external-ip",
                    str(EXTERNAL_IP), "--ports", f"{PORTS[0]}-{PORTS[1]}", "--control",
                    f"udp:{CONTROL[0]}:{CONTROL[1]}", "--flush-on-exit",
                    "--log-level", "warning")  # fmt: skip
        client = Controller(lab, "relay", "127.0.0.1")
        try:
            node.wait_ready(CONTROL, client)
            live = 0
            for size in sizes:
                for index in range(live, size):
                    exchange(client, s_body(index))
                live = size
                rtt = [exchange(client, s_body(size + i)) for i in range(args.sample)]
                for i in range(args.sample):
                    exchange(client, s_body(size + i, "D"))
                started = time.perf_counter()
                for i in range(args.sample):
                    exchange(client, s_body(size + i))
                    exchange(client, s_body(size + i, "D"))
                pairs = args.sample / (time.perf_counter() - started)
                ordered = sorted(rtt)
                rows.append({
                    "live": size,
                    "s_rtt_p50_ms": 1000 * statistics.median(ordered),
                    "s_rtt_p99_ms": 1000 * ordered[int(0.99 * len(ordered))],
                    "s_d_pairs_per_s": pairs,
                })  # fmt: skip
        finally:
            client.close()
            node.stop()
    for row in rows:
        print(
            f"{row['live']:>6} live calls: S round trip p50 {row['s_rtt_p50_ms']:.3f} ms, "
            f"p99 {row['s_rtt_p99_ms']:.3f} ms; S+D pairs {row['s_d_pairs_per_s']:,.0f}/s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
