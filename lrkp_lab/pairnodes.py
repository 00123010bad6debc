"""A running active/standby pair in the lab: both Redis servers, keepalived and both nodes.

relay (10.201.1.1) and relay2 (10.201.1.2) share the VIPs 10.201.1.100 (internal) and
10.201.2.100 (external); the node on relay holds them first (active), the node on relay2
follows it through Redis. Shared by the pair tests and bench/pair.py.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from lrkp_lab import scraping
from lrkp_lab.lab import Lab
from lrkp_lab.node import Node, clear_host
from lrkp_lab.pairlab import EXTERNAL_VIP, INTERNAL_VIP, Pair
from lrkp_lab.redis import RedisServer
from lrkp_tsl.dataplane.nft import TABLE

CONTROL = (str(INTERNAL_VIP), 22333)
IDLE = 5.0
RATE = 50  # packets per second each way
HOSTS = {"relay": "10.201.1.1", "relay2": "10.201.1.2"}


METRICS = ("127.0.0.1", 9733)  # each node's, in its own namespace


def node_args(
    redis: RedisServer, peer: RedisServer, idle: float = IDLE, extra: tuple[str, ...] = ()
) -> tuple[str, ...]:
    return (
        "--internal-ip", str(INTERNAL_VIP), "--external-ip", str(EXTERNAL_VIP),
        "--ports", "20000-21999", "--control", f"udp:{CONTROL[0]}:{CONTROL[1]}",
        "--allow", "10.201.1.5", "--idle-timeout", f"{idle:g}", "--log-level", "debug",
        "--pair-redis", redis.url, "--pair-peer-redis", peer.tcp_url,
        "--metrics-listen", f"{METRICS[0]}:{METRICS[1]}", *extra,
    )  # fmt: skip


def flows(lab: Lab, host: str) -> set[tuple[str, str]]:
    """The (key, data) of every element of the host's dnat_to map."""
    listing = lab.run(host, "nft", "-j", "list", "map", "ip", TABLE, "dnat_to").stdout
    found = set()
    for item in json.loads(listing)["nftables"]:
        for key, data in item.get("map", {}).get("elem", []):
            value = key["elem"]["val"] if "elem" in key else key
            found.add((json.dumps(value["concat"]), json.dumps(data["concat"])))
    return found


def wait_same_flows(lab: Lab, timeout: float) -> float:
    started = time.monotonic()
    while flows(lab, "relay") != flows(lab, "relay2"):
        assert time.monotonic() - started < timeout, "the standby's maps differ"
        time.sleep(0.02)
    return time.monotonic() - started


@dataclass
class Members:
    lab: Lab
    keepalived: Pair
    redis: dict[str, RedisServer]
    nodes: dict[str, Node]
    started: list[Node]
    idle: float = IDLE
    extra: tuple[str, ...] = ()  # more arguments for both nodes (e.g. `--ng`)

    def start_node(self, host: str, state: Path | None = None) -> Node:
        peer = "relay2" if host == "relay" else "relay"
        args = node_args(self.redis[host], self.redis[peer], self.idle, self.extra)
        node = Node(self.lab, host, *args, state=state)
        self.nodes[host] = node
        self.started.append(node)
        node.wait_log("node up", 20)
        return node

    def ctl(self, host: str, *argv: str) -> dict[str, Any]:
        """`lrkp-ctl --json ARGV` against the node on `host`: its result."""
        done = self.lab.run(host, sys.executable, "-m", "lrkp_tsl.ctl", "--json", *argv)
        return cast(dict[str, Any], json.loads(done.stdout))

    def pair_status(self, host: str) -> dict[str, Any]:
        """The node's pair health, as `lrkp-ctl ping` shows it."""
        return cast(dict[str, Any], self.ctl(host, "ping")["pair"])

    def metrics(self, host: str) -> dict[str, float]:
        """The node's /metrics (read from inside its namespace): unlabelled samples by name."""
        samples = scraping.metrics(self.lab, host, METRICS[1], METRICS[0])
        return {name: value for (name, labels), value in samples.items() if not labels}


@contextlib.contextmanager
def running_pair(
    lab: Lab, *, idle: float = IDLE, examples: bool = False, extra: tuple[str, ...] = ()
) -> Iterator[Members]:
    """Both Redis servers, keepalived (relay first: it holds the VIPs) and both nodes; all
    stopped, and the namespaces cleared, at the end.

    `examples`: Redis and keepalived run examples/redis-pair.conf and
    examples/keepalived.conf as shipped, with only addresses, interfaces and paths filled
    in (lrkp_lab.redis.example_substitutions, lrkp_lab.pairlab.example_substitutions).
    `extra`: more arguments for both nodes."""
    redis = {host: RedisServer(lab, host, ip, example=examples) for host, ip in HOSTS.items()}
    pair = Pair(lab, example=examples)
    made = Members(lab, pair, redis, {}, [], idle, extra)
    try:
        for server in redis.values():
            server.start()
        pair.start(first="relay")
        active = made.start_node("relay")
        active.wait_log("active: this node holds the relay addresses", 5)
        standby = made.start_node("relay2")
        standby.wait_log("following: the active node's table loaded", 10)
        yield made
    finally:
        for node in made.started:
            node.stop(signal.SIGKILL)
        pair.close()
        for server in redis.values():
            server.stop()
            server.remove()
        for host in (*HOSTS, "nat"):
            clear_host(lab, host)


LONE_CONTROL = ("127.0.0.1", 22333)
LONE_PORTS = (1024, 65535)


@contextlib.contextmanager
def lone_active(
    lab: Lab, *extra: str, replica: bool = True
) -> Iterator[tuple[Node, dict[str, RedisServer]]]:
    """One node in pair mode on `relay`, active at once: its relay addresses are relay's
    own (10.201.1.1, 10.201.2.1), so no keepalived is needed. Its Redis on relay, the
    peer's on relay2 (a replica of it, unless `replica` is false: on this one VM the
    replica's CPU would be the active host's, as it never is in a real pair); control on
    loopback, relay ports 1024-65535 (room
    for 16,000 calls per relay address), metrics on. For what pair mode costs the active
    (bench/control_clients.py --pair) and how Redis's troubles reach it
    (tests/netns/test_pair_stall.py)."""
    redis = {host: RedisServer(lab, host, ip) for host, ip in HOSTS.items()}
    node: Node | None = None
    try:
        for server in redis.values():
            server.start()
        if replica:
            client = redis["relay2"].client()
            client.replicaof(HOSTS["relay"], redis["relay"].port)
            client.close()
        node = Node(
            lab, "relay",
            "--internal-ip", HOSTS["relay"], "--external-ip", "10.201.2.1",
            "--ports", f"{LONE_PORTS[0]}-{LONE_PORTS[1]}",
            "--control", f"udp:{LONE_CONTROL[0]}:{LONE_CONTROL[1]}",
            "--pair-redis", redis["relay"].url, "--pair-peer-redis", redis["relay2"].tcp_url,
            "--metrics-listen", f"{METRICS[0]}:{METRICS[1]}", "--flush-on-exit", *extra,
        )  # fmt: skip
        node.wait_log("active: this node holds the relay addresses", 20)
        yield node, redis
    finally:
        if node is not None:
            node.stop()
        for server in redis.values():
            server.remove()
        clear_host(lab, "relay")
