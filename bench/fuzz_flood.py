"""A million hostile datagrams at the control port while a live call streams.

Runs as root in a lab: the real daemon in the relay namespace, a call between a NAT'd
caller and a reachable callee streaming 50 packets/s each way, and one controller on the
allow list sending random datagrams (random bytes, mutated lrkproxy commands, oversized
datagrams) as fast as it can. None names the live call's Call-ID or ports. Reports the
daemon's RSS before and after, the log lines written, how many datagrams the node
handled per second (from its own counters), and the live call's loss (expected 0).

    .venv/bin/python bench/fuzz_flood.py [--count 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

from lrkp_lab.calls import CONTROL, Call, Stream, burst
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node
from lrkp_lab.parties import Peers
from lrkp_lab.processes import rss_kib

LIVE_ID = "live@fuzz"
LIVE_PORTS = {b"19999", b"20000", b"20001", b"20002", b"20003"}
FIELDS = [b"10.201.1.1", b"10.201.2.1", b"10.201.1.10", b"8.8.8.8", b"224.0.0.1", b"0.0.0.0",
          b"300.1.1.1", b"", b"60", b"-1", b"65535", b"20400", b"21996", b"x" * 40,
          b"abc@h", b"\xff\xfe", b"1_1"]  # fmt: skip


def datagrams(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        cookie = rng.choice(
            [b"1_1", b"-77_3", b"%d_%d" % (rng.randrange(1 << 31), rng.randrange(1 << 31))]
        )
        verb = rng.choice([b"S", b"D", b"G", b"P", b"X"])
        fields = [rng.choice(FIELDS) if rng.random() < 0.7 else b"%d" % rng.randrange(70000)
                  for _ in range(rng.randrange(13))]  # fmt: skip
        data = cookie + b" " + verb + b" " + b" ".join(fields) + b" "
    elif kind < 0.95:
        data = rng.randbytes(rng.randrange(1, 300))
    else:
        data = rng.randbytes(rng.randrange(1025, 4000))
    if LIVE_ID.encode() in data or LIVE_PORTS & set(data.split(b" ")):
        return b"1_1 P"
    return data


def counters(log: str) -> dict[str, int]:
    found = re.search(r"counters: (.*)", log)
    if not found:
        return {}
    return {k: int(v) for k, v in (item.split("=") for item in found.group(1).split(", "))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuzz_flood.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    rng = random.Random(args.seed)
    with Lab() as lab, Peers(lab) as peers:
        node = Node(lab, "relay", "--internal-ip", str(INTERNAL_IP), "--external-ip",
                    str(EXTERNAL_IP), "--ports", "20000-21999", "--control",
                    f"udp:{CONTROL[0]}:{CONTROL[1]}", "--allow", "10.201.1.5",
                    "--flush-on-exit", "--log-level", "info")  # fmt: skip
        client = Controller(lab, "sip", "10.201.1.5")
        try:
            node.wait_ready(CONTROL, client)
            caller, callee = peers("c", 4000), peers("b", 6000)
            call = Call(client, caller, callee, 20000, LIVE_ID)
            burst(caller, call.caller_relay, callee, call.callee_relay, 1, b"hello")
            streams = [Stream(caller, call.caller_relay, callee, b"A").start(),
                       Stream(callee, call.callee_relay, caller, b"B").start()]  # fmt: skip
            time.sleep(0.5)
            rss_before = rss_kib(node.proc.pid)
            lines_before = node.output().count("\n")
            started = time.perf_counter()
            for index in range(args.count):
                client.send(datagrams(rng), CONTROL)
                if index % 256 == 255:
                    while client.receive(0) is not None:
                        pass
            # The node drains what is queued; a P answered means it has caught up.
            while client.command(b"P", CONTROL, wait=1.0) is None:
                pass
            elapsed = time.perf_counter() - started
            rss_after = rss_kib(node.proc.pid)
            time.sleep(0.5)
            for stream in streams:
                stream.stop()
            node.stop(signal.SIGTERM)
            log = node.output()
            stats = counters(log)
            handled = sum(v for k, v in stats.items() if k.startswith(("request.", "error.",
                          "refused.", "dropped.", "retransmissions")))  # fmt: skip
            row = {
                "sent": args.count,
                "handled": handled,
                "seconds": elapsed,
                "handled_per_s": handled / elapsed,
                "rss_before_kib": rss_before,
                "rss_after_kib": rss_after,
                "log_lines": log.count("\n") - lines_before,
                "live_call_lost": [len(s.lost()) for s in streams],
                "live_call_sent": [len(s.sent) for s in streams],
                "foreign": [len(s.foreign) for s in streams],
                "counters": stats,
            }
        finally:
            client.close()
            node.stop()
    print(
        f"{row['sent']:,} datagrams sent, {row['handled']:,} handled in {row['seconds']:.1f} s "
        f"({row['handled_per_s']:,.0f}/s); RSS {row['rss_before_kib']:,} -> "
        f"{row['rss_after_kib']:,} KiB; {row['log_lines']} log lines; live call lost "
        f"{row['live_call_lost']} of {row['live_call_sent']} packets, foreign {row['foreign']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))
    return 0 if row["live_call_lost"] == [0, 0] and row["foreign"] == [0, 0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
