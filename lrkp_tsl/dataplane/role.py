"""Which role this node's namespace is in, as the kernel sees it: are the virtual IPs here?

In a pair, keepalived (VRRP) moves the relay's virtual IPs between the two nodes; the node
that holds them is the active one. `local_addresses_present` answers "are all of these
addresses assigned in my network namespace right now?" without spawning a process, cheaply
enough to poll every 50 ms (~15 µs per address).

How: bind a throwaway UDP socket to (ip, 0) *without* IP_FREEBIND. The kernel accepts the
bind only if the address is local (EADDRNOTAVAIL otherwise). Two things make that test lie,
both per network namespace:

- `net.ipv4.ip_nonlocal_bind=1` lets any bind succeed. It is read on every call (one small
  /proc read); when it is 1, or cannot be read, the answer comes instead from a netlink
  RTM_GETADDR dump of the namespace's IPv4 addresses (`local_ipv4_addresses`, parsed with
  struct), which no sysctl affects. This fallback, not an error: a dump of a few
  addresses costs ~20 µs here, as much as the bind test, but grows with the number of
  addresses in the namespace where the bind test does not.
- an "AnyIP" route (`ip route add local 10.0.0.0/8 dev lo`) makes every address in it bindable
  although none is assigned; the bind test then says present (the netlink dump does not):
  keep such routes away from the VIPs on a pair node.

`freebind_udp_socket` is the other half: a socket bound to a virtual IP that is not (yet) on
this host, so a standby can already listen on the address it will own after a takeover.

All sockets belong to the network namespace of the calling *thread* when they are created
(see `Lab.inside`), and the sysctl is read through /proc in that same thread.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

from lrkp_tsl.udpbatch import IP_FREEBIND as IP_FREEBIND  # re-exported for the tests
from lrkp_tsl.udpbatch import udp_socket

NONLOCAL_BIND = Path("/proc/sys/net/ipv4/ip_nonlocal_bind")

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTATTR = struct.Struct("=HH")  # len, type
NETLINK_TIMEOUT = 2.0  # a dump of one namespace's addresses answers in microseconds


class AddressCheckError(OSError):
    """The namespace's addresses could not be read (netlink refused or answered garbage)."""


def nonlocal_bind_enabled() -> bool | None:
    """`net.ipv4.ip_nonlocal_bind` of the calling thread's namespace; None if unreadable."""
    try:
        return NONLOCAL_BIND.read_text().strip() != "0"
    except OSError:
        return None


def local_addresses_present(ips: Iterable[IPv4Address]) -> bool:
    """Whether every one of `ips` is assigned to an interface of this network namespace.

    True for no addresses at all. Uses the bind test unless `ip_nonlocal_bind` is on (or
    unreadable), then a netlink address dump (see the module docstring).
    """
    wanted = list(ips)
    if not wanted:
        return True
    if nonlocal_bind_enabled() is not False:
        assigned = local_ipv4_addresses()
        return all(ip in assigned for ip in wanted)
    return all(_bindable(ip) for ip in wanted)


def _bindable(ip: IPv4Address) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.bind((str(ip), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            if exc.errno == errno.EADDRINUSE:
                # The address check comes first in inet_bind: only the ephemeral ports of a
                # local address can be exhausted.
                return True
            raise
    return True


def local_ipv4_addresses() -> frozenset[IPv4Address]:
    """Every IPv4 address assigned in this namespace (IFA_LOCAL), from an RTM_GETADDR dump."""
    for _ in range(5):
        addresses = _dump_addresses()
        if addresses is not None:
            return addresses
    raise AddressCheckError(errno.EAGAIN, "RTM_GETADDR dump kept being interrupted")


def _dump_addresses() -> frozenset[IPv4Address] | None:
    """One dump; None if the kernel flagged it inconsistent (addresses changed meanwhile)."""
    seq = int.from_bytes(os.urandom(4), "little") or 1
    request = NLMSGHDR.pack(
        NLMSGHDR.size + IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    ) + IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
    found: set[IPv4Address] = set()
    interrupted = False
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
    ) as sock:
        sock.settimeout(NETLINK_TIMEOUT)
        sock.bind((0, 0))
        sock.sendto(request, (0, 0))
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, flags, msg_seq, _ = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size or offset + length > len(data):
                    raise AddressCheckError(errno.EBADMSG, "truncated netlink message")
                body = offset + NLMSGHDR.size
                end = offset + length
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if kind == NLMSG_DONE:
                    return None if interrupted else frozenset(found)
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, body)
                    raise AddressCheckError(-code, f"RTM_GETADDR: {os.strerror(-code)}")
                if kind == RTM_NEWADDR:
                    address = _parse_address(data, body, end)
                    if address is not None:
                        found.add(address)


def _parse_address(data: bytes, start: int, end: int) -> IPv4Address | None:
    family = data[start]
    if family != socket.AF_INET:
        return None
    local = peer = None
    offset = start + IFADDRMSG.size
    while offset + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size:
            break
        value = data[offset + RTATTR.size : offset + length]
        if kind == IFA_LOCAL and len(value) == 4:
            local = IPv4Address(value)
        elif kind == IFA_ADDRESS and len(value) == 4:
            peer = IPv4Address(value)
        offset += (length + 3) & ~3
    # IFA_LOCAL is the local address; IFA_ADDRESS is the peer on point-to-point links and
    # equal to it otherwise. An address without IFA_LOCAL has only IFA_ADDRESS.
    return local if local is not None else peer


def freebind_udp_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port) even if `host` is not local (yet)."""
    return udp_socket("udp", host, port, freebind=True)
