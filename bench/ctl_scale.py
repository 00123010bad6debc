"""`lrkp-ctl` against a node with many live calls: how long the commands take, and how long
a `P` waits meanwhile (does a listing stall the event loop?).

The lab, the fill and the media are bench/event_loop.py's: CALLS live calls, each with a
conntrack entry. Then, for --duration seconds, a client sends `P` every 10 ms from the
relay's own namespace (as in event_loop.py), first alone (baseline), then while lrkp-ctl
runs `sessions --json`, `ruleset --json`, `stats` and `show` back to back in the relay
namespace. Reported: each command's wall time and output size, and the `P` round trips of
both windows (p50, p99, max, over 50 ms).

    PYTHONPATH=. .venv/bin/python bench/ctl_scale.py [--calls 50000] [--duration 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from event_loop import (
    B_DROP,
    CONTROL,
    Media,
    MediaPlan,
    Pings,
    fill,
    node_args,
    ping_loop,
    prepare_lab,
    summarise,
    wait_for_entries,
)

from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, Node

CTL = (sys.executable, "-m", "lrkp_tsl.ctl")
KEEP = ("pings", "timeouts", "p50_ms", "p99_ms", "max_ms", "over_50ms", "over_200ms")


def timed(lab: Lab, *args: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = subprocess.run(
        ["ip", "netns", "exec", lab.ns("relay"), *CTL, *args, "--timeout", "300"],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"lrkp-ctl {' '.join(args)}: {result.stderr.strip()}")
    return {
        "command": " ".join(args),
        "seconds": round(seconds, 2),
        "lines": result.stdout.count("\n"),
        "bytes": len(result.stdout),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--duration", type=float, default=20.0, help="baseline window, s")
    parser.add_argument("--period", type=float, default=15.0, help="seconds between packets")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    with Lab() as lab:
        prepare_lab(lab)
        subprocess.run(["ip", "netns", "exec", lab.ns("b"), "nft", "-f", "-"],
                       input=B_DROP, text=True, check=True)  # fmt: skip
        node = Node(lab, "relay", *node_args("warning", flush_on_exit=True))
        client = Controller(lab, "relay", CONTROL[0])
        media: Media | None = None
        try:
            node.wait_ready(CONTROL, client)
            media = Media(lab, MediaPlan(args.calls, args.period, (0,), 50.0))
            filled = fill(client, range(args.calls), "ctl", 64, on_ok=media.send)
            entries = wait_for_entries(lab, args.calls, args.period + 10)
            print(f"bench: {filled.calls:,} calls in {filled.seconds:.1f} s, {entries:,} entries")
            time.sleep(3)
            baseline = summarise(ping_loop(client, args.duration, 0.010, 5.0, node))
            runs = []
            for command in (
                ("sessions", "--json"),
                ("sessions", "--json"),
                ("sessions", "--json"),
                ("ruleset", "--json"),
                ("stats",),
                ("show", "bench-0@ctl"),
                ("kernel",),
                ("sessions",),
            ):
                pings: list[Pings] = []
                stop = threading.Event()

                def probe(pings: list[Pings] = pings, stop: threading.Event = stop) -> None:
                    while not stop.is_set():
                        pings.append(ping_loop(client, 0.5, 0.010, 5.0, node))

                prober = threading.Thread(target=probe, daemon=True)
                prober.start()
                try:
                    run = timed(lab, *command)
                finally:
                    stop.set()
                    prober.join()
                merged = Pings(
                    rtt=[r for p in pings for r in p.rtt], at=[a for p in pings for a in p.at]
                )
                merged.timeouts = sum(p.timeouts for p in pings)
                during = summarise(merged)
                run["p_during"] = {k: during.get(k) for k in KEEP}
                runs.append(run)
        finally:
            if media is not None:
                media.stop()
            client.close()
            node.stop(timeout=120)
    row = {
        "calls": args.calls,
        "p_baseline": {k: baseline.get(k) for k in KEEP},
        "commands": runs,
    }
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
