"""What the host must offer a configuration: its relay IPs, its listening addresses, its
rules file and relay ports no local socket holds, checked before the node touches the kernel.

`check-config` runs every check and prints what it found (problems: the node would not
start; warnings: it would, and this will likely go wrong); `run` refuses to start on the
problems (exit 2) before it changes anything in the kernel. The decisions are pure
(`address_findings`, given the host's local networks); reading the host is two small
adapters (`local_networks`: `ip route show table local`; `rules_findings`: libnftables' dry
run of the very transaction the node would load).

Local sockets holding a relay port without a peer (dataplane/localsockets.py): `run` finds
them in DataPlane.start, once it holds the instance lock and knows whether it reserved the
relay range; `check-config` reports the same findings (`socket_findings`): a socket bound
to a relay IP is a problem (`run` would refuse to start), one on the wildcard address a
warning.

Why relay IPs are checked: Kamailio writes them into SDP, so parties send media there; an
address that is on no interface of the host receives nothing, and the node would answer
Kamailio as if all were well. In a pair the VIPs are absent on the standby by design, and a
VIP managed by something else may come after the node starts: `relay_ips_may_appear_later`
says so, and the control sockets are then bound with IP_FREEBIND.
"""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING

from lrkp_tsl.config import Config
from lrkp_tsl.errors import KernelError, LrkpError

if TYPE_CHECKING:  # the package's __init__ loads nftables: imported where used (hostdeps)
    from lrkp_tsl.dataplane.localsockets import UdpSocket

Network = IPv4Network | IPv6Network
WILDCARDS = (IPv4Address("0.0.0.0"), IPv6Address("::"))


@dataclass(slots=True)
class Findings:
    problems: list[str] = field(default_factory=list)  # the node would not start
    warnings: list[str] = field(default_factory=list)  # it would; this will likely go wrong

    def extend(self, other: Findings) -> None:
        self.problems += other.problems
        self.warnings += other.warnings


