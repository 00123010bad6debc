"""Restart time and memory of the daemon with many live calls.

Runs as root in a lab: the real daemon (`lrkp-tsl run`, this tree, --log-level info, no
--flush-on-exit so that a stopped node leaves its calls in the kernel) in the relay
namespace. For each size in --sizes a fresh node (new state directory, empty kernel) is
filled with that many calls in shared-port geometry (gt=1, as bench/event_loop.py: a
10.201.1.10:4000 <-> b 10.201.1.11:6000, relay IP alternating internal/external), each with
one packet right after its `OK` and then one every --period seconds, so every call has a
conntrack entry and none goes idle.

- Memory: the daemon's VmRSS right after startup (0 calls) and once filled: RSS per live
  call = (RSS_N - RSS_0) / N; and its RSS after each restart.
- Restart: SIGTERM, then a new node on the same state directory; measured from the new
  process's start to (a) the first `P` answered (a `P` every 10 ms) and (b) the log line
  `restored N calls from the store` (its timestamp); the daemon's own `restore took X s`.
  At the largest size, once more with SIGKILL.
- After each restart, --verify calls spread over the range must still relay: a packet from
  a to each call's relay endpoint must reach b (a socket at 10.201.1.11:6000) from it.

    PYTHONPATH=. .venv/bin/python bench/restart.py [--sizes 10000,50000]

Lab, fill and media helpers come from bench/event_loop.py (imported as a sibling script).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import select
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from event_loop import (
    CALLEE,
    CONTROL,
    MAX_CALLS,
    REPO,
    Media,
    MediaPlan,
    append_row,
    conntrack_count,
    fill,
    git_commit,
    log_problems,
    node_args,
    now_iso,
    prepare_lab,
    relay_endpoint,
    wait_for_entries,
)

from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, Node
from lrkp_lab.processes import rss_kib

RESTORED = re.compile(r"^(\S+ \S+) INFO \S+: restored (\d+) calls from the store", re.MULTILINE)
RESTORED_HOW = re.compile(r"(\d+) intact in the kernel, (\d+) repaired, (\d+) reinstalled")
RESTORE_TOOK = re.compile(r"restore took ([0-9.]+) s")
NODE_UP = re.compile(r"^(\S+ \S+) INFO \S+: node up:", re.MULTILINE)
PING_EVERY = 0.010


def log_time(stamp: str) -> float:
    """A log line's `asctime` (local time, milliseconds) as a Unix time."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Restart:
    signal: str
    stop_s: float  # from the signal to the old process's exit
    first_pong_s: float  # from the new process's start
    restored_log_s: float  # from the new process's start to the `restored` line's timestamp
    node_up_s: float
    restore_took_s: float  # as the daemon logs it
    restored_calls: int
    intact: int  # of the restored calls: found complete in the kernel (-1: not logged)
    repaired: int
    reinstalled: int
    rss_after_kib: int
    verified: int
    verify_sample: int
    wrong_source: int


