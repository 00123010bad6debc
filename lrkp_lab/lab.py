"""A lab of network namespaces: the relay, its two networks, parties, and a NAT box.

Used by the test suite, `make run` and the benchmarks. Every lab has a unique name prefix
that carries its creator's PID, so a lab left behind by a killed process is recognised and
swept by the next one (`python -m lrkp_lab.lab sweep`). Nothing is created in or changed
in the root namespace except transient veth ends that move at once.

    internal network 10.201.1.0/24            external network 10.201.2.0/24
      relay  int0 10.201.1.1 (internal IP)      relay  ext0 10.201.2.1 (external IP)
      relay2 int0 10.201.1.2 (a second node)    relay2 ext0 10.201.2.2
      sip    10.201.1.5   Kamailio              sip    10.201.2.5   Kamailio
      a      10.201.1.10  caller                x      10.201.2.10  callee
      b      10.201.1.11  callee                m      10.201.2.66  a stranger
      nat    10.201.1.20  NAT box, outside
      nat2   10.201.2.20  a second NAT box, outside (on the external network)
    caller LAN 10.201.3.0/24 (behind the NAT box, which remaps source ports)
      nat    10.201.3.1   NAT box, inside      c     10.201.3.10  caller behind NAT
    callee LAN 10.201.4.0/24 (behind the second NAT box)
      nat2   10.201.4.1   NAT box, inside      d     10.201.4.10  callee behind NAT

Each network is a bridge in a switch namespace; hosts reach only their own subnet (and c
reaches the internal network through the NAT), so any traffic between networks must be
relayed by the node.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from pyroute2 import netns as pyroute2_netns

PREFIX = "lrkpt"
NETNS_DIR = Path("/run/netns")

INTERNAL_IP = IPv4Address("10.201.1.1")
EXTERNAL_IP = IPv4Address("10.201.2.1")


@dataclass(frozen=True)
class Link:
    """One interface of a host, attached to a network (a bridge in the switch namespace)."""

    host: str
    ifname: str
    network: str
    address: str  # with prefix length


LINKS = (
    Link("relay", "int0", "int", f"{INTERNAL_IP}/24"),
    Link("relay", "ext0", "ext", f"{EXTERNAL_IP}/24"),
    Link("relay2", "int0", "int", "10.201.1.2/24"),
    Link("relay2", "ext0", "ext", "10.201.2.2/24"),
    Link("sip", "int0", "int", "10.201.1.5/24"),
    Link("sip", "ext0", "ext", "10.201.2.5/24"),
    Link("a", "eth0", "int", "10.201.1.10/24"),
    Link("b", "eth0", "int", "10.201.1.11/24"),
    Link("nat", "out0", "int", "10.201.1.20/24"),
    Link("x", "eth0", "ext", "10.201.2.10/24"),
    Link("m", "eth0", "ext", "10.201.2.66/24"),
    Link("nat", "in0", "lan", "10.201.3.1/24"),
    Link("c", "eth0", "lan", "10.201.3.10/24"),
    Link("nat2", "out0", "ext", "10.201.2.20/24"),
    Link("nat2", "in0", "lan2", "10.201.4.1/24"),
    Link("d", "eth0", "lan2", "10.201.4.10/24"),
)
HOSTS = tuple(dict.fromkeys(link.host for link in LINKS))
NETWORKS = tuple(dict.fromkeys(link.network for link in LINKS))
ROUTES = {"c": "10.201.3.1", "d": "10.201.4.1"}  # host -> default gateway
NAT_BOXES = ("nat", "nat2")

# The NAT box remaps source ports (random), like a carrier-grade or home NAT often does.
NAT_RULES = """
table ip labnat {
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "out0" masquerade random
	}
}
"""


def address(host: str, network: str | None = None) -> IPv4Address:
    """The lab address of `host` (on `network`, for hosts with several)."""
    for link in LINKS:
        if link.host == host and (network is None or link.network == network):
            return IPv4Address(link.address.split("/")[0])
    raise KeyError(f"lab has no host {host!r} on {network!r}")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lab_namespaces() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX + "-"))


def delete_namespace(name: str) -> None:
    """Kill what runs in `name`, then delete it (a namespace with processes lives on)."""
    pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    _run("ip", "netns", "del", name, check=False)


def sweep(everything: bool = False) -> list[str]:
    """Delete labs whose creating process is gone (or all labs, with `everything`)."""
    removed = []
    for name in lab_namespaces():
        try:
            pid = int(name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if everything or (pid != os.getpid() and not _pid_alive(pid)):
            delete_namespace(name)
            removed.append(name)
    return removed


class Lab:
    """A running lab; use as a context manager so it is always torn down."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.up = False

    def ns(self, host: str) -> str:
        """The namespace name of a lab host (see HOSTS)."""
        if host not in (*HOSTS, "sw"):
            raise KeyError(f"lab has no host {host!r}")
        return f"{self.tag}-{host}"

    def create(self) -> Lab:
        sweep()
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        self.up = True
        return self

    def _create(self) -> None:
        for host in ("sw", *HOSTS):
            _run("ip", "netns", "add", self.ns(host))
            _run("ip", "-n", self.ns(host), "link", "set", "lo", "up")
        sw = self.ns("sw")
        for network in NETWORKS:
            _run("ip", "-n", sw, "link", "add", network, "type", "bridge")
            _run("ip", "-n", sw, "link", "set", network, "up")
        for index, link in enumerate(LINKS):
            # Transient root-namespace names: unique per lab, at most 15 characters.
            here, there = f"lk{os.getpid() % 100000}{index}h", f"lk{os.getpid() % 100000}{index}s"
            ns = self.ns(link.host)
            _run("ip", "link", "add", here, "netns", ns, "type", "veth", "peer", there, "netns", sw)
            _run("ip", "-n", ns, "link", "set", here, "name", link.ifname)
            _run("ip", "-n", ns, "addr", "add", link.address, "dev", link.ifname)
            _run("ip", "-n", ns, "link", "set", link.ifname, "up")
            _run("ip", "-n", sw, "link", "set", there, "master", link.network)
            _run("ip", "-n", sw, "link", "set", there, "up")
        for host, gateway in ROUTES.items():
            _run("ip", "-n", self.ns(host), "route", "add", "default", "via", gateway)
        for box in NAT_BOXES:
            nat = self.ns(box)
            _run("ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            subprocess.run(
                ["ip", "netns", "exec", nat, "nft", "-f", "-"],
                input=NAT_RULES,
                text=True,
                check=True,
                capture_output=True,
            )

    def destroy(self) -> None:
        for host in (*HOSTS, "sw"):
            if (NETNS_DIR / self.ns(host)).exists():
                delete_namespace(self.ns(host))
        self.up = False

    def __enter__(self) -> Lab:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Run the block in `host`'s namespace: sockets made here stay bound to it."""
        pyroute2_netns.pushns(self.ns(host))
        try:
            yield
        finally:
            pyroute2_netns.popns()

    def udp_socket(self, host: str, ip: IPv4Address | str, port: int) -> socket.socket:
        with self.inside(host):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((str(ip), port))
        return sock

    def run(self, host: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.ns(host), *argv, check=check)

    def sysctl(self, host: str, name: str) -> str:
        """The value of sysctl `name` in `host`'s namespace."""
        return self.run(host, "sysctl", "-n", name).stdout.strip()

    def set_sysctl(self, host: str, name: str, value: str) -> None:
        self.run(host, "sysctl", "-qw", f"{name}={value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lrkp_lab.lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sweep_cmd = sub.add_parser("sweep", help="delete labs left by processes that are gone")
    sweep_cmd.add_argument("--all", action="store_true", help="delete every lab, live or not")
    sub.add_parser("list", help="list lab namespaces")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("lab: network namespaces need root", file=sys.stderr)
        return 1
    if args.command == "sweep":
        for name in sweep(everything=args.all):
            print(f"deleted {name}")
    else:
        print("\n".join(lab_namespaces()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
