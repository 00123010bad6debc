"""Event-loop stalls of the daemon with many live calls: how long can a `P` wait?

Runs as root in a lab: the real daemon (`lrkp-tsl run`) in the relay namespace, filled with
CALLS live calls in lrkproxy's shared-port geometry (gt=1: one relay endpoint per call,
P for RTP and P+1 for RTCP, relay IP alternating between the internal and the external
address: up to 64,512 calls in ports 1024-65535). Every call is between a (10.201.1.10:4000)
and b (10.201.1.11:6000); the kernel's flow key includes the relay port, so one socket in a
feeds them all. The calls are set up with pipelined `S` commands (a window of outstanding
requests, replies matched by cookie, every reply checked to be the request + `OK`).

Media, so that every call has a conntrack entry as a live call does: one 172-byte packet to
each call right after its `OK`, then one to each call every --period seconds (spread evenly)
plus a continuous --sample-rate packets/s to --sample calls, from a separate process. Host
b drops them in its input hook (no ICMP errors come back).

Measured, once the node is filled and every call has its entry: a client on the relay's
loopback sends `P` every 10 ms for --duration seconds, one at a time; each round trip is
recorded (a timeout counts as a stall of --timeout seconds). Reported: p50, p99, p99.9,
max, how many were over 50 ms and over 200 ms (one `P` waits out a whole stall, so these
count stalls), the worst stalls and when they happened, and
the daemon's CPU time over the window (utime + stime from /proc/<pid>/stat).

--tree runs the daemon from another source tree (e.g. `git worktree add /tmp/lrkp-old
7bc24f6`): the child puts the tree first on sys.path and logs where lrkp_tsl came from; the
run fails if it is not that tree. Each run appends one row (with the tree's commit) to --out.

    PYTHONPATH=. .venv/bin/python bench/event_loop.py [--calls 50000] [--duration 60]
    PYTHONPATH=. .venv/bin/python bench/event_loop.py --tree /tmp/lrkp-old

bench/restart.py reuses the lab, fill and media helpers from here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from lrkp_lab import load
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.processes import rss_kib

REPO = Path(__file__).resolve().parents[1]
CONTROL = ("127.0.0.1", 22333)
PORTS = (1024, 65535)
RELAY_IPS = (str(INTERNAL_IP), str(EXTERNAL_IP))
CALLS_PER_IP = (PORTS[1] - PORTS[0] + 1) // 2  # P and P + 1 per call
MAX_CALLS = len(RELAY_IPS) * CALLS_PER_IP
CALLER = ("10.201.1.10", 4000)  # host a
CALLEE = ("10.201.1.11", 6000)  # host b
PAYLOAD = b"\x80" + bytes(171)  # 172 bytes: an RTP header and 160 bytes of G.711
# b drops the media silently: no socket, no ICMP port unreachable back through the relay.
B_DROP = """table inet bench {
	chain in {
		type filter hook input priority 0; policy accept;
		udp dport 6000 drop
	}
}
"""
STALL_THRESHOLDS_MS = (50, 200)

# -- the calls ---------------------------------------------------------------------------------


def relay_endpoint(index: int) -> tuple[str, int]:
    """Call `index`'s relay endpoint: both parties send RTP here (and RTCP to port + 1)."""
    if not 0 <= index < MAX_CALLS:
        raise ValueError(f"call {index}: only {MAX_CALLS} calls fit in ports {PORTS}")
    return RELAY_IPS[index % 2], PORTS[0] + 2 * (index // 2)


def s_body(index: int, tag: str, verb: str = "S") -> bytes:
    """The `S` (or `D`) of call `index` in shared-port geometry: dst = snat, dport = snatport."""
    ip, port = relay_endpoint(index)
    return set_command(verb, CALLER[0], ip, ip, CALLEE[0], CALLER[1], port, port, CALLEE[1],
                       f"bench-{index}@{tag}")  # fmt: skip


def node_args(log_level: str, *, flush_on_exit: bool) -> list[str]:
    args = [
        "--internal-ip", str(INTERNAL_IP), "--external-ip", str(EXTERNAL_IP),
        "--ports", f"{PORTS[0]}-{PORTS[1]}", "--control", f"udp:{CONTROL[0]}:{CONTROL[1]}",
        "--idle-timeout", "60", "--log-level", log_level,
    ]  # fmt: skip
    return [*args, "--flush-on-exit"] if flush_on_exit else args


def prepare_lab(lab: Lab) -> None:
    """Let a reach the relay's external IP (through the relay), and b accept from it.

    a and b are on the internal network only: calls on the external relay IP need a route
    to it in a. The relay forwards the DNATed packets out of the interface they came in on,
    so a also ignores ICMP redirects, as a precaution (none were seen to take effect: the
    calls relay either way). b's route only matters to a reverse-path filter (off here).
    """
    external = f"{str(EXTERNAL_IP).rsplit('.', 1)[0]}.0/24"
    for host in ("a", "b"):
        lab.run(host, "ip", "route", "replace", external, "via", str(INTERNAL_IP))
        for scope in ("all", "default", "eth0"):
            lab.run(host, "sysctl", "-qw", f"net.ipv4.conf.{scope}.accept_redirects=0")


def conntrack_count(lab: Lab) -> int:
    return int(lab.run("relay", "conntrack", "-C").stdout.strip() or 0)


def wait_for_entries(lab: Lab, calls: int, timeout: float) -> int:
    """Wait until the relay has a conntrack entry per call (plus control); the count."""
    deadline = time.monotonic() + timeout
    while (count := conntrack_count(lab)) < calls and time.monotonic() < deadline:
        time.sleep(1.0)
    return count


@dataclass
class FillResult:
    calls: int
    seconds: float
    resent: int = 0
    stray_replies: int = 0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0


def fill(
    client: Controller,
    indices: range,
    tag: str,
    window: int = 64,
    on_ok: Callable[[int], None] | None = None,
) -> FillResult:
    """Set up the calls `indices` with `S`, `window` requests outstanding at a time, each
    answered `OK` (lrkp_lab.load.fill: a request unanswered for a second is sent again with
    the same bytes, as lrkproxy does). `on_ok(index)` runs on each call's `OK`."""
    started = time.perf_counter()
    done = load.fill(
        client.sock,
        CONTROL,
        (s_body(index, tag) for index in indices),
        window,
        on_ok=None if on_ok is None else lambda n: on_ok(indices[n]),
    )
    seconds = time.perf_counter() - started
    return FillResult(len(indices), seconds, done.resent, done.stray_replies)


# -- media ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaPlan:
    calls: int
    period: float = 15.0  # every call gets a packet this often
    sample: tuple[int, ...] = ()  # these calls also get a continuous stream
    sample_rate: float = 50.0  # packets/s to each sample call


@dataclass
class MediaStats:
    seconds: float = 0.0
    periodic: int = 0
    sampled: int = 0
    errors: int = 0
    last_error: str = ""
    skipped_ticks: int = 0
    max_lag_ms: float = 0.0


def _media_loop(sock: socket.socket, plan: MediaPlan, stop: Event, out: Connection) -> None:
    """Paced sends from one socket, in bounded ticks; never catches up in a burst."""
    tick = 1.0 / plan.sample_rate if plan.sample else 0.02
    endpoints = [relay_endpoint(i) for i in range(plan.calls)]
    samples = [endpoints[i] for i in plan.sample]
    per_tick = plan.calls * tick / plan.period
    stats = MediaStats()
    credit, cursor = 0.0, 0

    def send(to: tuple[str, int]) -> bool:
        try:
            sock.sendto(PAYLOAD, to)
        except OSError as exc:
            stats.errors += 1
            stats.last_error = str(exc)
            return False
        return True

    parent = os.getppid()
    started = next_at = time.monotonic()
    while not stop.is_set() and os.getppid() == parent:  # stop also if the bench was killed
        credit += per_tick
        for _ in range(int(credit)):
            stats.periodic += send(endpoints[cursor])
            cursor = (cursor + 1) % plan.calls
        credit -= int(credit)
        for to in samples:
            stats.sampled += send(to)
        next_at += tick
        lag = time.monotonic() - next_at
        stats.max_lag_ms = max(stats.max_lag_ms, 1000 * lag)
        if lag > tick:  # fell behind by a whole tick: skip it (the rate drops, no burst)
            stats.skipped_ticks += int(lag / tick)
            next_at = time.monotonic()
        elif lag < 0:
            stop.wait(-lag)
    stats.seconds = time.monotonic() - started
    out.send(asdict(stats))


class Media:
    """The media of all calls, from a forked process sharing a's socket (no GIL contention
    with the measurement). Also sends single packets from this process (`send`)."""

    def __init__(self, lab: Lab, plan: MediaPlan) -> None:
        self.plan = plan
        self.sock = lab.udp_socket("a", CALLER[0], CALLER[1])
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._stats, sender_end = context.Pipe(duplex=False)
        self._proc: BaseProcess = context.Process(
            target=_media_loop,
            args=(self.sock, plan, self._stop, sender_end),
            daemon=True,
            name="media",
        )
        self._proc.start()
        sender_end.close()

    def send(self, index: int, payload: bytes = PAYLOAD) -> None:
        self.sock.sendto(payload, relay_endpoint(index))

    def stop(self) -> MediaStats:
        self._stop.set()
        stats = MediaStats(last_error="media process did not report")
        if self._stats.poll(10):
            stats = MediaStats(**self._stats.recv())
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._stats.close()
        self.sock.close()
        return stats


# -- the daemon from a source tree ----------------------------------------------------------

# Puts the tree first on sys.path (before the cwd and the venv's editable finder), says
# where lrkp_tsl came from, then runs `lrkp-tsl` with the remaining arguments.
WRAPPER = (
    "import runpy, sys; tree = sys.argv[1]; sys.path.insert(0, tree); import lrkp_tsl; "
    "print('bench: lrkp_tsl imported from', lrkp_tsl.__file__, file=sys.stderr, flush=True); "
    "sys.argv = ['lrkp-tsl', *sys.argv[2:]]; "
    "runpy.run_module('lrkp_tsl.cli', run_name='__main__', alter_sys=True)"
)
IMPORTED = re.compile(r"^bench: lrkp_tsl imported from (.*)$", re.MULTILINE)


class TreeNode(Node):
    """Node (lrkp_lab/node.py), but `lrkp-tsl run` from the source tree `tree`."""

    def __init__(self, lab: Lab, host: str, tree: Path, *args: str) -> None:
        self.lab = lab
        self.host = host
        self.args = args
        self.tree = tree
        self.state = Path(tempfile.mkdtemp(prefix="lrkp-state-"))
        self.log = self.state / "node.log"
        argv = ["ip", "netns", "exec", lab.ns(host), sys.executable, "-c", WRAPPER, str(tree),
                "run", "--state-dir", str(self.state), *args]  # fmt: skip
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT)

    def imported_from(self) -> Path:
        """Where the daemon's lrkp_tsl came from; raises unless it is the tree's."""
        found = IMPORTED.search(self.output())
        if found is None:
            raise RuntimeError(f"the node did not say where lrkp_tsl came from:\n{self.output()}")
        path = Path(found.group(1)).resolve()
        if not path.is_relative_to(self.tree.resolve()):
            raise RuntimeError(f"the node imported lrkp_tsl from {path}, not from {self.tree}")
        return path


