"""The media relay an ng end-to-end test runs against: Debian's rtpengine, or the node.

Both sit in the lab's `relay` namespace with rtpengine's two named interfaces, `internal`
(10.201.1.1) and `external` (10.201.2.1), and their ng socket on 10.201.1.1:2223, where
Kamailio's `rtpengine` module (examples/kamailio-rtpengine.cfg) sends its commands. A test
takes an `NgRelay` and does not care which one it got, except for what only a kernel relay
shows (`kernel`: the media in conntrack) and the relay's own log.

    rtpengine   runs now: userspace forwarding (`--table=-1`), deletes at once
                (`--delete-delay=0`), relay ports 30000-30999
    node        `lrkp-tsl run --ng udp:10.201.1.1:2223`, relay ports 20000-21999; usable
                once `lrkp-tsl run --help` offers `--ng` (`node_serves_ng()`)
"""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lrkp_lab import rtpengine
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.ngpeer import UdpNgPeer
from lrkp_lab.node import LRKP_TSL, Node

NG_PORT = 2223
NG_ADDRESS = (str(INTERNAL_IP), NG_PORT)
NG_URL = f"udp:{INTERNAL_IP}:{NG_PORT}"
KAMAILIO_IP = "10.201.1.5"  # the `sip` host: the only controller the node allows
RTPENGINE_PORTS = (30000, 30999)
NODE_PORTS = (20000, 21999)
NODE_IDLE = 60  # no test call may end by expiry: only `delete` ends one


@dataclass
class NgRelay:
    """A running relay with an ng socket at NG_ADDRESS in the lab's `relay` namespace."""

    name: str  # "rtpengine" or "node": the test id
    lab: Lab
    ports: tuple[int, int]  # its relay port range
    kernel: bool  # the media is carried by kernel conntrack NAT (the node), not a process
    log_path: Path
    node: Node | None = None

    @property
    def url(self) -> str:
        return NG_URL

    def log(self) -> str:
        if self.node is not None:
            return self.node.output()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @contextlib.contextmanager
    def peer(self, timeout: float = 5.0) -> Iterator[UdpNgPeer]:
        """An ng client in Kamailio's namespace, on its address (the node allows it)."""
        sock = self.lab.udp_socket("sip", KAMAILIO_IP, 0)
        peer = UdpNgPeer(self.name, sock, NG_ADDRESS, timeout)
        try:
            yield peer
        finally:
            peer.close()

    def calls(self) -> list[str]:
        """The Call-IDs the relay holds (ng `list`)."""
        with self.peer() as peer:
            reply = peer.request({"command": "list", "limit": 1000})
        if reply.get("result") != "ok":
            raise RuntimeError(f"{self.name}: list failed: {reply}")
        return [str(call_id) for call_id in reply.get("calls", [])]


@functools.cache
def node_serves_ng() -> bool:
    """Whether this checkout's `lrkp-tsl run` has the `--ng` option (issue 20's wiring)."""
    done = subprocess.run(
        [*LRKP_TSL, "run", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return re.search(r"(^|[\s\[])--ng(\s|=|$)", done.stdout, re.MULTILINE) is not None


def node_args() -> tuple[str, ...]:
    return (
        "--internal-ip", str(INTERNAL_IP), "--external-ip", str(EXTERNAL_IP),
        "--ports", f"{NODE_PORTS[0]}-{NODE_PORTS[1]}",
        "--control", f"udp:{INTERNAL_IP}:22333",
        "--ng", NG_URL,
        "--allow", KAMAILIO_IP,
        "--idle-timeout", str(NODE_IDLE),
        "--flush-on-exit",
    )  # fmt: skip


@contextlib.contextmanager
def running_rtpengine(lab: Lab, workdir: Path) -> Iterator[NgRelay]:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "rtpengine.log"
    with rtpengine.Rtpengine(
        lab, "relay", INTERNAL_IP, EXTERNAL_IP, log, NG_PORT, RTPENGINE_PORTS, INTERNAL_IP
    ):
        yield NgRelay("rtpengine", lab, RTPENGINE_PORTS, kernel=False, log_path=log)


@contextlib.contextmanager
def running_node(lab: Lab, workdir: Path, timeout: float = 20.0) -> Iterator[NgRelay]:
    node = Node(lab, "relay", *node_args())
    relay = NgRelay("node", lab, NODE_PORTS, kernel=True, log_path=node.log, node=node)
    try:
        deadline = time.monotonic() + timeout
        while not _pongs(relay):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node not answering ng ping on {NG_URL}:\n{node.output()}")
            time.sleep(0.1)
        yield relay
    finally:
        node.close()
        for box in ("nat", "nat2"):
            lab.run(box, "conntrack", "-F", check=False)


def _pongs(relay: NgRelay) -> bool:
    try:
        with relay.peer(timeout=0.3) as peer:
            return peer.request({"command": "ping"}).get("result") == "pong"
    except OSError:  # socket.timeout included
        return False
