"""Conntrack entries per call, and the kernel memory a call costs, with the real daemon.

Runs as root: builds a lab, starts `lrkp-tsl run` in the relay namespace, and for each
scenario sets up N calls with `S` and sends media as the scenario says (every packet is
checked to arrive), then counts the conntrack entries of the relay namespace
(`nf_conntrack_count`: all of them, which is what the kernel holds against
`nf_conntrack_max`). Scenarios:
- rtp+rtcp:   both parties send RTP and RTCP (reachable parties, flows committed at `S`);
- rtp:        both send RTP only (a phone with RTCP off);
- nat:        the caller behind the lab's port-remapping NAT (learned from its first
              packet through the queue), RTP and RTCP both ways;
- one-way:    only the caller sends, RTP and RTCP (the callee is on hold);
- set-only:   `S` and no media at all.
Then `--memory-calls` more calls of the first kind, with the kernel's slab caches
(/proc/slabinfo: active objects x object size, per cache) read before their `S`, after it
(the map elements), and after their media (the conntrack entries). Slab caches are the
host's: other work on the machine allocates from them too, so only the caches that grew by
at least one object per 5 calls are counted, and a run is worth repeating.

    .venv/bin/python bench/conntrack_per_call.py [--calls 500] [--memory-calls 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lrkp_lab.lab import INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.parties import Party
from lrkp_tsl.media import Endpoint

CONTROL = (str(INTERNAL_IP), 22333)
KAMAILIO = "10.201.1.5"
SCENARIOS = {  # name: (caller host, caller sends, callee sends)
    "rtp+rtcp": ("a", ("rtp", "rtcp"), ("rtp", "rtcp")),
    "rtp": ("a", ("rtp",), ("rtp",)),
    "nat": ("c", ("rtp", "rtcp"), ("rtp", "rtcp")),
    "one-way": ("a", ("rtp", "rtcp"), ()),
    "set-only": ("a", (), ()),
}


def count(lab: Lab) -> int:
    return int(lab.run("relay", "cat", "/proc/sys/net/netfilter/nf_conntrack_count").stdout)


def slabs() -> dict[str, tuple[int, int]]:
    """cache -> (active objects, object size)."""
    found = {}
    for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
        fields = line.split()
        found[fields[0]] = (int(fields[1]), int(fields[3]))
    return found


def growth(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
           calls: int) -> dict[str, float]:  # fmt: skip
    """Bytes per call of each cache that grew by at least one object per 5 calls."""
    grown = {}
    for name, (objects, size) in after.items():
        added = objects - before.get(name, (0, size))[0]
        if added >= calls / 5:
            grown[name] = added * size / calls
    return grown


class Calls:
    """Calls set up one after another on fresh relay ports; media sent on one call at a
    time (its parties' sockets are closed after it: conntrack keeps the entries)."""

    def __init__(self, lab: Lab, control: Controller, call_id_length: int) -> None:
        self.lab = lab
        self.control = control
        self.call_id_length = call_id_length
        self.next_port = 23000
        self.made = 0

    def set_up(self, caller_host: str, n: int) -> list[int]:
        ports = []
        for _ in range(n):
            port = self.next_port
            self.next_port += 4
            self.made += 1
            caller_ip = "10.201.3.10" if caller_host == "c" else "10.201.1.10"
            body = set_command(
                "S", caller_ip, str(INTERNAL_IP), str(INTERNAL_IP), "10.201.1.11",
                4000, port, port + 2, 6000,
                f"ct-{self.made}@bench.example.org".rjust(self.call_id_length, "0"),
            )  # fmt: skip
            if self.control.command(body, CONTROL) != body + b"OK":
                raise RuntimeError(f"S refused for port {port}")
            ports.append(port)
        return ports

    def media(self, caller_host: str, port: int, caller_sends: tuple[str, ...],
              callee_sends: tuple[str, ...]) -> None:  # fmt: skip
        for offset, stream in ((0, "rtp"), (1, "rtcp")):
            caller = Party(self.lab, caller_host, 4000 + offset)
            callee = Party(self.lab, "b", 6000 + offset)
            try:
                to_callee = Endpoint(INTERNAL_IP, port + 2 + offset)  # where the caller sends
                to_caller = Endpoint(INTERNAL_IP, port + offset)  # where the callee sends
                if stream in caller_sends:
                    caller.send(to_callee, b"c")
                    callee.expect(b"c")
                if stream in callee_sends:
                    callee.send(to_caller, b"b")
                    caller.expect(b"b")
            finally:
                caller.close()
                callee.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per scenario")
    parser.add_argument("--memory-calls", type=int, default=7000)
    parser.add_argument(
        "--call-id-length", type=int, default=40,
        help="Call-IDs this long (each map element carries it as its comment)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/conntrack_per_call.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    needed = 4 * (len(SCENARIOS) * args.calls + args.memory_calls)
    if needed > 42000:
        print(f"bench: {needed} relay ports needed, the range has 42000", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"calls_per_scenario": args.calls, "entries_per_call": {}}
    with Lab() as lab:
        node = Node(
            lab, "relay", "--internal-ip", str(INTERNAL_IP), "--ports", "23000-64999",
            "--control", f"udp:{CONTROL[0]}:{CONTROL[1]}", "--allow", KAMAILIO,
            "--idle-timeout", "3600", "--flush-on-exit", "--log-level", "warning",
        )  # fmt: skip
        control = Controller(lab, "sip", KAMAILIO)
        try:
            node.wait_ready(CONTROL, control)
            calls = Calls(lab, control, args.call_id_length)
            for name, (caller, caller_sends, callee_sends) in SCENARIOS.items():
                before = count(lab)
                for port in calls.set_up(caller, args.calls):
                    calls.media(caller, port, caller_sends, callee_sends)
                per_call = (count(lab) - before) / args.calls
                results["entries_per_call"][name] = per_call
                print(f"{name:>9}: {per_call:.3f} conntrack entries per call")
            if args.memory_calls:
                n = args.memory_calls
                at_start = slabs()
                ports = calls.set_up("a", n)
                time.sleep(1.0)
                after_set = slabs()
                entries = count(lab)
                for port in ports:
                    calls.media("a", port, ("rtp", "rtcp"), ("rtp", "rtcp"))
                time.sleep(1.0)
                after_media = slabs()
                elements = growth(at_start, after_set, n)
                streams = growth(after_set, after_media, n)
                memory = {
                    "calls": n,
                    "entries_added": count(lab) - entries,
                    "bytes_per_call_elements": elements,
                    "bytes_per_call_entries": streams,
                    "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                }
                results["memory"] = memory
                for what, grown in (("S (map elements)", elements), ("media (conntrack)", streams)):
                    caches = ", ".join(f"{k} {v:.0f}" for k, v in sorted(grown.items()))
                    print(f"{what}: {sum(grown.values()):.0f} bytes per call ({caches})")
                print(f"{n} calls, {memory['entries_added'] / n:.2f} entries per call, "
                      f"load {' '.join(memory['loadavg'])}")  # fmt: skip
        finally:
            control.close()
            node.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
