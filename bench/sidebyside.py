"""Side by side: lrkp-tsl against Debian's rtpengine, bare nftables NAT and plain routing.

One lab, the same streams and offered load for every contender, one run; every figure also as
a ratio to plain routing and to rtpengine measured in the same run. Adapted from the reference
measurement made before the node existed (research/bench-reference: method in baseline.md).

    caller A (generator) -- relay R (one core) -- callee B (sink, echo)
    a0 10.98.1.2/24 ---veth--- r1 10.98.1.1/24 | r2 10.98.2.1/24 ---veth--- b0 10.98.2.2/24
                               relay addresses 10.98.0.1, 10.98.0.2 on lo, ip_forward=1

R's packet processing (RPS on r1, r2) and every relay process run on RELAY_CPU; the generator
and A's and B's packet processing on GEN_CPU: the relay "box" is one core. Contenders:
  route      A sends to B directly; R routes (no NAT, no conntrack): the limit
  nat        the kernel relay design by hand: nft maps for DNAT/SNAT + conntrack (natmap)
  lrkp       lrkp-tsl, calls set up with `S` over its control port; parties reachable
  lrkp_nat   the same with the caller's SDP address private: every stream latches via NFQUEUE
  rtpengine  Debian's rtpengine (userspace forwarding), calls set up with ng offer + answer
Traffic: rtpgen.c (compiled here): N streams of 172-byte RTP-shaped packets, AF_PACKET from A
for load (so it out-sends every contender: phase `gen` shows its rate), UDP sockets with an echo
at B for latency. Loss is counted at B's ingress in the kernel (a netdev drop rule).

Phases per contender, every window from a fresh contender (restarted, calls set up again,
conntrack flushed), then a warm-up that latches every stream:
  steps     rate ladder + bisection: the highest offered load relayed with < 0.1 % loss
  cpu       a SCHED_IDLE soaker on the relay core at a fixed load: relay-core CPU per packet
  rtt       round trip A -> relay -> B echo -> relay -> A at a low load: p50 / p99
  overload  2 x the contender's limit (or flat out), then at once 25 % of it with a per-stream
            counter at B: loss against the excess, and how many streams recover
and once: `gen` (the generator into a drop rule at R), `control` (lrkp-tsl `S`+`D` pairs/s and
`S` -> `OK` at 1k/10k/50k live calls, 1 and several clients, daemon RSS per call), `ngcps`
(rtpengine offer+answer+delete calls/s, 1 and several clients, RSS per call).

    make bench                                   # the full run (~20 min), as root
    .venv/bin/python bench/sidebyside.py --quick # ~5 min
    .venv/bin/python bench/sidebyside.py --tiny --out DIR   # the test suite's (seconds)

Writes DIR/sidebyside.{jsonl,json,md,png} (default bench/results; the JSONL of every window
goes to DIR/raw/). Other processes on the machine are measured during every window
(`foreign_cpu`, % of one core) and reported: numbers from a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "bench"
sys.path.insert(0, str(REPO))

from lrkp_tsl.lab import PREFIX, delete_namespace, sweep  # noqa: E402

RELAY_IP, RELAY_IP2, A_IP, B_IP = "10.98.0.1", "10.98.0.2", "10.98.1.2", "10.98.2.2"
NAT_SDP_IP = "192.168.77.2"  # a private address the relay cannot reach: the caller is NAT'd
A_PORT, B_PORT = 40000, 30000
GEN_CPU = int(os.environ.get("GEN_CPU", "0"))
RELAY_CPU = int(os.environ.get("RELAY_CPU", "1"))
USER_HZ = os.sysconf("SC_CLK_TCK")
LOSS_MAX = 0.001
NOISY = 25.0  # % of a core used by other processes: a window that failed is measured again
RATE_MIN_OK = 0.99
CONTENDERS = ("route", "nat", "lrkp", "lrkp_nat", "rtpengine")
LABELS = {
    "route": "plain routing",
    "nat": "bare nft NAT + conntrack",
    "lrkp": "lrkp-tsl",
    "lrkp_nat": "lrkp-tsl, NAT'd callers",
    "rtpengine": "rtpengine (userspace)",
}
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


@dataclass
class Profile:
    """How much to measure: --tiny (the test suite), --quick, or the full run."""

    flows: int
    ladder: list[int]
    bisect: int
    step_s: float
    cpu_pps: int
    cpu_s: float
    cpu_hi_pps: int
    rtt_pps: int
    rtt_s: float
    live: list[int]
    cps_pairs: int
    clients: int
    ng_calls: int
    ng_live: int
    warm_s: float = 0.5
    quiet_wait: float = 0.0
    retries: int = 0


PROFILES = {
    "tiny": Profile(
        flows=4,
        ladder=[400],
        bisect=0,
        step_s=0.5,
        cpu_pps=400,
        cpu_hi_pps=300,
        cpu_s=1.0,
        rtt_pps=200,
        rtt_s=1.0,
        live=[10, 20],
        cps_pairs=40,
        clients=2,
        ng_calls=20,
        ng_live=20,
    ),
    "quick": Profile(
        flows=1000,
        ladder=[20_000, 50_000, 100_000, 200_000, 400_000, 600_000],
        bisect=1,
        step_s=1.5,
        cpu_pps=50_000,
        cpu_hi_pps=300_000,
        cpu_s=3.0,
        rtt_pps=5_000,
        rtt_s=2.0,
        live=[1000, 10_000],
        cps_pairs=1000,
        clients=4,
        ng_calls=1000,
        ng_live=1000,
        quiet_wait=5.0,
        retries=1,
    ),
    "full": Profile(
        flows=1000,
        ladder=[
            20_000,
            40_000,
            60_000,
            80_000,
            100_000,
            150_000,
            200_000,
            300_000,
            400_000,
            500_000,
            600_000,
            800_000,
        ],
        bisect=3,
        step_s=3.0,
        cpu_pps=50_000,
        cpu_hi_pps=300_000,
        cpu_s=8.0,
        rtt_pps=5_000,
        rtt_s=5.0,
        live=[1000, 10_000, 50_000],
        cps_pairs=3000,
        clients=4,
        ng_calls=3000,
        ng_live=2000,
        quiet_wait=20.0,
        retries=2,
    ),
}


def sh(argv: list[str], check: bool = True, stdin: str | None = None, timeout: float = 600) -> str:
    r = subprocess.run(argv, input=stdin, text=True, capture_output=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(argv)} -> {r.returncode}: {r.stderr.strip()}")
    return r.stdout


# -- CPU and memory accounting -------------------------------------------------------------------


def cpu_times() -> dict[int, dict[str, int]]:
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                p = line.split()
                v = list(map(int, p[1:9]))
                out[int(p[0][3:])] = {
                    "user": v[0] + v[1],
                    "sys": v[2],
                    "idle": v[3] + v[4],
                    "softirq": v[6] + v[5],
                }
    return out


def busy(a: dict[int, dict[str, int]], b: dict[int, dict[str, int]], cpu: int, dt: float) -> float:
    idle = (b[cpu]["idle"] - a[cpu]["idle"]) / USER_HZ / dt * 100
    return round(100 - idle, 1)


def proc_ticks(pid: int, user_only: bool = False) -> int:
    """utime (+ stime) of a process and its threads, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            p = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(p[11]) + (0 if user_only else int(p[12]))


