"""Control path under several clients: `S`+`D` pairs per second with 1..N concurrent
clients, and the `S` round trip with one, at given numbers of live calls.

Kamailio sends lrkproxy commands from several worker processes at once; each client here
is one such worker: its own socket, a closed loop of `S` then `D` on calls of its own. The
node is filled to each size first (pipelined, not measured). Runs as root in a lab, the
real daemon in the relay namespace, controlled over loopback.

    .venv/bin/python bench/control_clients.py [--sizes 1000,10000,24000] [--clients 1,4]
        [--pair]

--pair: the node runs in pair mode, active (lrkp_lab.pairnodes.lone_active: its Redis on
relay, the peer's on relay2; no standby node): what replication costs the active's host,
against the same run without it. The peer's Redis replicates it only with --replica: in a
real pair it runs on the other host, here it would take this VM's CPU from the node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import statistics
import sys
import threading
import time
from pathlib import Path

from lrkp_lab import load
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.pairnodes import lone_active

CONTROL = ("127.0.0.1", 22333)
PORTS = (1024, 65535)
CALLS_PER_IP = (PORTS[1] - PORTS[0] + 1) // 4
FILL_WINDOW = 64
# Call indices: the node is filled from 0 up; each client cycles through SPAN calls of its
# own at the top of the range (at most MAX_CLIENTS clients), so both never meet.
MAX_CALLS = 2 * CALLS_PER_IP
SPAN = 1000
MAX_CLIENTS = 8
MAX_FILL = MAX_CALLS - SPAN * MAX_CLIENTS


def s_body(index: int, verb: str = "S") -> bytes:
    relay_ip = (INTERNAL_IP, EXTERNAL_IP)[index // CALLS_PER_IP]
    port = PORTS[0] + 4 * (index % CALLS_PER_IP)
    return set_command(verb, "10.201.1.10", str(relay_ip), str(relay_ip), "10.201.1.11",
                       2000 + 2 * (index % 30000), port, port + 2, 2000 + 2 * (index % 30000),
                       f"bench-{index}@clients")  # fmt: skip


def exchange(client: Controller, body: bytes) -> float:
    started = time.perf_counter()
    reply = client.command(body, CONTROL, wait=5.0)
    elapsed = time.perf_counter() - started
    if reply != body + b"OK":
        raise RuntimeError(f"unexpected reply {reply!r} to {body!r}")
    return elapsed


def fill(client: Controller, first: int, last: int) -> None:
    """Set up calls first..last-1, FILL_WINDOW commands in flight."""
    load.fill(client.sock, CONTROL, (s_body(index) for index in range(first, last)), FILL_WINDOW)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (the node's own cost, whatever the noise
    of other processes on the machine does to wall-clock rates)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_base(n: int) -> int:
    return MAX_CALLS - SPAN * (n + 1)


def pairs(lab: Lab, clients: int, seconds: float, pid: int) -> tuple[float, list[float], float]:
    """`clients` closed loops of S then D for `seconds`: pairs/s, every S round trip, and
    the node's CPU time per pair (µs)."""
    controllers = [Controller(lab, "relay", "127.0.0.1") for _ in range(clients)]
    counts = [0] * clients
    rtts: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop = time.perf_counter() + seconds + 0.5

    def loop(n: int) -> None:
        client = controllers[n]
        base = client_base(n)
        start.wait()
        while time.perf_counter() < stop:
            index = base + counts[n] % SPAN
            rtts[n].append(exchange(client, s_body(index)))
            exchange(client, s_body(index, "D"))
            counts[n] += 1

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(0.5)  # warm-up, not counted
    warm = sum(counts)
    mid = time.perf_counter()
    cpu = cpu_seconds(pid)
    for thread in threads:
        thread.join()
    total = sum(counts) - warm
    cpu = cpu_seconds(pid) - cpu
    del began
    for client in controllers:
        client.close()
    rate = total / (time.perf_counter() - mid)
    return rate, [r for per in rtts for r in per], 1e6 * cpu / max(1, total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/control_clients.json"))
    parser.add_argument("--pair", action="store_true", help="the node in pair mode, active")
    parser.add_argument(
        "--replica",
        action="store_true",
        help="--pair: also a replica Redis (in this one VM, its CPU competes with the node's)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    sizes = sorted(int(s) for s in args.sizes.split(","))
    client_counts = [int(c) for c in args.clients.split(",")]
    if max(sizes) > MAX_FILL or max(client_counts) > MAX_CLIENTS:
        print(f"bench: at most {MAX_FILL} live calls and {MAX_CLIENTS} clients (two relay "
              "IPs, 4 ports per call)", file=sys.stderr)  # fmt: skip
        return 1
    rows = []
    with Lab() as lab, contextlib.ExitStack() as stack:
        if args.pair:
            node, _redis = stack.enter_context(
                lone_active(lab, "--log-level", "warning", replica=args.replica)
            )
        else:
            node = Node(lab, "relay", "--internal-ip", str(INTERNAL_IP), "--external-ip",
                        str(EXTERNAL_IP), "--ports", f"{PORTS[0]}-{PORTS[1]}", "--control",
                        f"udp:{CONTROL[0]}:{CONTROL[1]}", "--flush-on-exit",
                        "--log-level", "warning")  # fmt: skip
            stack.callback(node.stop)
        client = Controller(lab, "relay", "127.0.0.1")
        try:
            node.wait_ready(CONTROL, client)
            live = 0
            base = client_base(0)
            for size in sizes:
                fill(client, live, size)
                live = size
                while select.select([client.sock], [], [], 0.2)[0]:
                    client.sock.recv(4096)
                rtt = []
                for i in range(args.sample):
                    rtt.append(exchange(client, s_body(base + i % SPAN)))
                    exchange(client, s_body(base + i % SPAN, "D"))
                ordered = sorted(rtt)
                row: dict[str, float] = {
                    "live": size,
                    "s_rtt_p50_ms": 1000 * statistics.median(ordered),
                    "s_rtt_p99_ms": 1000 * ordered[int(0.99 * len(ordered))],
                }
                for count in client_counts:
                    rate, _, cpu = pairs(lab, count, args.seconds, node.proc.pid)
                    row[f"pairs_per_s_{count}_clients"] = rate
                    row[f"node_cpu_us_per_pair_{count}_clients"] = cpu
                row["pair"] = args.pair
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            client.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
