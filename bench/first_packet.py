"""First-packet latency through the NFQUEUE learner, against an already committed leg.

Runs as root: builds a lab, starts the real daemon (`lrkp-tsl run`, policy auto) in the
relay namespace, and for each of N calls sends one packet and times it from just before
`sendto` to its arrival at the other party (both sockets in this process, one clock):
- queued:    caller `c` behind the NAT box (private SDP address): its first packet goes
             to userspace, which learns the NAT's address, commits the flows, accepts it;
- committed: caller `a` on the internal network (reachable SDP address): its flows are in
             the kernel from the `S` on, so its first packet is NATed without userspace;
- relayed:   the second packet of the queued call (conntrack fast path), for scale.

    .venv/bin/python bench/first_packet.py [--calls 300]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import sys
import time
from pathlib import Path

from lrkp_lab.lab import INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.parties import Party
from lrkp_tsl.media import Endpoint

CONTROL = (str(INTERNAL_IP), 22333)


def one_way(sender: Party, to: Endpoint, receiver: Party) -> float:
    started = time.perf_counter()
    sender.send(to, b"x" * 172)
    ready, _, _ = select.select([receiver.sock], [], [], 2.0)
    if not ready:
        raise RuntimeError(f"{sender.endpoint} -> {to}: not delivered")
    receiver.sock.recv(2048)
    return time.perf_counter() - started


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results/first_packet.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {"queued": [], "committed": [], "relayed": []}
    with Lab() as lab:
        node = Node(lab, "relay", "--internal-ip", str(INTERNAL_IP), "--ports", "20000-21999",
                    "--control", f"udp:{CONTROL[0]}:{CONTROL[1]}", "--allow", "10.201.1.5",
                    "--flush-on-exit", "--log-level", "warning")  # fmt: skip
        control = Controller(lab, "sip", "10.201.1.5")
        try:
            node.wait_ready(CONTROL, control)
            for index in range(args.calls):
                port = 20000 + 8 * (index % 240)
                parties = {
                    "c": Party(lab, "c", 4000 + 2 * index),
                    "a": Party(lab, "a", 4000 + 2 * index),
                    "b1": Party(lab, "b", 6000 + 4 * index),
                    "b2": Party(lab, "b", 6002 + 4 * index),
                }
                for caller, callee, relay_port in (("c", "b1", port), ("a", "b2", port + 4)):
                    body = set_command(
                        "S", str(parties[caller].endpoint.ip), str(INTERNAL_IP),
                        str(INTERNAL_IP), str(parties[callee].endpoint.ip),
                        parties[caller].endpoint.port, relay_port, relay_port + 2,
                        parties[callee].endpoint.port, f"bench-{caller}-{index}@lrkp",
                    )  # fmt: skip
                    if control.command(body, CONTROL) != body + b"OK":
                        raise RuntimeError(f"S refused:\n{node.output()[-2000:]}")
                relay_c = Endpoint(INTERNAL_IP, port + 2)
                relay_a = Endpoint(INTERNAL_IP, port + 6)
                times["queued"].append(one_way(parties["c"], relay_c, parties["b1"]))
                times["committed"].append(one_way(parties["a"], relay_a, parties["b2"]))
                times["relayed"].append(one_way(parties["c"], relay_c, parties["b1"]))
                for party in parties.values():
                    party.close()
        finally:
            control.close()
            node.stop()
    rows = {name: summary(values) for name, values in times.items()}
    for name, row in rows.items():
        print(f"{name:>9}: p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms")
    ratio = rows["queued"]["p50_ms"] / rows["committed"]["p50_ms"]
    print(f"queued / committed first packet, p50: {ratio:.1f}x ({args.calls} calls)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"calls": args.calls, **rows, "ratio_p50": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