def softnet_drops() -> list[int]:
    """Per CPU: packets dropped because its backlog queue was full (RPS, veth)."""
    with open("/proc/net/softnet_stat") as f:
        return [int(line.split()[1], 16) for line in f]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def snapshot() -> dict[int, tuple[bool, int]]:
    """{pid: (kernel thread, utime + stime)} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    p = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(d)] = (bool(int(p[6]) & 0x200000), int(p[11]) + int(p[12]))
    return out


def foreign_cpu(
    a: dict[int, tuple[bool, int]], b: dict[int, tuple[bool, int]], ours: set[int], dt: float
) -> float:
    """% of one core used by user processes that are not this benchmark's: other sessions."""
    total = 0
    for pid, (kthread, ticks) in b.items():
        if not kthread and pid not in ours:
            total += ticks - a.get(pid, (False, ticks))[1]
    return round(total / USER_HZ / dt * 100, 1)


def our_pids() -> set[int]:
    """This process and every descendant (generator, clients, relays)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    ours, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo.extend(children.get(pid, []))
    return ours


# -- the lab -------------------------------------------------------------------------------------


class Topo:
    """Three namespaces named like lrkp_tsl.lab's (swept if this process dies)."""

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


# -- the generator -------------------------------------------------------------------------------


class Gen:
    def __init__(self, topo: Topo, work: Path) -> None:
        self.topo = topo
        self.bin = work / "rtpgen"
        sh(
            [
                "gcc",
                "-O2",
                "-Wall",
                "-Wextra",
                "-o",
                str(self.bin),
                str(HERE / "rtpgen.c"),
                "-lpthread",
            ]
        )
        link = json.loads(sh(["ip", "-n", topo.r, "-j", "link", "show", "r1"]))
        self.rmac = link[0]["address"]

    def send(
        self, n: int, dst: str, rate: int, secs: float, target: dict[str, Any], rtt: bool = False
    ) -> dict[str, Any]:
        argv = [
            str(self.bin),
            "send",
            "-s",
            A_IP,
            "-p",
            str(A_PORT),
            "-d",
            dst,
            "-n",
            str(n),
            "-r",
            str(rate),
            "-t",
            str(secs),
            "-C",
            str(GEN_CPU),
        ]
        if "portfile" in target:
            argv += ["-f", str(target["portfile"])]
        else:
            argv += ["-q", str(target["dport"]), "-Q", str(target["dstep"])]
        argv += ["-R", "-x", str(GEN_CPU)] if rtt else ["-i", "a0", "-M", self.rmac]
        if rtt:  # real-time priority 1: other sessions' processes on the machine cannot delay
            argv = ["chrt", "-f", "1", *argv]  # the endpoints (sleeps between packets at 5 kpps)
        result: dict[str, Any] = json.loads(sh(self.topo.x(self.topo.a, *argv), timeout=secs + 60))
        return result

    def echo(self, n: int, secs: float) -> subprocess.Popen[str]:
        argv = self.topo.x(
            self.topo.b,
            "chrt",
            "-f",
            "1",
            "taskset",
            "-c",
            str(GEN_CPU),
            str(self.bin),
            "echo",
            "-s",
            B_IP,
            "-p",
            str(B_PORT),
            "-n",
            str(n),
            "-t",
            str(secs),
        )
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


# -- contenders ----------------------------------------------------------------------------------


