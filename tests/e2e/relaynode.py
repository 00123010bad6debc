"""The node as the e2e tests run it behind Kamailio (`lrkp-tsl run` in a relay namespace),
and what it leaves in the kernel."""

from __future__ import annotations

from lrkp_lab.lab import Lab
from lrkp_lab.node import Node

IDLE = 3.0
# (host, internal IP, external IP): the node lrkproxy_sock points at first, and a second one.
NODE1 = ("relay", "10.201.1.1", "10.201.2.1")
NODE2 = ("relay2", "10.201.1.2", "10.201.2.2")
PORTS = "20000-21999"


def start_node(
    lab: Lab, host: str, internal: str, external: str, idle: float = IDLE, ports: str = PORTS
) -> Node:
    """A node on `host`, control on its internal IP, Kamailio allowed; up when returned."""
    node = Node(
        lab,
        host,
        "--internal-ip",
        internal,
        "--external-ip",
        external,
        "--ports",
        ports,
        "--control",
        f"udp:{internal}:22333",
        "--allow",
        "10.201.1.5",
        "--idle-timeout",
        str(idle),
        "--flush-on-exit",
    )
    node.wait_log("node up", 15)
    return node


def conntrack(lab: Lab, host: str) -> str:
    """`conntrack -L -p udp` in `host`'s namespace."""
    return lab.run(host, "conntrack", "-L", "-p", "udp", check=False).stdout
