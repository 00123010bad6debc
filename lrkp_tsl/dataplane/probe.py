"""What this kernel offers the node, found out at startup rather than assumed.

Each feature is tried for real with a throwaway nftables transaction that creates a table,
uses the feature and deletes the table again: the kernel validates every expression when
it is added, the batch nets to nothing, and nothing is left behind either way.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import nftables

PROBE_TABLE = f"lrkp_probe_{os.getpid()}"
XT_TARGETS = Path("/proc/net/ip_tables_targets")
CONNTRACK_ACCT = Path("/proc/sys/net/netfilter/nf_conntrack_acct")


@dataclass(frozen=True, slots=True)
class KernelFeatures:
    """Findings of `probe_kernel`, logged at startup and read by the rest of the node."""

    native_queue: bool  # nft `queue` statement (CONFIG_NFT_QUEUE)
    xt_nfqueue: bool  # xt NFQUEUE target, usable through iptables-nft
    iptables_nft: str | None  # path of iptables-nft, if installed
    flowtable: bool  # nft flowtables (CONFIG_NF_FLOW_TABLE)
    conntrack_acct: bool  # per-entry packet/byte counters enabled
    socket_lookup: bool  # nft `socket wildcard` in prerouting (CONFIG_NFT_SOCKET, NF_SOCKET_IPV4)

    @property
    def queue_path(self) -> str:
        """Which first-packet queue path the node can use: 'nft', 'xt' or 'none'."""
        if self.native_queue:
            return "nft"
        if self.xt_nfqueue and self.iptables_nft:
            return "xt"
        return "none"

    def describe(self) -> str:
        def yes(flag: bool) -> str:
            return "yes" if flag else "no"

        return (
            f"queue={self.queue_path} (nft queue: {yes(self.native_queue)}, "
            f"xt NFQUEUE: {yes(self.xt_nfqueue)}, iptables-nft: {self.iptables_nft or 'missing'})"
            f", flowtable: {yes(self.flowtable)}, conntrack accounting: {yes(self.conntrack_acct)}"
            f", socket lookup: {yes(self.socket_lookup)}"
        )


def _accepted(nft: nftables.Nftables, body: str) -> bool:
    batch = f"add table ip {PROBE_TABLE}\n{body}\ndelete table ip {PROBE_TABLE}\n"
    rc, _output, _error = nft.cmd(batch)
    return bool(rc == 0)


def probe_kernel() -> KernelFeatures:
    nft = nftables.Nftables()
    native_queue = _accepted(
        nft,
        f"add chain ip {PROBE_TABLE} c {{ type filter hook prerouting priority 0; }}\n"
        f"add rule ip {PROBE_TABLE} c udp dport 9 queue num 0 bypass",
    )
    socket_lookup = _accepted(
        nft,
        f"add chain ip {PROBE_TABLE} c {{ type filter hook prerouting priority 0; }}\n"
        f"add rule ip {PROBE_TABLE} c udp dport 9 socket wildcard 0 accept",
    )
    flowtable = _accepted(
        nft,
        f"add flowtable ip {PROBE_TABLE} f {{ hook ingress priority 0; devices = {{ lo }}; }}",
    )
    try:
        xt_nfqueue = "NFQUEUE" in XT_TARGETS.read_text().split()
    except OSError:
        xt_nfqueue = False
    try:
        acct = CONNTRACK_ACCT.read_text().strip() == "1"
    except OSError:
        acct = False
    return KernelFeatures(
        native_queue=native_queue,
        xt_nfqueue=xt_nfqueue,
        iptables_nft=shutil.which("iptables-nft"),
        flowtable=flowtable,
        conntrack_acct=acct,
        socket_lookup=socket_lookup,
    )
