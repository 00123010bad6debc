"""Sockets of this host that hold a relay port without a peer, found at startup.

The guard (rules/lrkp.nft, chain relay_port) lets a packet to a relay port through when the
kernel's own UDP lookup finds a local socket for it. A socket with a peer (connected) gets
only packets from that peer, and a call never loses anything to it. A socket without one
gets every packet to its address and port, and the kernel rule can only tell it apart from
a connected socket by its address:

- bound to 0.0.0.0 or :: ("wildcard"): the guard checks it after the calls, so it never
  takes a call's packets; but while a call uses its port, packets meant for it go to the
  call first (a reply to it could be taken for a party's first packet). Usually a client
  that sends with sendto() and got its port before the node reserved the range, or a
  service listening inside the range: the node warns, naming it;
- bound to a relay IP: indistinguishable from a connected socket, so the guard checks it
  before the calls and it would take the first packets of every call put on its port
  (those calls could never learn their parties). A service on the relay IP inside the
  relay range is a configuration conflict: the node refuses to start.

Read from /proc/net/udp and /proc/net/udp6, which list the sockets of the reader's network
namespace; the owning process from /proc/PID/fd (readable as root; otherwise the message
names the socket's user and inode only).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from lrkp_tsl.config import ConfigErrors
from lrkp_tsl.media import PortRange

log = logging.getLogger("lrkp_tsl.dataplane.localsockets")

PROC = Path("/proc")
UNCONNECTED = 0x07  # TCP_CLOSE: how /proc/net/udp shows a socket without a peer
ANY = IPv4Address("0.0.0.0")


@dataclass(frozen=True, slots=True)
class UdpSocket:
    """One line of /proc/net/udp{,6}: an IPv6 socket is shown by the IPv4 address it
    receives on (:: as 0.0.0.0, ::ffff:a.b.c.d as a.b.c.d), or not at all."""

    ip: IPv4Address
    port: int
    connected: bool
    uid: int
    inode: int
    family: str  # "udp" or "udp6"

    def describe(self, owner: str | None) -> str:
        shown = f"[::]:{self.port}" if self.family == "udp6" and self.ip == ANY else (
            f"{self.ip}:{self.port}")  # fmt: skip
        who = owner or f"uid {self.uid}, inode {self.inode}; `ss -uanp` names its process"
        return f"{self.family} {shown} ({who})"


def _address(hexed: str) -> IPv4Address | IPv6Address:
    """/proc/net/udp prints addresses as 32-bit words in host byte order."""
    words = [int(hexed[i : i + 8], 16) for i in range(0, len(hexed), 8)]
    raw = b"".join(struct.pack("=I", word) for word in words)
    return IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)


def parse(text: str, family: str) -> list[UdpSocket]:
    """The sockets of /proc/net/udp (`family` "udp") or /proc/net/udp6 ("udp6") that can
    receive IPv4 packets."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local_hex, port_hex = fields[1].split(":")
        address = _address(local_hex)
        if isinstance(address, IPv6Address):
            if address == IPv6Address("::"):
                ip = ANY
            elif address.ipv4_mapped is not None:
                ip = address.ipv4_mapped
            else:
                continue  # an IPv6 address: never an IPv4 packet's socket
        else:
            ip = address
        found.append(
            UdpSocket(
                ip,
                int(port_hex, 16),
                int(fields[3], 16) != UNCONNECTED,
                int(fields[7]),
                int(fields[9]),
                family,
            )
        )
    return found


@dataclass(frozen=True, slots=True)
class Holders:
    """Sockets without a peer on a relay port: `bound` to a relay IP, or `wildcard`."""

    bound: tuple[UdpSocket, ...]
    wildcard: tuple[UdpSocket, ...]


def holders(
    sockets: Iterable[UdpSocket], relay_addrs: Sequence[IPv4Address], ports: PortRange
) -> Holders:
    bound, wildcard = [], []
    for sock in sockets:
        if sock.connected or sock.port not in ports:
            continue
        if sock.ip == ANY:
            wildcard.append(sock)
        elif sock.ip in relay_addrs:
            bound.append(sock)
    return Holders(tuple(bound), tuple(wildcard))


def read_sockets(proc: Path = PROC) -> list[UdpSocket]:
    sockets = []
    for family in ("udp", "udp6"):
        try:
            sockets += parse((proc / "net" / family).read_text(), family)
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    return sockets


def owners(inodes: set[int], proc: Path = PROC) -> dict[int, str]:
    """inode -> "name (pid N)" for the sockets among `inodes` this process may look up."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    found: dict[int, str] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue  # gone, or not ours to read
        for link in links:
            if link in wanted:
                found.setdefault(wanted[link], f"{name}, pid {entry.name}")
    return found


def bound_problem(sock: UdpSocket, owner: str | None, ports: PortRange) -> str:
    return (
        f"{sock.describe(owner)} is bound to relay IP {sock.ip} on a relay port (ports = "
        f"{ports}) and has no peer: it would take the first packets of every call Kamailio "
        "puts on that port, so those calls could never learn where their parties are. Move "
        "that socket off the relay IP or out of the relay range, or change `ports`"
    )


def wildcard_warning(sock: UdpSocket, owner: str | None, ports: PortRange, fix: str) -> str:
    return (
        f"{sock.describe(owner)} holds relay port {sock.port} on every address without a "
        "peer: it gets the packets to that port that belong to no call (the guard lets them "
        "through), but while a call uses the port, packets sent to it go to the call first "
        f"(ports = {ports}); {fix}"
    )


# What to do about a wildcard socket: the reservation keeps a restarted process off the range.
RESTART_NOW = "restart that process: the relay range is now reserved, so it gets a port outside"
RESTART_LATER = (
    "restart that process once the node runs: the node reserves the relay range, so it then "
    "gets a port outside"
)
MOVE = "move it out of the relay range"


def check(relay_addrs: Sequence[IPv4Address], ports: PortRange) -> Holders:
    """Refuse a socket bound to a relay IP on a relay port without a peer (ConfigErrors);
    return every such socket, those on the wildcard address included (warned by `warn`)."""
    found = holders(read_sockets(), relay_addrs, ports)
    if found.bound:
        named = owners({sock.inode for sock in found.bound})
        raise ConfigErrors(
            [bound_problem(sock, named.get(sock.inode), ports) for sock in found.bound]
        )
    return found


def warn(wildcard: Sequence[UdpSocket], ports: PortRange, reserved: bool) -> None:
    if not wildcard:
        return
    named = owners({sock.inode for sock in wildcard})
    fix = RESTART_NOW if reserved else MOVE
    for sock in wildcard:
        log.warning("%s", wildcard_warning(sock, named.get(sock.inode), ports, fix))