# -- measurements ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Pings:
    """`P` round trips, one at a time, every `interval` seconds."""

    started: float = 0.0
    rtt: list[float] = field(default_factory=list)  # seconds; a timeout counts as `timeout`
    at: list[float] = field(default_factory=list)  # when each was sent, from `started`
    timeouts: int = 0


def ping_loop(
    client: Controller, duration: float, interval: float, timeout: float, node: Node
) -> Pings:
    pings = Pings(started=time.monotonic())
    next_at = pings.started
    end = pings.started + duration
    while (now := time.monotonic()) < end:
        if next_at > now:
            time.sleep(next_at - now)
        sent = time.perf_counter()
        offset = time.monotonic() - pings.started
        reply = client.command(b"P", CONTROL, wait=timeout)
        elapsed = time.perf_counter() - sent
        if reply is None:
            if node.proc.poll() is not None:
                raise RuntimeError(f"node exited {node.proc.returncode}:\n{node.output()[-3000:]}")
            pings.timeouts += 1
            elapsed = timeout
        elif reply != b"P PONG":
            raise RuntimeError(f"unexpected reply to P: {reply!r}")
        pings.rtt.append(elapsed)
        pings.at.append(offset)
        next_at = max(next_at + interval, time.monotonic())  # late: the next one at once
    return pings


