"""NFQUEUE adapter: the first packets of learning legs, brought to userspace and back.

Packets are chosen by the node's own table (chain `to_queue` marks them, within a rate
limit); this module installs the one rule that sends marked packets to the queue — the
native nft `queue` statement where the kernel has it, else the xt NFQUEUE target through
iptables-nft in the raw table (this kernel has no nft queue) — and removes exactly that
rule on a flush (its number, and whether iptables-nft's raw table was made for it, are on
record: added.py). Both run at priority raw (-300): before conntrack, so a packet accepted
later creates or joins its stream's conntrack entry only then.

The xt rule is the first of raw PREROUTING, and kept first: a rule ahead of it that ends
the chain for a packet (`iptables -t raw -I PREROUTING 1 -j ACCEPT`) would keep every
first packet from the node while the rule itself looks present. It only matches packets
the node's own table marked, so standing first changes nothing for other traffic.

Fail-closed: the queue rule has no bypass. If the node is not listening, or the queue is
full, first packets of learning legs are dropped; streams already latched never touch the
queue and keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import struct
import subprocess
import warnings
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, NamedTuple

from netfilterqueue import NetfilterQueue, Packet

from lrkp_tsl.dataplane.nft import FAMILY, QUEUE_CHAIN, TABLE, NftTable
from lrkp_tsl.dataplane.nftwatch import RulesetWatch
from lrkp_tsl.errors import HostError, KernelError
from lrkp_tsl.media import Endpoint

if TYPE_CHECKING:
    from lrkp_tsl.dataplane.added import AddedRecord

log = logging.getLogger("lrkp_tsl.dataplane.queue")

# Must match `meta mark set meta mark | ...` in lrkp_tsl/rules/lrkp.nft (a unit test checks).
QUEUE_MARK = 0x00200000


def unmarked(mark: int) -> int:
    """The packet mark without the queue's bit: what an accepted packet leaves with, so the
    mark never leaks into routing (the table has no chain after the queue to clear it)."""
    return mark & ~QUEUE_MARK & 0xFFFFFFFF


QUEUE_MAXLEN = 1024
XT_COMMENT = "lrkp-tsl first packets"
XT_TABLE, XT_CHAIN = "raw", "PREROUTING"
IPPROTO_UDP = 17


def xt_rule(queue_num: int) -> list[str]:
    mark = f"{QUEUE_MARK:#x}/{QUEUE_MARK:#x}"
    return [
        "PREROUTING", "-m", "mark", "--mark", mark, "-m", "comment", "--comment", XT_COMMENT,
        "-j", "NFQUEUE", "--queue-num", str(queue_num),
    ]  # fmt: skip


class RuleProblem(NamedTuple):
    """What is wrong with the queue rule: `gone`, or only misplaced; `text` says which."""

    gone: bool
    text: str


def restore_script(queue_num: int, copies: int) -> str:
    """iptables-restore input that deletes `copies` copies of the rule and inserts it first,
    applied as one transaction (`--noflush` leaves every other rule alone)."""
    chain, *match = (f'"{word}"' if " " in word else word for word in xt_rule(queue_num))
    rule = " ".join(match)
    deletes = [f"-D {chain} {rule}"] * copies
    return "\n".join([f"*{XT_TABLE}", *deletes, f"-I {chain} 1 {rule}", "COMMIT", ""])


def parse_udp(payload: bytes) -> tuple[Endpoint, Endpoint] | None:
    """(source, destination) of an IPv4 UDP packet, or None for anything else: not IPv4
    UDP, truncated, a bad header length, a non-first fragment (no UDP header in it), a
    zero port. Never raises (struct: this is the hot path)."""
    if len(payload) < 28 or payload[0] >> 4 != 4 or payload[9] != IPPROTO_UDP:
        return None
    header = (payload[0] & 0x0F) * 4
    if header < 20 or len(payload) < header + 8:
        return None
    if int.from_bytes(payload[6:8]) & 0x1FFF:
        return None
    sport, dport = struct.unpack_from("!HH", payload, header)
    if not sport or not dport:
        return None
    return (
        Endpoint(IPv4Address(payload[12:16]), sport),
        Endpoint(IPv4Address(payload[16:20]), dport),
    )


class QueueRule:
    """The one rule that sends marked packets to our queue: installed, checked, removed."""

    def __init__(
        self, path: str, queue_num: int, nft: NftTable, record: AddedRecord | None = None
    ) -> None:
        if path not in ("nft", "xt"):
            raise HostError(
                "no first-packet queue on this kernel: neither the nft queue statement "
                "(CONFIG_NFT_QUEUE) nor the xt NFQUEUE target with iptables-nft is available"
            )
        self.path = path
        self.queue_num = queue_num
        self.nft = nft
        self.iptables = shutil.which("iptables-nft") or "iptables-nft"
        # Whether install() added the xt rule (it was not there), and created iptables-nft's
        # `raw` table for it: a start that fails removes only what it added, and an empty
        # base chain left behind would still cost every packet a hook. (The nft path's
        # chain lives in the node's own table.) Whether an earlier node of this namespace
        # created it is on `record`, for a flush.
        self.record = record
        self.added = False
        self.created_raw = False
        self.restore = shutil.which("iptables-nft-restore") or "iptables-nft-restore"

    def _xt(self, verb: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.iptables, "-w", "-t", XT_TABLE, verb, *xt_rule(self.queue_num)],
            capture_output=True,
            text=True,
            check=False,
        )

    def _xt_first(self) -> subprocess.CompletedProcess[str]:
        chain, *match = xt_rule(self.queue_num)
        return subprocess.run(
            [self.iptables, "-w", "-t", XT_TABLE, "-I", chain, "1", *match],
            capture_output=True,
            text=True,
            check=False,
        )

    def install(self, watch: RulesetWatch | None = None) -> None:
        """Install the rule (the xt one first in raw PREROUTING, moved there if it stands
        elsewhere, in one transaction); `watch` reads the chain (a new one if not given)."""
        if self.path == "nft":
            self.nft.run_text(
                f"add chain {FAMILY} {TABLE} {QUEUE_CHAIN} {{ type filter hook prerouting "
                f"priority -300; policy accept; }}\nflush chain {FAMILY} {TABLE} {QUEUE_CHAIN}\n"
                f"add rule {FAMILY} {TABLE} {QUEUE_CHAIN} meta mark & {QUEUE_MARK:#x} == "
                f"{QUEUE_MARK:#x} queue num {self.queue_num}",
                "installing the nft queue rule",
            )
        elif watch is None:  # at startup: said even when the rule was there already
            with RulesetWatch() as own:
                self._install_first(own)
        elif not self._install_first(watch):
            return  # there already, and first
        if self.path == "xt" and self.record is not None:
            claimed = self.record.added.created_raw
            self.record.update(queue_num=self.queue_num, created_raw=self.created_raw or claimed)
        log.info(
            "first packets: marked %#x -> queue %d via %s",
            QUEUE_MARK,
            self.queue_num,
            "nft queue" if self.path == "nft" else "xt NFQUEUE (iptables-nft, table raw)",
        )

    def _install_first(self, watch: RulesetWatch) -> bool:
        """Put the xt rule first, alone; False if it already was."""
        rules = watch.chain_rules("ip", XT_TABLE, XT_CHAIN)
        mine = [i for i, rule in enumerate(rules) if XT_COMMENT.encode() in rule.content]
        if mine == [0]:
            return False
        if not mine:  # added by this node: a start that fails takes it back (and raw)
            self.added = True
            self.created_raw = self.created_raw or watch.fingerprint("ip", XT_TABLE) is None
        script = restore_script(self.queue_num, len(mine))
        if shutil.which(self.restore) is None:  # no iptables-nft-restore: two transactions
            for _copy in mine:
                self._xt("-D")
            result = self._xt_first()
        else:
            result = subprocess.run(
                [self.restore, "-w", "--noflush"],
                input=script,
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            raise KernelError(
                f"installing the xt NFQUEUE rule first in raw {XT_CHAIN} "
                f"(iptables-nft-restore --noflush <<< {script!r}) failed: "
                f"{result.stderr.strip()}"
            )
        return True

    def problem(self, watch: RulesetWatch) -> RuleProblem | None:
        """What is wrong with the rule, or None (the nft chain is part of the node's table,
        which the caller watches as a whole). The xt rule must be there, and first."""
        if self.path == "nft":
            return None
        rules = watch.chain_rules("ip", XT_TABLE, XT_CHAIN)
        mine = [i for i, rule in enumerate(rules) if XT_COMMENT.encode() in rule.content]
        where = f"iptables-nft's {XT_TABLE} {XT_CHAIN}"
        if not mine:
            return RuleProblem(True, f"the first-packet queue rule is gone from {where}")
        if mine[0] != 0:
            ahead = ", ".join(f"#{rule.handle}" for rule in rules[: mine[0]])
            return RuleProblem(
                False,
                f"the first-packet queue rule is no longer first in {where}: {mine[0]} "
                f"rule(s) ahead of it (handle {ahead}) can end the chain before first "
                f"packets reach it (`iptables-nft -t {XT_TABLE} -S {XT_CHAIN}`)",
            )
        return None

    def present(self, watch: RulesetWatch) -> bool:
        """Whether the rule is there and first (`problem` says what is wrong otherwise)."""
        return self.problem(watch) is None

    def remove(self, *, recorded: bool = False) -> list[str]:
        """Remove only the rule this node installed (the nft chain goes with our table), and
        iptables-nft's raw table if this run created it (with `recorded`, a flush: or a node
        did, on record) and nothing else is in it. Returns what was removed, for the
        operator; KernelError if iptables-nft refuses."""
        removed: list[str] = []
        if self.path != "xt":
            return removed
        while self._xt("-C").returncode == 0:
            result = self._xt("-D")
            if result.returncode != 0:
                raise KernelError(
                    f"removing the xt NFQUEUE rule (iptables-nft -t raw -D "
                    f"{' '.join(xt_rule(self.queue_num))}) failed: {result.stderr.strip()}"
                )
            removed = [f"the queue rule ('{XT_COMMENT}', queue {self.queue_num}, iptables-nft "
                       "table raw)"]  # fmt: skip
        if removed:
            log.info("removed the xt NFQUEUE rule")
        claimed = self.record is not None and self.record.added.created_raw
        dropped = (self.created_raw or (recorded and claimed)) and self._drop_raw_if_empty()
        if dropped:
            removed.append("iptables-nft's raw table (created for the queue rule, now empty)")
        self.added = self.created_raw = False
        if self.record is not None:
            # A start that fails leaves an earlier node's raw table, and its claim, alone.
            keep = claimed and not dropped and not recorded
            self.record.update(queue_num=None, created_raw=keep)
        return removed

    def _drop_raw_if_empty(self) -> bool:
        """iptables-nft's `raw` table, created for the queue rule, goes if nothing else put a
        rule in it since."""
        with RulesetWatch() as watch:
            raw = watch.fingerprint("ip", "raw")
        if raw is None or raw.rules:
            return False
        self.nft.run_text("delete table ip raw", "removing the empty raw table")
        log.info("removed iptables-nft's empty raw table (created for the queue rule)")
        return True


class PacketQueue:
    """Our NFQUEUE, read in the asyncio loop; `on_packet` gives every verdict.

    A packet that cannot be parsed is dropped here and counted; if `on_packet` raises,
    the packet is dropped too: a packet without a verdict would hold one of the queue's
    QUEUE_MAXLEN slots until the node exits, and a full queue stops all learning.
    """

    def __init__(
        self,
        queue_num: int,
        on_packet: Callable[[Packet, Endpoint, Endpoint], None],
        stats: Counter[str] | None = None,
    ) -> None:
        self.queue_num = queue_num
        self.on_packet = on_packet
        self.stats: Counter[str] = Counter() if stats is None else stats
        self._queue = NetfilterQueue()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf clamp: logged below
            try:
                self._queue.bind(queue_num, self._callback, max_len=QUEUE_MAXLEN)
            except OSError as exc:
                raise HostError(
                    f"kernel.queue_num = {queue_num}: cannot bind NFQUEUE {queue_num}: {exc} "
                    "(another process owns it? choose another number with kernel.queue_num)"
                ) from exc
        self._fd = self._queue.get_fd()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _callback(self, packet: Packet) -> None:
        try:
            parsed = parse_udp(packet.get_payload())
            if parsed is None:
                self.stats["packets.malformed"] += 1
                packet.drop()
                return
            self.on_packet(packet, *parsed)
        except Exception:
            self.stats["packets.failed"] += 1
            failed = self.stats["packets.failed"]
            if failed == 1 or failed % 1000 == 0:
                log.exception("queued packet dropped after an error (%d so far)", failed)
            with contextlib.suppress(Exception):
                packet.drop()  # harmless if it already had its verdict

    def _readable(self) -> None:
        self._queue.run(block=False)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd, self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._queue.unbind()
