"""Debian's rtpengine (10.5 on Debian 12), run in userspace in a lab namespace.

`scripts/install-bench-deps.sh` installs it and keeps its own service from starting. Here
it runs as the differential tests need it: no kernel module (`--table=-1`), no config file,
deletes at once (`--delete-delay=0`, as the node's lrkproxy `D`), and two named interfaces,
`internal` and `external`, on the relay's two lab addresses, which is how Kamailio's
`direction=internal direction=external` names them. Its ng socket is on loopback for the
differential tests, and on the relay's internal address (`ng_ip`) for Kamailio's
`rtpengine` module in the e2e tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from ipaddress import IPv4Address
from pathlib import Path

from lrkp_lab.lab import Lab
from lrkp_lab.ngpeer import UdpNgPeer
from lrkp_lab.processes import terminate

BINARY = "rtpengine"


def available() -> bool:
    return shutil.which(BINARY) is not None


LOOPBACK = IPv4Address("127.0.0.1")


def argv(
    internal: IPv4Address,
    external: IPv4Address,
    ng_port: int,
    ports: tuple[int, int],
    ng_ip: IPv4Address = LOOPBACK,
) -> list[str]:
    return [
        BINARY,
        "--config-file=none",
        "--foreground",
        "--log-stderr",
        "--log-level=6",
        "--table=-1",
        f"--interface=internal/{internal}",
        f"--interface=external/{external}",
        f"--listen-ng={ng_ip}:{ng_port}",
        f"--port-min={ports[0]}",
        f"--port-max={ports[1]}",
        "--delete-delay=0",
        "--num-threads=2",
    ]


class Rtpengine:
    """rtpengine in `host`'s namespace of `lab`, until `stop` (use as a context manager)."""

    def __init__(
        self,
        lab: Lab,
        host: str,
        internal: IPv4Address,
        external: IPv4Address,
        log: Path,
        ng_port: int = 2223,
        ports: tuple[int, int] = (30000, 30999),
        ng_ip: IPv4Address = LOOPBACK,
    ) -> None:
        self.lab, self.host, self.ng_port, self.log_path = lab, host, ng_port, log
        self.ng_ip = ng_ip
        self.command = argv(internal, external, ng_port, ports, ng_ip)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Rtpengine:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.ns(self.host), *self.command],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rtpengine exited ({self.proc.returncode}): see {self.log_path}"
                )
            peer = self.peer(timeout=0.2)
            try:
                if peer.request({"command": "ping"}).get("result") == "pong":
                    return self
            except OSError:
                pass
            finally:
                peer.close()
        self.stop()
        raise RuntimeError(f"rtpengine did not answer ping within 20 s: see {self.log_path}")

    def peer(self, timeout: float = 5.0) -> UdpNgPeer:
        with self.lab.inside(self.host):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return UdpNgPeer("rtpengine", sock, (str(self.ng_ip), self.ng_port), timeout)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        self.proc = None

    def __enter__(self) -> Rtpengine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