def summarise(pings: Pings, worst: int = 5) -> dict[str, Any]:
    ordered = sorted(pings.rtt)
    ms = [1000 * v for v in ordered]
    by_size = sorted(zip(pings.rtt, pings.at, strict=True), reverse=True)[:worst]
    return {
        "pings": len(ms),
        "timeouts": pings.timeouts,
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "p999_ms": percentile(ms, 0.999),
        "max_ms": ms[-1],
        **{f"over_{t}ms": sum(v > t for v in ms) for t in STALL_THRESHOLDS_MS},
        "worst": [{"ms": 1000 * rtt, "at_s": at} for rtt, at in by_size],
    }


def log_problems(text: str) -> list[str]:
    """Log lines at WARNING or above, and tracebacks."""
    return [
        line
        for line in text.splitlines()
        if re.search(r" (WARNING|ERROR|CRITICAL) ", line) or line.startswith("Traceback")
    ]


def git_commit(tree: Path) -> tuple[str, bool]:
    """The tree's HEAD and whether it has uncommitted changes (read-only git commands)."""
    git = ["git", "--no-optional-locks", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    return commit, bool(status.stdout.strip())


def append_row(path: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Append `row` to the JSON list in `path`; all rows."""
    rows: list[dict[str, Any]] = []
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
            rows = loaded if isinstance(loaded, list) else [loaded]
        except json.JSONDecodeError:
            print(f"bench: {path} is not JSON; starting a new list", file=sys.stderr)
    rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def map_elements(lab: Lab) -> int:
    """Elements of the node's dnat_to map (4 per call: RTP and RTCP, both directions)."""
    listing = lab.run("relay", "nft", "list", "map", "ip", "lrkp", "dnat_to", check=False).stdout
    return listing.count('comment "')


# -- the benchmark -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    tree: Path = args.tree.resolve()
    commit, dirty = git_commit(tree)
    sample = tuple(i * args.calls // args.sample for i in range(args.sample))
    tag = "event-loop"
    with Lab() as lab:
        prepare_lab(lab)
        drop = subprocess.run(["ip", "netns", "exec", lab.ns("b"), "nft", "-f", "-"],
                              input=B_DROP, text=True, capture_output=True)  # fmt: skip
        if drop.returncode != 0:
            raise RuntimeError(f"b: nft -f failed: {drop.stderr.strip()}")
        node = TreeNode(lab, "relay", tree, *node_args("warning", flush_on_exit=True))
        client = Controller(lab, "relay", CONTROL[0])
        media: Media | None = None
        ok = False
        try:
            node.wait_ready(CONTROL, client)
            imported = node.imported_from()
            print(f"bench: node from {imported} ({commit[:12]}{', dirty' if dirty else ''})")
            media = Media(lab, MediaPlan(args.calls, args.period, sample, args.sample_rate))
            filled = fill(client, range(args.calls), tag, args.window, on_ok=media.send)
            print(
                f"bench: filled {filled.calls:,} calls in {filled.seconds:.1f} s "
                f"({filled.rate:,.0f} S/s), {filled.resent} resent"
            )
            entries = wait_for_entries(lab, args.calls, args.period + 10)
            if entries < args.calls:
                print(f"bench: only {entries:,} conntrack entries for {args.calls:,} calls")
            time.sleep(args.warmup)
            pid = node.proc.pid
            cpu_before = cpu_seconds(pid)
            window_started = time.monotonic()
            pings = ping_loop(client, args.duration, args.interval, args.timeout, node)
            window = time.monotonic() - window_started
            cpu = cpu_seconds(pid) - cpu_before
            rss = rss_kib(pid)
            entries_after = conntrack_count(lab)
            media_stats = media.stop()
            media = None
            elements = map_elements(lab)
            if node.proc.poll() is not None:
                raise RuntimeError(f"node exited {node.proc.returncode} during the run")
            stop_started = time.monotonic()
            node.stop(timeout=120)
            stop_seconds = time.monotonic() - stop_started
            problems = log_problems(node.output())
            ok = True
        finally:
            if media is not None:
                media.stop()
            client.close()
            node.stop(timeout=120)
            if ok:
                shutil.rmtree(node.state, ignore_errors=True)
            else:
                print(f"bench: node log kept in {node.log}", file=sys.stderr)
    return {
        "time": now_iso(),
        "tree": str(tree),
        "commit": commit,
        "dirty": dirty,
        "calls": args.calls,
        "fill_s": filled.seconds,
        "fill_per_s": filled.rate,
        "fill_resent": filled.resent,
        "fill_stray_replies": filled.stray_replies,
        "conntrack_before": entries,
        "conntrack_after": entries_after,
        "map_elements_after": elements,
        "duration_s": window,
        "interval_ms": 1000 * args.interval,
        "timeout_s": args.timeout,
        **summarise(pings),
        "cpu_s": cpu,
        "cpu_pct_of_core": 100 * cpu / window,
        "rss_kib": rss,
        "stop_s": stop_seconds,
        "media": asdict(media_stats),
        "media_plan": {"period_s": args.period, "sample": args.sample, "rate": args.sample_rate},
        "log_problems": len(problems),
        "log_problem_lines": problems[:20],
    }


def report(row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    media = row["media"]
    print(
        f"\n{row['calls']:,} live calls, tree {row['tree']} at {row['commit'][:12]}"
        f"{' (dirty)' if row['dirty'] else ''}\n"
        f"  fill: {row['fill_s']:.1f} s, {row['fill_per_s']:,.0f} S/s, "
        f"{row['fill_resent']} resent, {row['fill_stray_replies']} duplicate replies\n"
        f"  kernel: {row['conntrack_before']:,} conntrack entries before, "
        f"{row['conntrack_after']:,} after; {row['map_elements_after']:,} dnat_to elements "
        f"after (4 per call: {4 * row['calls']:,})\n"
        f"  media: {media['periodic']:,} periodic + {media['sampled']:,} sample packets in "
        f"{media['seconds']:.0f} s, {media['errors']} send errors, "
        f"{media['skipped_ticks']} ticks skipped\n"
        f"  P every {row['interval_ms']:.0f} ms for {row['duration_s']:.0f} s: "
        f"{row['pings']:,} round trips, {row['timeouts']} timeouts\n"
        f"    p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
        f"p99.9 {row['p999_ms']:.2f} ms, max {row['max_ms']:.1f} ms; "
        f"over 50 ms: {row['over_50ms']}, over 200 ms: {row['over_200ms']}\n"
        f"    worst: "
        + ", ".join(f"{w['ms']:.0f} ms at +{w['at_s']:.1f} s" for w in row["worst"])
        + f"\n  daemon: {row['cpu_s']:.2f} s CPU over the window "
        f"({row['cpu_pct_of_core']:.1f}% of a core), RSS {row['rss_kib'] / 1024:.0f} MiB, "
        f"stopped in {row['stop_s']:.1f} s; {row['log_problems']} warnings/errors in its log"
    )
    for line in row["log_problem_lines"][:5]:
        print(f"    {line[:200]}")
    print(f"\n{'commit':<12} {'calls':>7} {'p50':>7} {'p99':>7} {'p99.9':>8} {'max':>8} "
          f"{'>50ms':>6} {'>200ms':>6} {'CPU%':>6}  time")  # fmt: skip
    for r in rows[-10:]:
        print(
            f"{r['commit'][:12]:<12} {r['calls']:>7,} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
            f"{r['p999_ms']:>8.2f} {r['max_ms']:>8.1f} {r['over_50ms']:>6} {r['over_200ms']:>6} "
            f"{r['cpu_pct_of_core']:>6.1f}  {r['time']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000, help="live calls (default 50,000)")
    parser.add_argument("--duration", type=float, default=60.0, help="measurement, seconds")
    parser.add_argument("--interval", type=float, default=0.010, help="seconds between P")
    parser.add_argument("--timeout", type=float, default=5.0, help="P timeout, seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    parser.add_argument("--window", type=int, default=64, help="S requests outstanding")
    parser.add_argument("--period", type=float, default=15.0, help="seconds between packets")
    parser.add_argument("--sample", type=int, default=100, help="calls with continuous media")
    parser.add_argument("--sample-rate", type=float, default=50.0, help="their packets/s")
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="source tree to run the daemon from (default: this one)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/event_loop.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    if not 1 <= args.calls <= MAX_CALLS:
        parser.error(f"--calls must be 1-{MAX_CALLS}")
    args.sample = min(args.sample, args.calls)
    if not (args.tree / "lrkp_tsl" / "__init__.py").is_file():
        parser.error(f"--tree {args.tree}: no lrkp_tsl package there")
    row = run(args)
    report(row, append_row(args.out, row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
