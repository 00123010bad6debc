"""The traffic generator: rtpgen.c compiled here, run in A (load, round trips) and B (echo)."""

from __future__ import annotations

import json
import subprocess
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