class Contender:
    name = "?"

    def __init__(self, topo: Topo, n: int, work: Path) -> None:
        self.topo, self.n, self.work = topo, n, work
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def up(self) -> None:
        """Fresh state, calls set up."""

    def down(self) -> None:
        """Everything this contender left, gone."""

    def target(self) -> tuple[str, dict[str, Any]]:
        """Where A sends, and how destination ports go per stream."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class Route(Contender):
    name = "route"

    def target(self) -> tuple[str, dict[str, Any]]:
        return B_IP, {"dport": B_PORT, "dstep": 2}


def natmap(n: int) -> str:
    """The kernel relay design by hand (research/stack.md §6): call i, both legs."""
    dn, sn = [], []
    for i in range(n):
        pa, pb = 20000 + 4 * i, 20002 + 4 * i
        dn += [f"{pa} : {B_IP} . {B_PORT + 2 * i}", f"{pb} : {A_IP} . {A_PORT + 2 * i}"]
        sn += [f"{pa} : {RELAY_IP} . {pb}", f"{pb} : {RELAY_IP} . {pa}"]
    return f"""table ip bench_relay {{
  map dnat_s {{ type inet_service : ipv4_addr . inet_service; elements = {{ {", ".join(dn)} }} }}
  map snat_s {{ type inet_service : ipv4_addr . inet_service; elements = {{ {", ".join(sn)} }} }}
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr {RELAY_IP} dnat ip to udp dport map @dnat_s
  }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    ct status dnat meta l4proto udp snat ip to ct original proto-dst map @snat_s
  }}
}}
"""


class Nat(Contender):
    name = "nat"

    def up(self) -> None:
        self.topo.conntrack_flush()
        self.topo.nft(self.topo.r, natmap(self.n))

    def down(self) -> None:
        self.topo.nft(self.topo.r, args=["delete", "table", "ip", "bench_relay"], check=False)
        self.topo.conntrack_flush()

    def target(self) -> tuple[str, dict[str, Any]]:
        return RELAY_IP, {"dport": 20000, "dstep": 4}


class Lrkp(Contender):
    """lrkp-tsl, pinned to the relay core, calls set up over its control port."""

    name = "lrkp"
    sdp_ip = A_IP
    ports = "20000-29999"

    def start(self) -> None:
        self.topo.conntrack_flush()
        self.state = Path(tempfile.mkdtemp(prefix="lrkp-bench-", dir=self.work))
        argv = self.topo.x(
            self.topo.r,
            "taskset",
            "-c",
            str(RELAY_CPU),
            sys.executable,
            "-m",
            "lrkp_tsl.cli",
            "run",
            "--state-dir",
            str(self.state),
            "--control",
            "udp:127.0.0.1:22333",
            "--internal-ip",
            RELAY_IP,
            "--external-ip",
            RELAY_IP2,
            "--ports",
            self.ports,
            "--idle-timeout",
            "3600",
            "--flush-on-exit",
            "--log-level",
            "warning",
        )
        self.log = (self.work / f"lrkp-{self.name}.log").open("a")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        self.client("ping", "0", timeout=30)

    def client(self, *args: str, timeout: float = 600) -> dict[str, Any]:
        argv = self.topo.x(
            self.topo.r,
            "taskset",
            "-c",
            str(GEN_CPU),
            sys.executable,
            str(HERE / "ctlclient.py"),
            *args,
        )
        result: dict[str, Any] = json.loads(sh(argv, timeout=timeout))
        return result

    def up(self) -> None:
        self.start()
        if self.n:
            self.client(
                "calls",
                str(self.n),
                "--a",
                f"{A_IP}:{A_PORT}",
                "--b",
                f"{B_IP}:{B_PORT}",
                "--relay",
                RELAY_IP,
                "--caller-sdp",
                self.sdp_ip,
            )

    def down(self) -> None:
        self.stop()
        self.log.close()
        self.topo.nft(self.topo.r, args=["delete", "table", "ip", "lrkp"], check=False)
        self.topo.conntrack_flush()
        shutil.rmtree(self.state, ignore_errors=True)

    def target(self) -> tuple[str, dict[str, Any]]:
        return RELAY_IP, {"dport": 20002, "dstep": 4}


class LrkpNat(Lrkp):
    name = "lrkp_nat"
    sdp_ip = NAT_SDP_IP


class Rtpengine(Contender):
    name = "rtpengine"
    ports = (20000, 29999)

    def start(self) -> None:
        self.log = (self.work / "rtpengine.log").open("a")
        threads = os.environ.get("RTPENGINE_THREADS", str(os.cpu_count()))
        argv = self.topo.x(
            self.topo.r,
            "taskset",
            "-c",
            str(RELAY_CPU),
            "rtpengine",
            "--config-file=none",
            "--foreground",
            "--log-stderr",
            "--log-level=4",
            "--table=-1",
            f"--interface={RELAY_IP}",
            "--listen-ng=127.0.0.1:2223",
            f"--port-min={self.ports[0]}",
            f"--port-max={self.ports[1]}",
            f"--num-threads={threads}",
            "--delete-delay=0",
            "--timeout=600",
        )
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(200):
            if "127.0.0.1:2223" in sh(self.topo.x(self.topo.r, "ss", "-uln"), check=False):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"rtpengine did not open its ng port: see {self.log.name}")

    def client(self, *args: str, timeout: float = 600) -> dict[str, Any]:
        argv = self.topo.x(
            self.topo.r,
            "taskset",
            "-c",
            str(GEN_CPU),
            sys.executable,
            str(HERE / "ngclient.py"),
            *args,
        )
        result: dict[str, Any] = json.loads(sh(argv, timeout=timeout))
        return result

    def up(self) -> None:
        self.start()
        if self.n:
            self.client(
                "calls",
                str(self.n),
                str(self.work / "rtpengine-ports.txt"),
                "--a",
                f"{A_IP}:{A_PORT}",
                "--b",
                f"{B_IP}:{B_PORT}",
            )

    def down(self) -> None:
        self.stop()
        self.log.close()

    def target(self) -> tuple[str, dict[str, Any]]:
        return RELAY_IP, {"portfile": self.work / "rtpengine-ports.txt"}


KINDS: dict[str, type[Contender]] = {
    "route": Route,
    "nat": Nat,
    "lrkp": Lrkp,
    "lrkp_nat": LrkpNat,
    "rtpengine": Rtpengine,
}


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Bench:
    topo: Topo
    profile: Profile
    work: Path
    out: Any
    gen: Gen | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, rec: dict[str, Any]) -> None:
        rec["t"] = round(time.time(), 1)
        self.records.append(rec)
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()
        brief = {
            k: rec[k]
            for k in (
                "phase",
                "who",
                "rate",
                "gen_pps",
                "loss",
                "ok",
                "cost",
                "rtt_us",
                "foreign_cpu",
                "backlog_drops",
            )
            if k in rec
        }
        print(json.dumps(brief), flush=True)

    def wait_quiet(self, limit: float = 25.0) -> None:
        """Wait (bounded) until other sessions' processes use < `limit` % of a core."""
        deadline = time.monotonic() + self.profile.quiet_wait
        while time.monotonic() < deadline:
            a = snapshot()
            time.sleep(1.0)
            if foreign_cpu(a, snapshot(), our_pids(), 1.0) < limit:
                return

    @property
    def g(self) -> Gen:
        assert self.gen is not None
        return self.gen

    @contextlib.contextmanager
    def contender(self, c: Contender) -> Iterator[tuple[str, dict[str, Any]]]:
        """Fresh contender, calls up, every stream warmed (latched, conntrack entries made)."""
        c.up()
        try:
            dst, target = c.target()
            warm_rate = max(2 * c.n, 2000)
            self.g.send(c.n, dst, warm_rate, self.profile.warm_s, target)
            if isinstance(c, LrkpNat):  # every stream latches through the queue: let it finish
                time.sleep(0.5)
                self.g.send(c.n, dst, warm_rate, self.profile.warm_s, target)
            time.sleep(0.2)
            yield dst, target
        finally:
            c.down()

    def window(
        self,
        c: Contender,
        dst: str,
        target: dict[str, Any],
        rate: int,
        secs: float,
        soak: bool = False,
    ) -> dict[str, Any]:
        """One measured window at `rate` (0: flat out); loss at B, CPU of both cores."""
        soaker = None
        if soak:
            soaker = subprocess.Popen(
                [str(self.g.bin), "soak", "-C", str(RELAY_CPU), "-t", str(secs + 5)],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(0.3)
        try:
            self.topo.sink_read()
            ct0, ps0, sn0 = cpu_times(), snapshot(), softnet_drops()
            s0 = proc_ticks(soaker.pid, user_only=True) if soaker else 0
            p0 = proc_ticks(c.pid) if c.pid else 0
            t0 = time.monotonic()
            g = self.g.send(c.n, dst, rate, secs, target)
            dt = time.monotonic() - t0
            ct1, ps1 = cpu_times(), snapshot()
            s1 = proc_ticks(soaker.pid, user_only=True) if soaker else 0
            p1 = proc_ticks(c.pid) if c.pid else 0
            ours = our_pids()
        finally:
            if soaker:
                soaker.terminate()
                soaker.wait(5)
        time.sleep(0.3)  # in flight
        got = self.topo.sink_read()
        drops = [b - a for a, b in zip(sn0, softnet_drops(), strict=True)]
        sent = int(g["ok"])
        rec: dict[str, Any] = {
            "who": c.name,
            "n": c.n,
            "rate": rate,
            "secs": secs,
            "sent": sent,
            "gen_pps": round(g["pps"]),
            "delivered": got,
            "delivered_pps": round(got / g["dur_s"]) if g["dur_s"] else 0,
            "loss": round(1 - got / sent, 6) if sent else None,
            "busy_relay": busy(ct0, ct1, RELAY_CPU, dt),
            "busy_gen": busy(ct0, ct1, GEN_CPU, dt),
            "proc_cpu": round((p1 - p0) / USER_HZ / dt * 100, 1) if c.pid else None,
            "foreign_cpu": foreign_cpu(ps0, ps1, ours, dt),
            "backlog_drops": drops,
        }
        if soaker:
            # The soaker (SCHED_IDLE) only gets what the relay leaves: cost = 100 % - its share.
            cost = 100 - (s1 - s0) / USER_HZ / dt * 100
            rec["cost"] = round(cost, 1)
            rec["us_per_packet"] = round(cost / 100 / g["pps"] * 1e6, 2) if g["pps"] else None
            # Direct: the relay core's (soft)irq time (accurate while the soaker keeps it from
            # idling) plus the relay process's own CPU. Blind to other sessions' processes that
            # take the soaker's share; may count a softirq tick that hits the relay process twice.
            irq = (ct1[RELAY_CPU]["softirq"] - ct0[RELAY_CPU]["softirq"]) / USER_HZ / dt * 100
            direct = irq + (rec["proc_cpu"] or 0)
            rec["direct"] = round(direct, 1)
            rec["us_per_packet_direct"] = (
                round(direct / 100 / g["pps"] * 1e6, 2) if g["pps"] else None
            )
        loss = rec["loss"]
        rec["gen_short"] = rate > 0 and g["pps"] < RATE_MIN_OK * rate
        rec["ok"] = loss is not None and loss < LOSS_MAX and not rec["gen_short"]
        return rec

    # -- phases --

    def phase_gen(self) -> None:
        """The generator flat out into a drop rule at R's ingress: what it can offer (the best
        of 1 + retries windows: other sessions' load only ever lowers it)."""
        self.topo.nft(self.topo.r, RDROP_NFT)
        try:
            best: dict[str, Any] = {}
            for _ in range(self.profile.retries + 1):
                self.wait_quiet()
                ct0, ps0 = cpu_times(), snapshot()
                t0 = time.monotonic()
                g = self.g.send(
                    self.profile.flows, B_IP, 0, self.profile.step_s, {"dport": B_PORT, "dstep": 2}
                )
                dt = time.monotonic() - t0
                rec = {
                    "phase": "gen",
                    "who": "rtpgen",
                    "n": self.profile.flows,
                    "gen_pps": round(g["pps"]),
                    "busy_gen": busy(ct0, cpu_times(), GEN_CPU, dt),
                    "foreign_cpu": foreign_cpu(ps0, snapshot(), our_pids(), dt),
                }
                if rec["gen_pps"] > best.get("gen_pps", -1):
                    best = rec
            self.emit(best)
        finally:
            self.topo.nft(self.topo.r, args=["delete", "table", "ip", "bench_rdrop"], check=False)

    def measure(self, c: Contender, rate: int, secs: float, soak: bool = False) -> dict[str, Any]:
        """A window from a fresh contender; measured again (up to `retries` times) when it
        failed while other processes used more than NOISY % of a core: the machine is shared."""
        for attempt in range(1, self.profile.retries + 2):
            self.wait_quiet()
            with self.contender(c) as (dst, target):
                rec = self.window(c, dst, target, rate, secs, soak)
            rec["attempt"] = attempt
            noisy = rec["foreign_cpu"] > NOISY
            if not noisy or (rec["ok"] and not soak) or attempt > self.profile.retries:
                return rec
            self.emit({"phase": "noisy", **rec})
        return rec

    def phase_steps(self, c: Contender) -> dict[str, Any]:
        """The ladder up to the first window that loses >= 0.1 %, then bisection. A window
        where the generator fell short without loss is no failure: the ladder goes on (flat
        out last), and if nothing ever lost, the limit is the generator's (a lower bound)."""
        p = self.profile
        last_ok: dict[str, Any] | None = None
        first_bad: dict[str, Any] | None = None
        short_best = 0
        for rate in [*p.ladder, 0]:
            rec = self.measure(c, rate, p.step_s)
            self.emit({"phase": "step", **rec})
            if rec["loss"] is None or rec["loss"] >= LOSS_MAX:
                first_bad = rec
                break
            if rec["ok"] and rate:
                last_ok = rec
            else:
                short_best = max(short_best, rec["delivered_pps"])
        if first_bad is not None:
            lo = last_ok["rate"] if last_ok else 0
            hi = first_bad["rate"] or first_bad["gen_pps"]
            for _ in range(p.bisect):
                mid = int((lo + hi) / 2 / 1000) * 1000 or (lo + hi) // 2
                if mid <= lo or mid >= hi:
                    break
                rec = self.measure(c, mid, p.step_s)
                self.emit({"phase": "step", **rec})
                if rec["ok"]:
                    lo, last_ok = mid, rec
                else:
                    hi = mid
        gen_bound = first_bad is None
        ok_rate = last_ok["rate"] if last_ok else 0
        best = max(ok_rate, short_best)  # a window short of its rate still relayed without loss
        rec = {
            "phase": "max",
            "who": c.name,
            "n": c.n,
            "max_pps": best,
            "gen_bound": gen_bound,
            "first_fail_rate": first_bad["rate"] if first_bad else None,
            "first_fail_loss": first_bad["loss"] if first_bad else None,
        }
        self.emit(rec)
        return rec

    def phase_cpu(self, c: Contender, limit: dict[str, Any] | None) -> None:
        """Soaker windows: at the common load, and at a high load for the contenders that
        relay it with room to spare (cost per packet falls as batches grow: compare at the
        same load only)."""
        p = self.profile
        rec = self.measure(c, p.cpu_pps, p.cpu_s, soak=True)
        self.emit({"phase": "cpu", **rec})
        if limit and limit["max_pps"] >= 1.25 * p.cpu_hi_pps:
            rec = self.measure(c, p.cpu_hi_pps, p.cpu_s, soak=True)
            self.emit({"phase": "cpu_hi", **rec})

    def phase_rtt(self, c: Contender) -> None:
        p = self.profile
        self.wait_quiet()
        self.topo.b_drop(False)  # the echo answers
        try:
            with self.contender(c) as (dst, target):
                echo = self.g.echo(c.n, p.rtt_s + 5)
                try:
                    time.sleep(0.3)
                    g = self.g.send(c.n, dst, p.rtt_pps, p.rtt_s, target, rtt=True)
                finally:
                    echo.send_signal(signal.SIGTERM)
                    echo.wait(10)
        finally:
            self.topo.b_drop(True)
        self.emit(
            {
                "phase": "rtt",
                "who": c.name,
                "n": c.n,
                "rate": p.rtt_pps,
                "sent": g["ok"],
                "rtt_n": g["rtt_n"],
                "rtt_us": g["rtt_us"],
            }
        )

    def phase_overload(self, c: Contender, limit: dict[str, Any]) -> None:
        """Past saturation: loss against the excess, then does every stream recover?"""
        p = self.profile
        knee = int(limit["max_pps"]) or p.ladder[0]
        offered = 0 if limit["gen_bound"] else 2 * knee
        low = max(knee // 4, 2 * c.n)
        self.wait_quiet()
        with self.contender(c) as (dst, target):
            over = self.window(c, dst, target, offered, p.step_s)
            self.drain()
            self.topo.sink(per_flow=True)
            after = self.window(c, dst, target, low, p.step_s)
            streams = self.topo.sink_flows()
            self.topo.sink()
        excess = max(0.0, 1 - knee / over["gen_pps"]) if over["gen_pps"] else 0.0
        self.emit(
            {
                "phase": "overload",
                "who": c.name,
                "n": c.n,
                "rate": offered,
                "gen_pps": over["gen_pps"],
                "loss": over["loss"],
                "excess": round(excess, 4),
                "saturated": not limit["gen_bound"],
                "recovery_rate": low,
                "recovery_loss": after["loss"],
                "streams_recovered": streams,
                "foreign_cpu": over["foreign_cpu"],
            }
        )

    def drain(self, most: float = 15.0) -> None:
        """Wait until nothing more arrives at B: a userspace relay's socket buffers can hold
        seconds of backlog after an overload, which must not count in the next window."""
        deadline = time.monotonic() + most
        self.topo.sink_read()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if self.topo.sink_read() == 0:
                return

    def phase_control(self) -> None:
        """lrkp-tsl: `S`+`D` pairs/s and `S` -> `OK` at growing live calls; RSS per call."""
        p = self.profile
        c = Lrkp(self.topo, 0, self.work)
        c.ports = "1024-65535"
        c.start()
        try:
            assert c.pid is not None
            time.sleep(1.0)
            rss0, filled = rss_kib(c.pid), 0
            for live in p.live:
                c.client("fill", str(filled), str(live), "--tag", "live")
                filled = live
                time.sleep(1.0)
                rss = rss_kib(c.pid)
                for clients in (1, p.clients):
                    self.wait_quiet()
                    ps0 = snapshot()
                    t0 = time.monotonic()
                    r = c.client(
                        "cps",
                        str(p.cps_pairs // clients),
                        "--clients",
                        str(clients),
                        "--base",
                        str(live),
                        "--tag",
                        f"cps{live}-{clients}",
                    )
                    fc = foreign_cpu(ps0, snapshot(), our_pids(), time.monotonic() - t0)
                    self.emit(
                        {
                            "phase": "control",
                            "who": "lrkp",
                            "live": live,
                            **r,
                            "rss_kib": rss,
                            "kib_per_call": round((rss - rss0) / live, 2),
                            "foreign_cpu": fc,
                        }
                    )
        finally:
            c.down()

    def phase_ngcps(self) -> None:
        """rtpengine: offer+answer+delete calls/s (1 and several clients); RSS per call."""
        p = self.profile
        c = Rtpengine(self.topo, 0, self.work)
        c.ports = (10000, 59999)
        c.start()
        try:
            assert c.pid is not None
            time.sleep(1.0)
            rss0 = rss_kib(c.pid)
            c.client("calls", str(p.ng_live), str(self.work / "ng-live-ports.txt"), "--tag", "live")
            time.sleep(1.0)
            rss = rss_kib(c.pid)
            for clients in (1, p.clients):
                self.wait_quiet()
                ps0 = snapshot()
                t0 = time.monotonic()
                r = c.client(
                    "cps",
                    str(p.ng_calls // clients),
                    "--clients",
                    str(clients),
                    "--tag",
                    f"cps-{clients}",
                )
                fc = foreign_cpu(ps0, snapshot(), our_pids(), time.monotonic() - t0)
                self.emit(
                    {
                        "phase": "ngcps",
                        "who": "rtpengine",
                        "live": p.ng_live,
                        **r,
                        "rss_kib": rss,
                        "kib_per_call": round((rss - rss0) / p.ng_live, 2),
                        "foreign_cpu": fc,
                    }
                )
        finally:
            c.down()

    def guarded(self, who: str, phase: Callable[..., Any], *args: Any) -> Any:
        """A phase that fails is recorded (and the run goes on): one broken contender must not
        lose the figures of the others."""
        try:
            return phase(*args)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            self.emit({"phase": "error", "who": who, "in": phase.__name__, "error": str(e)[-2000:]})
            return None

    def run(self, contenders: list[str], phases: list[str]) -> None:
        ladder = os.environ.get("BENCH_LADDER")  # e.g. 100000,200000: one ladder, by hand
        if ladder:
            self.profile.ladder = [int(x) for x in ladder.split(",")]
        self.topo.up()
        try:
            self.topo.sink()
            self.topo.b_drop(True)
            self.gen = Gen(self.topo, self.work)
            self.emit({"phase": "meta", **machine()})
            if "gen" in phases:
                self.guarded("rtpgen", self.phase_gen)
            for name in contenders:
                c = KINDS[name](self.topo, self.profile.flows, self.work)
                limit = self.guarded(name, self.phase_steps, c) if "steps" in phases else None
                if "cpu" in phases:
                    self.guarded(name, self.phase_cpu, c, limit)
                if "rtt" in phases:
                    self.guarded(name, self.phase_rtt, c)
                if "overload" in phases and limit:
                    self.guarded(name, self.phase_overload, c, limit)
            if "control" in phases:
                self.guarded("lrkp", self.phase_control)
            if "ngcps" in phases:
                self.guarded("rtpengine", self.phase_ngcps)
        finally:
            self.topo.down()


def rtpengine_version() -> str:
    if not shutil.which("rtpengine"):
        return ""
    r = subprocess.run(["rtpengine", "--version"], capture_output=True, text=True, check=False)
    return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = 0
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    os_name = ""
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        os_name = next(
            (ln.split("=", 1)[1].strip().strip('"') for ln in f if ln.startswith("PRETTY_NAME=")),
            "",
        )
    rtpengine = rtpengine_version()
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "mem_mib": mem,
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "nft": sh(["nft", "--version"], check=False).strip(),
        "rtpengine": rtpengine,
        "gen_cpu": GEN_CPU,
        "relay_cpu": RELAY_CPU,
        "loadavg": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# -- the summary ---------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return round(value / base, 2)


def summarize(records: list[dict[str, Any]], profile: str) -> dict[str, Any]:
    """Every figure per contender, with its ratio to route and to rtpengine of the same run."""
    by: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    gen: dict[str, Any] = {}
    control: list[dict[str, Any]] = []
    ngcps: list[dict[str, Any]] = []
    foreign: list[float] = []
    errors: list[dict[str, Any]] = []
    for r in records:
        ph, who = r["phase"], r.get("who", "")
        if "foreign_cpu" in r:
            foreign.append(r["foreign_cpu"])
        if ph == "meta":
            meta = r
        elif ph == "gen":
            gen = r
        elif ph == "max":
            by.setdefault(who, {})["max_pps"] = r["max_pps"]
            by[who]["max_gen_bound"] = r["gen_bound"]
        elif ph == "cpu":
            by.setdefault(who, {}).update(
                cpu_cost=r.get("cost"),
                us_per_packet=r.get("us_per_packet"),
                cpu_direct=r.get("direct"),
                us_per_packet_direct=r.get("us_per_packet_direct"),
                cpu_rate=r["rate"],
                cpu_loss=r["loss"],
            )
        elif ph == "cpu_hi":
            by.setdefault(who, {}).update(
                us_per_packet_hi=r.get("us_per_packet"),
                us_per_packet_hi_direct=r.get("us_per_packet_direct"),
                cpu_hi_rate=r["rate"],
            )
        elif ph == "rtt":
            by.setdefault(who, {}).update(rtt_p50=r["rtt_us"]["p50"], rtt_p99=r["rtt_us"]["p99"])
        elif ph == "overload":
            by.setdefault(who, {}).update(
                over_rate=r["gen_pps"],
                over_loss=r["loss"],
                over_excess=r["excess"],
                over_saturated=r["saturated"],
                recovered=r["streams_recovered"],
                recovery_loss=r["recovery_loss"],
            )
        elif ph == "error":
            errors.append(r)
        elif ph == "control":
            control.append(r)
        elif ph == "ngcps":
            ngcps.append(r)
    route, rtp = by.get("route", {}), by.get("rtpengine", {})
    for row in by.values():
        if "rtt_p50" in row and "rtt_p50" in route:
            row["added_p50"] = row["rtt_p50"] - route["rtt_p50"]
            row["added_p99"] = row["rtt_p99"] - route["rtt_p99"]
        for key in (
            "max_pps",
            "us_per_packet",
            "us_per_packet_direct",
            "us_per_packet_hi",
            "us_per_packet_hi_direct",
            "rtt_p50",
            "rtt_p99",
        ):
            row[f"{key}_vs_route"] = ratio(row.get(key), route.get(key))
            row[f"{key}_vs_rtpengine"] = ratio(row.get(key), rtp.get(key))
        if row.get("over_saturated") and row.get("over_excess"):
            row["over_proportion"] = round((row["over_loss"] or 0) / row["over_excess"], 2)
    ng1 = next((r for r in ngcps if r["clients"] == 1), None)
    ngk = next((r for r in ngcps if r["clients"] > 1), None)
    for r in control:
        ng = ng1 if r["clients"] == 1 else ngk
        r["vs_rtpengine"] = ratio(r["pairs_per_s"], ng["calls_per_s"]) if ng else None
    return {
        "profile": profile,
        "machine": meta,
        "gen": gen,
        "contenders": by,
        "control": control,
        "errors": errors,
        "ngcps": ngcps,
        "foreign_cpu": {
            "median": statistics.median(foreign) if foreign else None,
            "max": max(foreign) if foreign else None,
        },
    }


def fmt(v: Any, unit: str = "", digits: int = 0) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}{unit}"
    if isinstance(v, int | float):
        return f"{round(v):,}{unit}"
    return str(v)


def markdown(s: dict[str, Any]) -> str:
    m, by = s["machine"], s["contenders"]
    names = [n for n in CONTENDERS if n in by]
    out = [
        f"# Side by side ({s['profile']} profile, {m.get('date', '')})",
        "",
        f"Machine: {m.get('cpu')}, {m.get('nproc')} CPUs, {m.get('mem_mib')} MiB; "
        f"{m.get('os')}, kernel {m.get('kernel')}; {m.get('nft')}; {m.get('rtpengine')}; "
        f"Python {m.get('python')}. Relay pinned to CPU {m.get('relay_cpu')}, generator and "
        f"sink on CPU {m.get('gen_cpu')}. Load average at start {m.get('loadavg', 0):.2f}; "
        f"other processes used {fmt(s['foreign_cpu']['median'], ' %', 1)} of a core "
        f"(median of windows, max {fmt(s['foreign_cpu']['max'], ' %', 1)}).",
        "",
        f"Generator (rtpgen, AF_PACKET, {fmt(s['gen'].get('n'))} streams) into a drop rule at "
        f"the relay: **{fmt(s['gen'].get('gen_pps'))} pps**. `≥`: the generator, not the "
        "relay, was the limit.",
        "",
        "| figure | " + " | ".join(LABELS[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]

    def row(title: str, cell: Any) -> None:
        out.append(f"| {title} | " + " | ".join(cell(by[n]) for n in names) + " |")

    def maxcell(r: dict[str, Any]) -> str:
        return ("≥ " if r.get("max_gen_bound") else "") + fmt(r.get("max_pps"))

    row("highest load with < 0.1 % loss, pps", maxcell)
    row(
        "… ratio to routing / to rtpengine",
        lambda r: (
            f"{fmt(r.get('max_pps_vs_route'), '', 2)} / {fmt(r.get('max_pps_vs_rtpengine'), '', 2)}"
        ),
    )
    cpu_rate = next((r.get("cpu_rate") for r in by.values() if r.get("cpu_rate")), None)
    row(
        f"relay-core CPU at {fmt(cpu_rate)} pps (soaker)", lambda r: fmt(r.get("cpu_cost"), " %", 1)
    )
    row(
        "CPU per million packets, core-s (= µs/packet)",
        lambda r: fmt(r.get("us_per_packet"), "", 2),
    )
    row(
        "… ratio to routing / to rtpengine",
        lambda r: (
            f"{fmt(r.get('us_per_packet_vs_route'), '', 2)} / "
            f"{fmt(r.get('us_per_packet_vs_rtpengine'), '', 2)}"
        ),
    )
    row(
        "… direct accounting: relay core (soft)irq + relay process, µs/packet",
        lambda r: fmt(r.get("us_per_packet_direct"), "", 2),
    )
    row(
        "… ratio to routing / to rtpengine",
        lambda r: (
            f"{fmt(r.get('us_per_packet_direct_vs_route'), '', 2)} / "
            f"{fmt(r.get('us_per_packet_direct_vs_rtpengine'), '', 2)}"
        ),
    )
    hi_rate = next((r.get("cpu_hi_rate") for r in by.values() if r.get("cpu_hi_rate")), None)
    row(
        f"CPU per packet at {fmt(hi_rate)} pps (soaker / direct), µs",
        lambda r: (
            f"{fmt(r.get('us_per_packet_hi'), '', 2)} / "
            f"{fmt(r.get('us_per_packet_hi_direct'), '', 2)}"
            if r.get("us_per_packet_hi") is not None
            else "— (limit too low)"
        ),
    )
    row(
        "… ratio to routing (soaker / direct)",
        lambda r: (
            f"{fmt(r.get('us_per_packet_hi_vs_route'), '', 2)} / "
            f"{fmt(r.get('us_per_packet_hi_direct_vs_route'), '', 2)}"
        ),
    )
    row("round trip p50 / p99, µs", lambda r: f"{fmt(r.get('rtt_p50'))} / {fmt(r.get('rtt_p99'))}")
    row(
        "added over routing p50 / p99, µs",
        lambda r: f"{fmt(r.get('added_p50'))} / {fmt(r.get('added_p99'))}",
    )
    row(
        "… p50 ratio to routing / to rtpengine",
        lambda r: (
            f"{fmt(r.get('rtt_p50_vs_route'), '', 2)} / {fmt(r.get('rtt_p50_vs_rtpengine'), '', 2)}"
        ),
    )

    def over(r: dict[str, Any]) -> str:
        if r.get("over_rate") is None:
            return "—"
        loss = fmt((r.get("over_loss") or 0) * 100, " %", 1)
        if not r.get("over_saturated"):
            return f"not saturated: flat out {fmt(r['over_rate'])} pps, loss {loss}"
        return (
            f"{fmt(r['over_rate'])} pps: loss {loss} for an excess of "
            f"{fmt(r['over_excess'] * 100, ' %', 1)} (x {fmt(r.get('over_proportion'), '', 2)})"
        )

    row("past saturation (2x the limit)", over)
    flows = s["gen"].get("n")

    def recovery(r: dict[str, Any]) -> str:
        if r.get("recovered") is None:
            return "—"
        loss = r.get("recovery_loss") or 0
        if loss < 0:  # more arrived than was sent: the overload's backlog, delivered late
            return f"{fmt(r['recovered'])}, {fmt(-loss * 100, ' %', 0)} more than sent (backlog)"
        return f"{fmt(r['recovered'])}, {fmt(loss * 100, ' %', 2)}"

    row("streams delivering after it (of " + fmt(flows) + "), loss", recovery)
    out += [
        "",
        "Call setup (closed loop, one command in flight per client; lrkp-tsl: `S`+`D` "
        "pairs, `OK` after the kernel commit; rtpengine: `offer`+`answer`+`delete`):",
        "",
        "| server | live calls | clients | calls/s | ratio to rtpengine | `S`→`OK` / `offer` "
        "p50 / p99 ms | daemon RSS per live call |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in s["ngcps"]:
        out.append(
            f"| rtpengine | {fmt(r['live'])} | {r['clients']} | {fmt(r['calls_per_s'])} | 1 "
            f"| {r['offer_ms']['p50']} / {r['offer_ms']['p99']} | "
            f"{fmt(r['kib_per_call'], ' KiB', 1)} |"
        )
    for r in s["control"]:
        out.append(
            f"| lrkp-tsl | {fmt(r['live'])} | {r['clients']} | {fmt(r['pairs_per_s'])} | "
            f"{fmt(r.get('vs_rtpengine'), '', 2)} | {r['s_ms']['p50']} / {r['s_ms']['p99']} "
            f"| {fmt(r['kib_per_call'], ' KiB', 1)} |"
        )
    for e in s.get("errors", []):
        out += ["", f"**Failed:** {e['who']} in {e['in']}: `{e['error'][-300:]}`"]
    out += [
        "",
        "Method and how to read it: docs/benchmarks.md. Raw windows: raw/ (not committed).",
        "",
    ]
    return "\n".join(out)


def main() -> int:
    if sys.argv[1:2] == ["--render"]:  # the table again from a summary: --render JSON
        Path(sys.argv[2]).with_suffix(".md").write_text(
            markdown(json.loads(Path(sys.argv[2]).read_text()))
        )
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer and shorter windows (~5 min)")
    mode.add_argument("--tiny", action="store_true", help="a few streams, seconds (the tests')")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--phases", default="gen,steps,cpu,rtt,overload,control,ngcps")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    parser.add_argument("--name", help="file stem (default sidebyside, sidebyside-quick, …)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("sidebyside: needs root (namespaces, nftables)", file=sys.stderr)
        return 1
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    stem = args.name or ("sidebyside" if profile == "full" else f"sidebyside-{profile}")
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    if "rtpengine" in contenders and not shutil.which("rtpengine"):
        parser.error("rtpengine is not installed: scripts/install-bench-deps.sh")
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=raw))
    with (raw / f"{stem}.jsonl").open("w") as out:
        bench = Bench(Topo(), PROFILES[profile], work, out)
        bench.run(contenders, args.phases.split(","))
    summary = summarize(bench.records, profile)
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(summary))
    plot = subprocess.run(
        [
            "/usr/bin/python3",
            str(HERE / "plot_sidebyside.py"),
            str(args.out / f"{stem}.json"),
            str(args.out / f"{stem}.png"),
        ],
        capture_output=True,
        text=True,
    )
    if plot.returncode:
        print(f"sidebyside: no plot: {plot.stderr.strip()}", file=sys.stderr)
    print(markdown(summary))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
