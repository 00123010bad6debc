"""CPU and memory accounting from /proc: the relay core's cost and other sessions' noise."""

from __future__ import annotations

import os

USER_HZ = os.sysconf("SC_CLK_TCK")


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
