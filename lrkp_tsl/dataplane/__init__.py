"""The kernel fast path: nftables maps for NAT, conntrack for relaying, one adapter each.

`DataPlane` is the one object the rest of the node talks to, and the real implementation
of the engine's `Kernel` interface (kernel.py). All of its sockets belong to the network
namespace it was created in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path

from lrkp_tsl.dataplane import sysctl
from lrkp_tsl.dataplane.conntrack import ConntrackTable
from lrkp_tsl.dataplane.nft import ElementChange, NftTable
from lrkp_tsl.dataplane.probe import KernelFeatures, probe_kernel
from lrkp_tsl.dataplane.silence import SilenceWatch
from lrkp_tsl.defaults import DEFAULT_RULES
from lrkp_tsl.errors import KernelError
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


def fixed_view(media: CallMedia | None) -> KernelView:
    """The kernel state of a call relayed between its SDP addresses, learning nothing."""
    return KernelView(frozenset(media.flows()) if media is not None else frozenset())


class DataPlane:
    def __init__(self, rules_path: Path = DEFAULT_RULES) -> None:
        self.nft = NftTable(rules_path)
        self.conntrack = ConntrackTable()
        self.silence = SilenceWatch(self.conntrack.lookup, 60.0)
        self.features: KernelFeatures | None = None

    def start(
        self, relay_addrs: Sequence[IPv4Address], ports: PortRange, idle_timeout: float
    ) -> KernelFeatures:
        """Set the sysctls, probe the kernel and load the table (keeping live calls)."""
        sysctl.apply_required()
        self.features = probe_kernel()
        log.info("kernel: %s", self.features.describe())
        self.load(relay_addrs, ports, idle_timeout)
        return self.features

    def load(self, relay_addrs: Sequence[IPv4Address], ports: PortRange, idle: float) -> None:
        self.nft.load(relay_addrs, ports, idle)
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

    def shutdown(self, flush: bool) -> None:
        """Leave live calls flowing (default), or remove everything the node installed."""
        if flush:
            if self.nft.exists():
                keys = self.nft.flow_keys()
                self.nft.drop()
                # NAT bindings live on in conntrack: without this, calls would keep flowing.
                deleted = self.conntrack.forget_keys(keys)
                log.info(
                    "flushed: table ip lrkp removed (%d flows), %d conntrack entries deleted",
                    len(keys),
                    deleted,
                )
        else:
            log.info("kept kernel state: live calls keep flowing; a restart re-adopts them")
        self.close()

    def close(self) -> None:
        """Release the node's sockets; the kernel state stays as it is."""
        self.conntrack.close()
        self.nft.close()
