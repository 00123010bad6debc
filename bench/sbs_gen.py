"""The traffic generator: rtpgen.c compiled here, run in A (load, round trips) and B (echo)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from sbs_lab import A_IP, A_PORT, B_IP, B_PORT, GEN_CPU, HERE, Topo, sh


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


class Soaker:
    """`rtpgen soak` on one core: how much of its idle-core loop rate it keeps while the
    relay works there. The relay's share of the core = 1 - kept (see do_soak in rtpgen.c for
    why the rate and not the soaker's CPU time)."""

    def __init__(self, binary: Path, cpu: int, most_s: float) -> None:
        self.proc = subprocess.Popen(
            [str(binary), "soak", "-C", str(cpu), "-t", str(most_s)],
            stdout=subprocess.PIPE,
            text=True,
        )
        # Wait for its handlers (a SIGUSR1 before them would end it), not a fixed sleep that
        # a loaded machine outlasts.
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if '"ready"' not in ready:
            raise RuntimeError(f"soaker did not start: {ready!r} (exit {self.proc.poll()})")

    def mark(self) -> None:
        """The window starts now."""
        self.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> float:
        """Loop iterations per second since `mark`."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=5)
        marks = [json.loads(line) for line in out.splitlines() if line.startswith('{"t"')]
        if len(marks) < 2 or marks[-1]["t"] <= marks[0]["t"]:
            raise RuntimeError(f"soaker: no window marked in {out!r}")
        first, last = marks[0], marks[-1]
        return float((last["iters"] - first["iters"]) / (last["t"] - first["t"]))

    @classmethod
    def idle_rate(cls, binary: Path, cpu: int, secs: float) -> float:
        """The loop rate on the core while nothing else runs there."""
        soaker = cls(binary, cpu, secs + 5)
        soaker.mark()
        time.sleep(secs)
        return soaker.stop()