def restart(
    node: Node, sig: signal.Signals, client: Controller, timeout: float
) -> tuple[Node, Restart]:
    """Stop `node` with `sig`, start it again on its state; time the new one's startup."""
    stop_started = time.monotonic()
    node.stop(sig, timeout=120)
    stop_s = time.monotonic() - stop_started
    while select.select([client.sock], [], [], 0)[0]:
        client.sock.recv(4096)  # late answers to the old node
    started_wall, started = time.time(), time.monotonic()
    new = Node(node.lab, node.host, *node.args, state=node.state)
    first_pong: float | None = None
    restored: re.Match[str] | None = None
    next_ping = started
    while True:
        now = time.monotonic()
        if restored is None:
            restored = RESTORED.search(new.output())
        if first_pong is not None and restored is not None:
            break
        if now - started > timeout:
            raise RuntimeError(f"restart not done in {timeout} s:\n{new.output()[-3000:]}")
        if new.proc.poll() is not None:
            raise RuntimeError(f"node exited {new.proc.returncode}:\n{new.output()[-3000:]}")
        if first_pong is None and now >= next_ping:
            client.send(client.cookie() + b" P", CONTROL)
            next_ping = now + PING_EVERY
        if select.select([client.sock], [], [], max(0.001, next_ping - now))[0]:
            if client.sock.recv(4096).endswith(b" P PONG") and first_pong is None:
                first_pong = time.monotonic() - started
        elif first_pong is not None:
            time.sleep(PING_EVERY)  # only the log line to wait for
    output = new.output()
    took = RESTORE_TOOK.search(output)
    how = RESTORED_HOW.search(output[restored.start() :])
    intact, repaired, reinstalled = (int(n) for n in how.groups()) if how else (-1, -1, -1)
    up = NODE_UP.search(output)
    return new, Restart(
        signal=sig.name,
        stop_s=stop_s,
        first_pong_s=first_pong,
        restored_log_s=log_time(restored.group(1)) - started_wall,
        node_up_s=log_time(up.group(1)) - started_wall if up else float("nan"),
        restore_took_s=float(took.group(1)) if took else float("nan"),
        restored_calls=int(restored.group(2)),
        intact=intact,
        repaired=repaired,
        reinstalled=reinstalled,
        rss_after_kib=0,
        verified=0,
        verify_sample=0,
        wrong_source=0,
    )


def verify(media: Media, callee: socket.socket, indices: list[int], tag: int) -> tuple[int, int]:
    """Send one packet to each call's relay endpoint from a; (delivered to b from that
    endpoint, delivered from anywhere else)."""
    while select.select([callee], [], [], 0)[0]:
        callee.recv(4096)  # the periodic media
    expected = {b"verify-%d-%d" % (tag, i): relay_endpoint(i) for i in indices}
    for payload, endpoint in expected.items():
        media.sock.sendto(payload, endpoint)
    delivered = wrong = 0
    deadline = time.monotonic() + 3.0
    while expected and (left := deadline - time.monotonic()) > 0:
        if not select.select([callee], [], [], left)[0]:
            break
        data, source = callee.recvfrom(4096)
        want = expected.pop(data, None)
        if want is None:
            continue
        if source == want:
            delivered += 1
        else:
            wrong += 1
    return delivered, wrong


