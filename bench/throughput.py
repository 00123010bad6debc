"""Relay throughput: the node's kernel path against plain kernel routing, same run.

Runs as root in a lab. The real daemon (`lrkp-tsl run`) relays one call between `x`
(external) and `a` (internal); `x` blasts COUNT packets of 172 bytes (G.711 RTP) at:
- routed:  `a` directly, routed through the relay namespace (no NAT): the physical limit;
- relayed: `x`'s relay endpoint of the call: guard chain, maps, conntrack NAT.
Runs alternate, REPEAT times each; delivered packets per second and loss are reported,
and the ratio of the medians. A single Python sender is the bottleneck on this machine, so
a ratio near 1 means the relay costs no more than routing up to what one core can offer.

    .venv/bin/python bench/throughput.py [--count 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command

ROLES = str(Path(__file__).with_name("udp_roles.py"))
CONTROL = (str(INTERNAL_IP), 22333)


def run_once(lab: Lab, dst: tuple[str, int], count: int) -> dict[str, float]:
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("a"), sys.executable, ROLES, "recv", "10.201.1.10",
         "7000", "60", "1.0"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.3)
    sent = json.loads(
        lab.run(
            "x",
            sys.executable,
            ROLES,
            "send",
            "10.201.2.10",
            "7100",
            dst[0],
            str(dst[1]),
            str(count),
            "172",
        ).stdout
    )
    out, _ = receiver.communicate(timeout=90)
    got = json.loads(out)
    return {
        "offered_pps": sent["pps"],
        "delivered_pps": got["pps"],
        "loss": 1 - got["received"] / count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    results: dict[str, list[dict[str, float]]] = {"routed": [], "relayed": []}
    with Lab() as lab:
        lab.run("x", "ip", "route", "add", "10.201.1.0/24", "via", str(EXTERNAL_IP))
        lab.run("a", "ip", "route", "add", "10.201.2.0/24", "via", str(INTERNAL_IP))
        node = Node(lab, "relay", "--internal-ip", str(INTERNAL_IP), "--external-ip",
                    str(EXTERNAL_IP), "--ports", "20000-21999", "--control",
                    f"udp:{CONTROL[0]}:{CONTROL[1]}", "--allow", "10.201.1.5",
                    "--flush-on-exit", "--log-level", "warning")  # fmt: skip
        control = Controller(lab, "sip", "10.201.1.5")
        try:
            node.wait_ready(CONTROL, control)
            body = set_command(
                "S",
                "10.201.2.10",
                str(INTERNAL_IP),
                str(EXTERNAL_IP),
                "10.201.1.10",
                7100,
                20000,
                20002,
                7000,
                "bench-throughput",
            )
            assert control.command(body, CONTROL) == body + b"OK"
            for _ in range(args.repeat):
                results["routed"].append(run_once(lab, ("10.201.1.10", 7000), args.count))
                results["relayed"].append(run_once(lab, (str(EXTERNAL_IP), 20002), args.count))
        finally:
            control.close()
            node.stop()
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r["delivered_pps"] for r in runs)
        loss = max(r["loss"] for r in runs)
        offered = statistics.median(r["offered_pps"] for r in runs)
        print(
            f"{name:>8}: delivered {medians[name]:,.0f} pps (median of {len(runs)}), "
            f"offered {offered:,.0f} pps, worst loss {loss:.2%}"
        )
    ratio = medians["relayed"] / medians["routed"]
    print(f"relayed / routed delivered pps: {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