def local_networks() -> list[Network]:
    """The addresses this network namespace accepts as its own (its `local` routes: every
    interface address, and all of 127.0.0.0/8)."""
    found: list[Network] = []
    for family in ("-4", "-6"):
        result = subprocess.run(
            ["ip", "-j", family, "route", "show", "table", "local", "type", "local"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise KernelError(f"ip route show table local failed: {result.stderr.strip()}")
        for route in json.loads(result.stdout or "[]"):
            found.append(ip_network(route["dst"], strict=False))
    return found


def _is_local(text: str, local: list[Network]) -> bool:
    address = ip_address(text)
    return address in WILDCARDS or any(address in network for network in local)


def may_be_absent(config: Config) -> bool:
    """Whether the relay IPs may be missing at start: a pair's standby never holds the VIPs,
    and the operator may say a VIP comes later."""
    return config.paired or config.relay_ips_may_appear_later


def address_findings(config: Config, local: list[Network], *, at_start: bool) -> Findings:
    """Relay IPs, control, ng and metrics addresses that are on no interface of this host.

    `at_start`: for `run`, an absent relay IP is a problem (unless it may appear later); for
    `check-config` it is a warning, since the address may be added before the node starts.
    """
    found = Findings()
    freebind = may_be_absent(config)
    if not freebind:
        keys = {"internal_ip": config.internal_ip, "external_ip": config.external_ip}
        if config.external_ip == config.internal_ip:
            del keys["external_ip"]
        for key, relay_ip in keys.items():
            if _is_local(str(relay_ip), local):
                continue
            text = (
                f"{key} = '{relay_ip}': no interface of this host has this address, so media "
                "sent to it never arrives; add it, or correct the key. If it is a VIP that "
                "comes later (keepalived, a script), set relay_ips_may_appear_later = true "
                "(flag --relay-ips-may-appear-later; a pair needs nothing)"
            )
            if at_start:
                found.problems.append(text)
            else:
                found.warnings.append(f"{text}: `run` refuses to start without it")
    relay_ips = {str(ip) for ip in config.relay_addrs}
    for key, addresses in (("control", config.control), ("ng", config.ng)):
        for address in addresses:
            if address.scheme == "unix" or _is_local(address.host, local):
                continue
            if freebind and address.host in relay_ips:
                continue  # bound with IP_FREEBIND: it works once the VIP arrives
            found.warnings.append(
                f"{key} = {str(address)!r}: {address.host} is no address of this host, so "
                "the control socket cannot be bound there; the node would not start"
            )
    if config.metrics_listen is not None and not _is_local(config.metrics_listen[0], local):
        host, port = config.metrics_listen
        found.warnings.append(
            f"metrics.listen = '{host}:{port}': {host} is no address of this host, so the "
            "node would not start"
        )
    return found


def rules_findings(config: Config, *, dry_run: bool) -> Findings:
    """The rules file: readable, and (`dry_run`) loadable by this kernel as the node would
    load it: libnftables' dry run of the whole transaction, relay addresses and ports
    included; the kernel validates every expression and commits nothing. (`run` skips the
    dry run: its real load is one transaction too, and a refused one changes nothing.)"""
    found = Findings()
    where = f"kernel.rules = '{config.rules}'"
    try:
        config.rules.read_bytes()
    except OSError as exc:
        found.problems.append(f"{where}: cannot read it: {exc.strerror}")
        return found
    if not dry_run:
        return found
    from lrkp_tsl import hostdeps

    try:
        hostdeps.check()
    except hostdeps.MissingDependency as error:
        found.problems.append(error.reason)
        return found
    from lrkp_tsl.dataplane.nft import NftTable

    table = None
    try:
        table = NftTable(config.rules)
        table.check_load(config.relay_addrs, config.ports, config.idle_timeout)
    except (KernelError, OSError) as error:
        reason = error.reason if isinstance(error, LrkpError) else str(error)
        if _not_permitted(error, reason):
            found.warnings.append(
                f"{where}: not checked against the kernel: that needs root or CAP_NET_ADMIN "
                "(run check-config as the node runs)"
            )
        else:
            found.problems.append(f"{where}: the kernel refuses it: {reason}")
    finally:
        if table is not None:
            table.close()
    return found


def socket_findings(
    config: Config,
    sockets: Iterable[UdpSocket],
    owners: Callable[[set[int]], dict[int, str]],
    reserves: bool,
) -> Findings:
    """Sockets without a peer on a relay port, as `run` would find them when it starts
    (`owners`: inode -> the process, for the message; `reserves`: whether the node would
    reserve the relay range, which decides what to do about a wildcard socket)."""
    from lrkp_tsl.dataplane import localsockets

    found = Findings()
    held = localsockets.holders(sockets, config.relay_addrs, config.ports)
    if not held.bound and not held.wildcard:
        return found
    named = owners({sock.inode for sock in (*held.bound, *held.wildcard)})
    for sock in held.bound:
        problem = localsockets.bound_problem(sock, named.get(sock.inode), config.ports)
        found.problems.append(f"{problem}; `run` refuses to start while it is there")
    fix = localsockets.RESTART_LATER if reserves else localsockets.MOVE
    for sock in held.wildcard:
        found.warnings.append(
            localsockets.wildcard_warning(sock, named.get(sock.inode), config.ports, fix)
        )
    return found


def reserves_range(config: Config) -> bool:
    """Whether the node would reserve the relay range here (reserve.py's plan, unwritten)."""
    from lrkp_tsl.dataplane import reserve, sysctl

    try:
        before = reserve.parse(sysctl.read(reserve.RESERVED))
        return reserve.plan(before, reserve.read_ephemeral(), config.ports).reserved
    except (OSError, ValueError):
        return False


def _not_permitted(error: Exception, reason: str) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.EPERM, errno.EACCES):
        return True
    return "Operation not permitted" in reason


def local_socket_findings(config: Config) -> Findings:
    """`socket_findings` for the sockets of this network namespace."""
    try:
        from lrkp_tsl.dataplane import localsockets
    except ImportError:
        return Findings()  # no nftables binding: rules_findings has said so
    try:
        sockets = localsockets.read_sockets()
    except OSError as error:
        return Findings(
            warnings=[f"the host's UDP sockets could not be listed, not checked: {error}"]
        )
    return socket_findings(config, sockets, localsockets.owners, reserves_range(config))


def check(config: Config, *, at_start: bool) -> Findings:
    """Every host check of `config` (check-config; `run` before touching the kernel)."""
    found = Findings()
    try:
        local = local_networks()
    except (KernelError, OSError) as error:
        found.warnings.append(f"the host's addresses could not be listed, not checked: {error}")
    else:
        found.extend(address_findings(config, local, at_start=at_start))
    found.extend(rules_findings(config, dry_run=not at_start))
    if not at_start:  # `run` finds them in DataPlane.start
        found.extend(local_socket_findings(config))
    return found
