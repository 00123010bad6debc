"""The kernel fast path: nftables maps for NAT, conntrack for relaying, one adapter each.

`DataPlane` is the one object the rest of the node talks to, and the real implementation
of the engine's `Kernel` interface (kernel.py). All of its sockets belong to the network
namespace it was created in.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from lrkp_tsl.dataplane import localsockets, sysctl
from lrkp_tsl.dataplane.added import AddedRecord
from lrkp_tsl.dataplane.conntrack import ConntrackTable
from lrkp_tsl.dataplane.nft import ElementChange, NftTable
from lrkp_tsl.dataplane.probe import KernelFeatures, probe_kernel
from lrkp_tsl.dataplane.reserve import PortReservation, render
from lrkp_tsl.dataplane.silence import SilenceWatch
from lrkp_tsl.defaults import DEFAULT_RULES
from lrkp_tsl.errors import HostError, KernelError, LrkpError
from lrkp_tsl.kernel import (
    Counters,
    KernelChange,
    KernelState,
    KernelView,
    Repair,
    StreamKey,
)
from lrkp_tsl.media import CallMedia, Endpoint, InstalledFlow, PortRange

log = logging.getLogger("lrkp_tsl.dataplane")

__all__ = ["DataPlane", "KernelFeatures"]


# Errors of a load that another try may not repeat (the kernel was short of something, or
# another transaction interrupted it); any other refusal is the rules file or the kernel.
TRANSIENT = tuple(os.strerror(n) for n in (errno.EINTR, errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM))


@dataclass(frozen=True, slots=True)
class StartFootprint:
    """What a start found and changed, so that a start that fails can take it back."""

    table_existed: bool  # a previous run's table (its calls must keep flowing)
    sysctls: dict[str, str]  # sysctls set, with their previous values


@dataclass(slots=True)
class Flushed:
    """What a flush removed, and what it could not, one phrase each for the operator."""

    removed: list[str]
    failed: list[str]


def fixed_view(media: CallMedia | None) -> KernelView:
    """The kernel state of a call relayed between its SDP addresses, learning nothing."""
    return KernelView(frozenset(media.flows()) if media is not None else frozenset())


class DataPlane:
    def __init__(self, rules_path: Path = DEFAULT_RULES, record: AddedRecord | None = None) -> None:
        """`record`: what the node added besides its table, kept for a flush (added.py)."""
        self.nft = NftTable(rules_path)
        self.conntrack = ConntrackTable()
        self.silence = SilenceWatch(self.conntrack.lookup, 60.0)
        self.features: KernelFeatures | None = None
        self.footprint: StartFootprint | None = None
        self.reservation = PortReservation(record)
        # The last load made the idle policy anew over live entries (taken by the daemon).
        self.policy_replaced = False

    def start(
        self, relay_addrs: Sequence[IPv4Address], ports: PortRange, idle_timeout: float
    ) -> KernelFeatures:
        """Set the sysctls, probe the kernel and load the table (keeping live calls).

        What it found and changed is kept in `footprint` for `abandon_start`. A table the
        kernel refuses is a HostError (the rules file or the kernel must change), unless
        the kernel was only short of memory or interrupted (KernelError: a retry may work).
        The host's own sockets share the relay range (localsockets.py, reserve.py and the
        guard's relay_port chain): a socket that would take calls' packets stops the start
        before anything in the kernel changes.
        """
        holders = localsockets.check(relay_addrs, ports)
        table_existed = self.nft.present()
        self.footprint = StartFootprint(table_existed, sysctl.apply_required())
        self.features = probe_kernel()
        log.info("kernel: %s", self.features.describe())
        if not self.features.socket_lookup:
            raise HostError(
                "this kernel has no nftables socket lookup (nft `socket wildcard`: "
                "CONFIG_NFT_SOCKET and CONFIG_NF_SOCKET_IPV4, module nft_socket), which the "
                "guard needs so that the relay range never drops the host's own traffic; "
                "load it (`modprobe nft_socket`) or use a kernel that has it (5.5 or later)"
            )
        reserved = self.reservation.apply(ports).reserved
        try:
            self.load(relay_addrs, ports, idle_timeout)
        except KernelError as error:
            if any(text in error.reason for text in TRANSIENT):
                raise
            raise HostError(
                f"kernel.rules = '{self.nft.rules_path}': the kernel refuses the table: "
                f"{error.reason}"
            ) from error
        log.info(
            "guard: a packet to a relay port that belongs to a local socket goes to that "
            "socket, never to a call or the drop (nft socket lookup; counter local_socket)"
        )
        localsockets.warn(holders.wildcard, ports, reserved)
        return self.features

    def abandon_start(self, remove_queue_rule: Callable[[], object] | None = None) -> None:
        """The start failed before the node came up: take back what it added, so a host the
        node could not run on is left as it was, and release the sockets.

        A previous run's table is left as it is: its calls keep flowing in the kernel (a
        normal stop leaves it so too), and so are the sysctls they need. A table this start
        created goes, with the queue rule this start added (`remove_queue_rule`) and the
        sysctls and reserved ports it changed, only if it holds no flow (a command answered
        before the failure may have added one: then nothing is taken back)."""
        footprint = self.footprint
        try:
            if footprint is None:
                return
            if footprint.table_existed:
                log.info(
                    "start failed: the previous run's table and its calls are left as they were"
                )
                return
            if self.nft.present():
                flows = self.nft.flow_keys()
                if flows:
                    log.error(
                        "start failed: table ip lrkp holds %d flows: left in place", len(flows)
                    )
                    return
                self.nft.drop()
                log.info("start failed: table ip lrkp, created by this start, removed")
            if remove_queue_rule is not None:
                try:
                    remove_queue_rule()
                except LrkpError as error:
                    log.error("start failed: the queue rule stays: %s", error.reason)
            sysctl.restore(footprint.sysctls)
            try:
                self.reservation.release()
            except LrkpError as error:
                log.error("start failed: %s", error.reason)
        finally:
            self.close()

    def load(self, relay_addrs: Sequence[IPv4Address], ports: PortRange, idle: float) -> None:
        if self.nft.load(relay_addrs, ports, idle):
            # Another idle timeout than the table's: the policy object was made anew, and
            # the kernel took the old one off every live entry (they now run on its default
            # UDP timeouts, 30 s or 120 s). Their node renews them (engine.renew_streams).
            self.policy_replaced = True
            log.warning(
                "the idle timeout changed to %g s: the live calls' conntrack entries lost "
                "the old policy and are renewed (deleted; their next packets make them again "
                "with the new one)",
                idle,
            )
        self.silence.idle_timeout = max(1, round(idle))  # as the ct timeout policy holds it
        log.info(
            "table ip lrkp loaded from %s: relay addresses %s, ports %s, idle timeout %g s",
            self.nft.rules_path,
            ", ".join(map(str, relay_addrs)),
            ports,
            idle,
        )

    # -- the engine's Kernel interface --------------------------------------------------------

    def change(
        self,
        call_id: str,
        before: KernelView,
        after: KernelView,
        displace: Iterable[StreamKey] = (),
    ) -> None:
        (error,) = self.change_many([(call_id, before, after, tuple(displace))])
        if error is not None:
            raise error

    def change_many(self, changes: Sequence[KernelChange]) -> list[KernelError | None]:
        return self.nft.change_many(
            [
                ElementChange(
                    call_id,
                    add=after.flows - before.flows,
                    delete=before.flows - after.flows,
                    learn=after.learning - before.learning,
                    unlearn=before.learning - after.learning,
                    displace=displace,
                )
                for call_id, before, after, displace in changes
            ]
        )

    def repair(self, calls: Sequence[Repair]) -> list[KernelError | None]:
        return self.nft.change_many(
            [
                ElementChange(
                    call_id,
                    add=view.flows,
                    delete=[InstalledFlow(call_id, s, r, None, None) for s, r in keys],
                    learn=view.learning,
                    unlearn=learning,
                )
                for call_id, keys, learning, view in calls
            ]
        )

    def install(self, views: Iterable[tuple[str, KernelView]]) -> None:
        self.nft.install((call_id, view.flows, view.learning) for call_id, view in views)

    def remove(self, flows: Iterable[InstalledFlow], learning: Iterable[Endpoint]) -> None:
        self.nft.change(ElementChange("(no call)", delete=flows, unlearn=learning))

    def forget(self, keys: Iterable[StreamKey]) -> None:
        self.conntrack.forget_keys(keys)

    def alive(self, keys: Iterable[StreamKey]) -> Mapping[StreamKey, float]:
        return self.conntrack.alive(keys)

    def counters(self, keys: Iterable[StreamKey]) -> Mapping[StreamKey, Counters]:
        return self.conntrack.counters(keys)

    def streams(
        self, keys: Iterable[StreamKey]
    ) -> Mapping[StreamKey, tuple[StreamKey, Counters] | None]:
        found = self.conntrack.streams(keys)
        return {key: None if got is None else got[:2] for key, got in found.items()}

    def is_seen(self, sender: Endpoint, relay: Endpoint) -> bool:
        return self.silence.is_seen(sender, relay)

    def state(self) -> KernelState:
        return self.nft.state()

    # -- whole calls, for tests and benchmarks --------------------------------------------------

    def sync(self, call_id: str, before: KernelView, after: KernelView) -> None:
        """`change`, then delete the conntrack entries of every changed flow.

        Order matters: the new elements go in first, then the entries go, so the next
        packet of each stream creates an entry with the new binding. A packet between the
        two steps still rides the old entry; none can pick up a binding that no longer
        exists. (The engine does the same two steps itself, to tell their failures apart.)
        """
        self.change(call_id, before, after)
        changed = before.flows ^ after.flows
        if changed:
            self.conntrack.forget(changed)

    def commit(self, media: CallMedia, previous: CallMedia | None = None) -> None:
        """Relay `media` between its SDP addresses as given (no learning), replacing
        `previous` (the same call's old addresses)."""
        self.sync(media.call_id, fixed_view(previous), fixed_view(media))

    def remove_call(self, media: CallMedia) -> None:
        """Stop relaying `media` at once: elements out, then its streams' entries deleted."""
        self.sync(media.call_id, fixed_view(media), KernelView())

    def flush(self, remove_queue_rule: Callable[[], list[str]] | None = None) -> Flushed:
        """Remove everything the node put in this namespace's kernel: the queue rule
        (`remove_queue_rule`: QueueRule.remove(recorded=True), with the raw table a node
        made for it),
        the table, the conntrack entries of the flows in its maps (NAT bindings live on in
        conntrack: without this, calls would keep flowing) and the reserved ports a node
        added (reserve.py, on record). Each step runs even if one before failed.

        The one path of kernel.flush_on_exit at exit and of `lrkp-tsl flush` after a stop."""
        flushed = Flushed([], [])
        steps: list[tuple[str, Callable[[], list[str]]]] = [
            ("table ip lrkp", self._drop_table),
            ("reserved ports", self._release_ports),
        ]
        if remove_queue_rule is not None:
            steps.insert(0, ("the queue rule", remove_queue_rule))
        for what, step in steps:
            try:
                flushed.removed += step()
            except (LrkpError, OSError) as exc:
                reason = exc.reason if isinstance(exc, LrkpError) else str(exc)
                flushed.failed.append(f"{what}: {reason}")
        return flushed

    def _drop_table(self) -> list[str]:
        if not self.nft.present():
            return []
        keys = self.nft.flow_keys()
        self.nft.drop()
        deleted = self.conntrack.forget_keys(keys)
        return [f"table ip lrkp ({len(keys)} flows) and its calls' conntrack entries ({deleted})"]

    def _release_ports(self) -> list[str]:
        taken = self.reservation.release(recorded=True)
        return [f"reserved ports {render(taken)} (ip_local_reserved_ports)"] if taken else []

    def shutdown(
        self, flush: bool, remove_queue_rule: Callable[[], list[str]] | None = None
    ) -> None:
        """Leave live calls flowing (default), or remove everything the node installed
        (`flush`)."""
        if flush:
            flushed = self.flush(remove_queue_rule)
            log.info("flushed: removed %s", "; ".join(flushed.removed) or "nothing (none left)")
            for failure in flushed.failed:
                log.error("flush: could not remove %s", failure)
        else:
            log.info(
                "kept kernel state%s: live calls keep flowing; a restart re-adopts them",
                " (the relay range stays reserved from automatic port allocation)"
                if self.reservation.reserved
                else "",
            )
        self.close()

    def close(self) -> None:
        """Release the node's sockets; the kernel state stays as it is."""
        self.conntrack.close()
        self.nft.close()
