"""The side-by-side benchmark's lab: three namespaces, the relay's addresses, the counters.

    caller A (generator) -- relay R (one core) -- callee B (sink, echo)

Addresses, ports and the CPU split every other part of bench/sidebyside.py shares.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "bench"
sys.path.insert(0, str(REPO))

from lrkp_lab.lab import PREFIX, delete_namespace, sweep  # noqa: E402

RELAY_IP, RELAY_IP2, A_IP, B_IP = "10.98.0.1", "10.98.0.2", "10.98.1.2", "10.98.2.2"
NAT_SDP_IP = "192.168.77.2"  # a private address the relay cannot reach: the caller is NAT'd
A_PORT, B_PORT = 40000, 30000
GEN_CPU = int(os.environ.get("GEN_CPU", "0"))
RELAY_CPU = int(os.environ.get("RELAY_CPU", "1"))

# Delivered = what the relay transmitted towards B: counted at R's egress on r2 (a netdev hook,
# the same small cost on the relay core for every contender). Counting at B instead would count
# drops in the generator core's backlog queue (B's receive processing shares that core with the
# generator): at 100-200 kpps on a busy machine those, not the relay, were the loss.
SINK_NFT = """table netdev bench_sink {
  counter rx { }
  set flows { type inet_service; flags dynamic; size 65535; }
  chain out { type filter hook egress device "r2" priority -500; policy accept;
    ip daddr %s udp dport 30000-39999 %s counter name "rx"
  }
}
"""
# B drops the load before its IP layer: cheap, and no ICMP port unreachable back to the relay.
B_DROP_NFT = """table netdev bench_drop {
  chain in { type filter hook ingress device "b0" priority -500; policy accept;
    ip daddr %s udp dport 30000-39999 drop
  }
}
"""
RDROP_NFT = """table ip bench_rdrop {
  chain pre { type filter hook prerouting priority -300; policy accept;
    udp dport 20000-39999 drop
  }
}
"""


def sh(argv: list[str], check: bool = True, stdin: str | None = None, timeout: float = 600) -> str:
    r = subprocess.run(argv, input=stdin, text=True, capture_output=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(argv)} -> {r.returncode}: {r.stderr.strip()}")
    return r.stdout


class Topo:
    """Three namespaces named like lrkp_lab.lab's (swept if this process dies)."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.a, self.r, self.b = (f"{self.tag}-{h}" for h in ("ba", "br", "bb"))

    def x(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def up(self) -> None:
        sweep()
        for ns in (self.a, self.r, self.b):
            sh(["ip", "netns", "add", ns])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        stem = f"sb{os.getpid() % 100000}"
        for here, hns, hname, there, tname in (
            (f"{stem}a", self.a, "a0", f"{stem}r1", "r1"),
            (f"{stem}b", self.b, "b0", f"{stem}r2", "r2"),
        ):
            sh(
                [
                    "ip",
                    "link",
                    "add",
                    here,
                    "netns",
                    hns,
                    "type",
                    "veth",
                    "peer",
                    there,
                    "netns",
                    self.r,
                ]
            )
            sh(["ip", "-n", hns, "link", "set", here, "name", hname])
            sh(["ip", "-n", self.r, "link", "set", there, "name", tname])
        for ns, dev, addr in (
            (self.a, "a0", f"{A_IP}/24"),
            (self.b, "b0", f"{B_IP}/24"),
            (self.r, "r1", "10.98.1.1/24"),
            (self.r, "r2", "10.98.2.1/24"),
        ):
            sh(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
        for ip in (RELAY_IP, RELAY_IP2):
            sh(["ip", "-n", self.r, "addr", "add", f"{ip}/32", "dev", "lo"])
        sh(["ip", "-n", self.a, "route", "add", "default", "via", "10.98.1.1"])
        sh(["ip", "-n", self.b, "route", "add", "default", "via", "10.98.2.1"])
        sh(self.x(self.r, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        # RPS: R's receive processing on the relay core, A's and B's on the generator's.
        for ns, dev, cpu in (
            (self.a, "a0", GEN_CPU),
            (self.b, "b0", GEN_CPU),
            (self.r, "r1", RELAY_CPU),
            (self.r, "r2", RELAY_CPU),
        ):
            path = f"/sys/class/net/{dev}/queues/rx-0/rps_cpus"
            sh(self.x(ns, "sh", "-c", f"echo {1 << cpu:x} > {path}"))

    def down(self) -> None:
        for ns in (self.a, self.r, self.b):
            if Path("/run/netns", ns).exists():
                delete_namespace(ns)

    def nft(
        self, ns: str, script: str | None = None, args: list[str] | None = None, check: bool = True
    ) -> str:
        if script is not None:
            return sh(self.x(ns, "nft", "-f", "-"), check=check, stdin=script)
        return sh(self.x(ns, "nft", *(args or [])), check=check)

    def sink(self, per_flow: bool = False) -> None:
        """The delivered counter (and, for recovery, a set of the streams that got through)."""
        self.nft(self.r, args=["delete", "table", "netdev", "bench_sink"], check=False)
        self.nft(self.r, SINK_NFT % (B_IP, "add @flows { udp dport }" if per_flow else ""))

    def b_drop(self, on: bool) -> None:
        self.nft(self.b, args=["delete", "table", "netdev", "bench_drop"], check=False)
        if on:
            self.nft(self.b, B_DROP_NFT % B_IP)

    def sink_read(self) -> int:
        out = json.loads(
            self.nft(self.r, args=["-j", "reset", "counter", "netdev", "bench_sink", "rx"])
        )
        for o in out["nftables"]:
            if "counter" in o:
                return int(o["counter"]["packets"])
        raise RuntimeError("sink counter missing")

    def sink_flows(self) -> int:
        out = json.loads(
            self.nft(self.r, args=["-j", "list", "set", "netdev", "bench_sink", "flows"])
        )
        for o in out["nftables"]:
            if "set" in o:
                return len(o["set"].get("elem", []))
        return 0

    def conntrack_flush(self) -> None:
        sh(self.x(self.r, "conntrack", "-F"), check=False)
