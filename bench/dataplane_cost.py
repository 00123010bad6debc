"""Kernel CPU per relayed packet, by ruleset: plain routing, bare NAT maps + conntrack, and
lrkp-tsl's table (the committed lrkp_tsl/rules/lrkp.nft, and any other file given).

Why this method: on a shared machine, relay-core CPU read from a soaker or /proc/stat moves
with whatever else runs. Here every packet crosses the whole path (the sender's stack, the
lab's bridges, the relay's prerouting hooks, conntrack, NAT, forwarding, the sink's drop rule)
inside the sending thread's own system call: veth delivers to the next namespace's backlog,
which is processed in softirq as the sender re-enables bottom halves, and this kernel (no
IRQ_TIME_ACCOUNTING) charges that softirq to the thread it ran in. So the sender's system
time per packet (getrusage) is the path's cost, measured per thread, mostly immune to other
processes; the rulesets differ only in what the relay namespace runs. Rounds alternate
between rulesets, so slow drifts hit all of them alike.

    caller a 10.201.1.10 -- relay (int0 10.201.1.1 | ext0 10.201.2.1) -- callee x 10.201.2.10

    .venv/bin/python bench/dataplane_cost.py [--streams 1000] [--packets 200000] [--rounds 5]
        [--rules NAME=PATH ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_tsl.defaults import DEFAULT_RULES

REPO = Path(__file__).resolve().parents[1]
A_IP, X_IP = "10.201.1.10", "10.201.2.10"
A_PORT, RELAY_PORT, X_PORT, OUT_PORT = 40000, 20000, 30000, 24000
PAYLOAD = b"\x80" * 144  # 172-byte IPv4 packets, like 20 ms of G.711
SINK = f"""
table ip sink {{
    counter got {{ }}
    chain in {{
        type filter hook prerouting priority -400; policy accept;
        udp dport {X_PORT}-{X_PORT + 9999} counter name got drop
    }}
}}
"""


def bare_rules(path: Path) -> str:
    """The same maps and NAT chains as the node's table, nothing else: bare NAT."""
    text = path.read_text()
    for chain in ("guard", "relay_port", "to_queue", "unmark"):
        text = re.sub(rf"\n\tchain {chain} \{{.*?\n\t\}}\n", "\n", text, flags=re.S)
    return text


def load(lab: Lab, name: str, rules: str | None, streams: int) -> None:
    lab.run("relay", "nft", "delete table ip lrkp", check=False)
    lab.run("relay", "conntrack", "-F", check=False)
    if rules is None:
        return
    elements = []
    for i in range(streams):
        key = f"{A_IP} . {A_PORT + i} . {INTERNAL_IP} . {RELAY_PORT + i}"
        elements.append((key, f"{X_IP} . {X_PORT + i}", f"{EXTERNAL_IP} . {OUT_PORT + i}"))
    script = [rules]
    for start in range(0, streams, 500):
        chunk = elements[start : start + 500]
        script.append(
            "add element ip lrkp dnat_to { " + ", ".join(f"{k} : {d}" for k, d, _ in chunk) + " }"
        )
        script.append(
            "add element ip lrkp snat_to { " + ", ".join(f"{k} : {s}" for k, _, s in chunk) + " }"
        )
    if "relay_addrs" in rules:
        script.append(f"add element ip lrkp relay_addrs {{ {INTERNAL_IP}, {EXTERNAL_IP} }}")
        script.append("add element ip lrkp relay_ports { 20000-29999 }")
    path = Path(f"/tmp/lrkp-dpcost-{os.getpid()}-{name}.nft")
    path.write_text("\n".join(script) + "\n")
    try:
        lab.run("relay", "nft", "-f", str(path))
    finally:
        path.unlink()


def delivered(lab: Lab) -> int:
    out = lab.run("x", "nft", "list counter ip sink got").stdout
    return int(re.search(r"packets (\d+)", out).group(1))  # type: ignore[union-attr]


def send_round(
    socks: list[socket.socket], targets: list[tuple[str, int]], packets: int
) -> tuple[float, float]:
    """`packets` datagrams round-robin over the streams: (system s, wall s)."""
    count = len(socks)
    before = resource.getrusage(resource.RUSAGE_THREAD)
    started = time.perf_counter()
    for n in range(packets):
        i = n % count
        socks[i].sendto(PAYLOAD, targets[i])
        if n % 64 == 63:
            time.sleep(0)  # never outrun the backlog (each send is processed inline anyway)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return after.ru_stime - before.ru_stime, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--packets", type=int, default=200000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=1)
    parser.add_argument("--rules", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/dataplane_cost.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    os.sched_setaffinity(0, {args.cpu})
    node_rules = DEFAULT_RULES
    variants: dict[str, str | None] = {"route": None, "bare_nat": bare_rules(node_rules)}
    variants["lrkp"] = node_rules.read_text()
    for item in args.rules:
        name, _, path = item.partition("=")
        variants[name] = Path(path).read_text()
    results: dict[str, list[float]] = {name: [] for name in variants}
    with Lab() as lab:
        lab.run("relay", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.run("relay", "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", check=False)
        lab.run("a", "ip", "route", "add", "10.201.2.0/24", "via", str(INTERNAL_IP))
        lab.run("x", "ip", "route", "add", "10.201.1.0/24", "via", str(EXTERNAL_IP))
        lab.run("x", "nft", SINK)
        socks = [lab.udp_socket("a", A_IP, A_PORT + i) for i in range(args.streams)]
        try:
            for round_ in range(args.rounds):
                for name, rules in variants.items():
                    load(lab, name, rules, args.streams)
                    if rules is None:
                        targets = [(X_IP, X_PORT + i) for i in range(args.streams)]
                    else:
                        targets = [(str(INTERNAL_IP), RELAY_PORT + i) for i in range(args.streams)]
                    send_round(socks, targets, args.streams * 3)  # conntrack entries, caches
                    got = delivered(lab)
                    system, wall = send_round(socks, targets, args.packets)
                    arrived = delivered(lab) - got
                    if arrived < args.packets * 0.999:
                        print(f"{name}: only {arrived} of {args.packets} arrived", file=sys.stderr)
                    per = 1e6 * system / args.packets
                    results[name].append(per)
                    print(json.dumps({"round": round_, "variant": name, "sys_us_per_packet": per,
                                      "wall_us_per_packet": 1e6 * wall / args.packets,
                                      "delivered": arrived}), flush=True)  # fmt: skip
        finally:
            for sock in socks:
                sock.close()
    base = statistics.median(results["bare_nat"])
    summary = {
        name: {
            "sys_us_per_packet_median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "vs_bare_nat": statistics.median(values) / base,
        }
        for name, values in results.items()
    }
    for name, row in summary.items():
        median, low, high = row["sys_us_per_packet_median"], row["min"], row["max"]
        ratio = row["vs_bare_nat"]
        print(f"{name:>14}: {median:.2f} µs/packet (min {low:.2f}, max {high:.2f}), "
              f"x{ratio:.2f} bare NAT")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