def settle_rss(pid: int, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    return rss_kib(pid)


def run_size(
    lab: Lab, client: Controller, callee: socket.socket, size: int, kill: bool, args: Any
) -> dict[str, Any]:
    node = Node(lab, "relay", *node_args("info", flush_on_exit=False))
    media: Media | None = None
    states = {node.state}
    ok = False
    try:
        node.wait_ready(CONTROL, client)
        rss0 = settle_rss(node.proc.pid, 1.0)
        media = Media(lab, MediaPlan(size, args.period))
        filled = fill(client, range(size), "restart", args.window, on_ok=media.send)
        print(
            f"bench: {size:,} calls filled in {filled.seconds:.1f} s ({filled.rate:,.0f} S/s), "
            f"{filled.resent} resent"
        )
        entries = wait_for_entries(lab, size, args.period + 10)
        rss_n = settle_rss(node.proc.pid)
        sample = sorted({i * size // args.verify for i in range(args.verify)})
        restarts: list[Restart] = []
        for sig in (signal.SIGTERM, signal.SIGKILL) if kill else (signal.SIGTERM,):
            node, result = restart(node, sig, client, args.restart_timeout)
            states.add(node.state)
            result.rss_after_kib = settle_rss(node.proc.pid, 1.0)
            result.verify_sample = len(sample)
            result.verified, result.wrong_source = verify(media, callee, sample, len(restarts))
            restarts.append(result)
            if result.restored_calls != size or result.verified != len(sample):
                print(f"bench: WARNING: {size:,} calls, {result.restored_calls:,} restored, "
                      f"{result.verified}/{len(sample)} relayed after {sig.name}")  # fmt: skip
            print(
                f"bench: {sig.name} restart: first P after {result.first_pong_s:.2f} s, "
                f"'restored {result.restored_calls}' after {result.restored_log_s:.2f} s "
                f"({result.intact} intact, {result.repaired} repaired, "
                f"{result.reinstalled} reinstalled), {result.verified}/{len(sample)} relayed"
            )
        problems = log_problems(node.output())
        media_stats = media.stop()
        media = None
        ok = True
    finally:
        if media is not None:
            media.stop()
        node.close()
        if ok:
            for state in states:
                shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"bench: node logs kept in {', '.join(map(str, states))}", file=sys.stderr)
    return {
        "calls": size,
        "fill_s": filled.seconds,
        "fill_per_s": filled.rate,
        "fill_resent": filled.resent,
        "conntrack": entries,
        "rss0_kib": rss0,
        "rss_kib": rss_n,
        "kib_per_call": (rss_n - rss0) / size,
        "restarts": [vars(r) for r in restarts],
        "media_errors": media_stats.errors,
        "log_problems": len(problems),
        "log_problem_lines": problems[:20],
    }


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'calls':>7} {'RSS0':>6} {'RSS_N':>6} {'KiB/call':>8} | {'signal':<7} {'stop':>6} "
        f"{'1st P':>6} {'restored':>8} {'node up':>7} {'restore':>7} {'RSS':>6} {'relayed':>8}"
    )
    for row in rows:
        for n, r in enumerate(row["restarts"]):
            rss0, rss_n = row["rss0_kib"] / 1024, row["rss_kib"] / 1024
            memory = (
                f"{row['calls']:>7,} {rss0:>5.0f}M {rss_n:>5.0f}M {row['kib_per_call']:>8.2f}"
                if n == 0
                else " " * 30
            )
            print(
                f"{memory} | {r['signal']:<7} {r['stop_s']:>5.2f}s {r['first_pong_s']:>5.2f}s "
                f"{r['restored_log_s']:>7.2f}s {r['node_up_s']:>6.2f}s "
                f"{r['restore_took_s']:>6.2f}s "
                f"{r['rss_after_kib'] / 1024:>5.0f}M {r['verified']:>4}/{r['verify_sample']:<3}"
            )
    print(
        "(RSS0/RSS_N: after startup / once filled; stop: signal to exit; 1st P, restored, "
        "node up: from the new process's start; restore: as the daemon logs it)"
    )
    for row in rows:
        if row["fill_resent"] or row["media_errors"] or row["log_problems"]:
            print(
                f"{row['calls']:,} calls: {row['fill_resent']} S resent, {row['media_errors']} "
                f"media send errors, {row['log_problems']} warnings/errors in the node's log"
            )
            for line in row["log_problem_lines"][:5]:
                print(f"    {line[:200]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000", help="live calls, comma-separated")
    parser.add_argument("--verify", type=int, default=100, help="calls checked after restarts")
    parser.add_argument("--window", type=int, default=64, help="S requests outstanding")
    parser.add_argument("--period", type=float, default=15.0, help="seconds between packets")
    parser.add_argument("--restart-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/restart.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not all(1 <= s <= MAX_CALLS for s in sizes):
        parser.error(f"--sizes must be within 1-{MAX_CALLS}")
    commit, dirty = git_commit(REPO)
    rows = []
    with Lab() as lab:
        prepare_lab(lab)
        callee = lab.udp_socket("b", CALLEE[0], CALLEE[1])  # unread between checks: drops
        client = Controller(lab, "relay", CONTROL[0])
        try:
            for size in sizes:
                rows.append(run_size(lab, client, callee, size, size == sizes[-1], args))
                if conntrack_count(lab) > 10:
                    print("bench: conntrack entries left after the node was closed")
        finally:
            client.close()
            callee.close()
    report(rows)
    append_row(args.out, {"time": now_iso(), "commit": commit, "dirty": dirty, "sizes": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
