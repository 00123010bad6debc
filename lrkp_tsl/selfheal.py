"""Self-healing: put the node's table and queue rule back when something removes them.

Operators remove them without meaning to: Debian's `nftables.service` starts its ruleset
with `flush ruleset` (so does `systemctl restart nftables`), and `iptables -t raw -F`
takes the queue rule. Without them the node would keep answering `PONG` and relay nothing.

Every CHECK_INTERVAL the node asks the kernel for its ruleset generation (one tiny netlink
request). Only when the generation moved (any nftables transaction, the node's own
included) does it compare its table's fingerprint (table handle and flags, chains with
their hooks and policies, rules with their expressions; never the map elements: ~110 µs
whatever the number of calls) and look for its queue rule. A difference is logged as an error
that says what happened and how to keep it from happening, then repaired: the table is
reloaded (rules, sets, the idle timeout policy), every live call's elements are put back,
the queue rule is re-added.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.nft import FAMILY, TABLE
from lrkp_tsl.dataplane.nftwatch import Fingerprint, RulesetWatch
from lrkp_tsl.dataplane.queue import QueueRule
from lrkp_tsl.engine import Engine

log = logging.getLogger("lrkp_tsl.selfheal")

CHECK_INTERVAL = 0.5
ADVICE = (
    "Something removed or changed the node's kernel state (`nft flush ruleset`, which "
    "Debian's nftables.service runs on start and restart, or `iptables -t raw -F`). To keep "
    "it from happening: make /etc/nftables.conf flush only its own tables (`table inet "
    "filter` + `delete table inet filter` instead of `flush ruleset`), and order "
    "lrkp-tsl.service After=nftables.service (see the README, 'Living with nftables.service')"
)


class SelfHeal:
    def __init__(
        self,
        plane: DataPlane,
        queue_rule: QueueRule,
        engine: Engine,
        reload: Callable[[], None],
        watch: RulesetWatch | None = None,
    ) -> None:
        self.plane = plane
        self.queue_rule = queue_rule
        self.engine = engine
        self.reload = reload
        self.watch = watch or RulesetWatch()
        self.repairs = 0
        self._generation: int | None = None
        self._fingerprint: Fingerprint | None = None

    def arm(self) -> None:
        """Remember the state the node just installed as the one to keep."""
        self._generation = self.watch.generation()
        self._fingerprint = self.watch.fingerprint(FAMILY, TABLE)

    def check(self, now: float) -> bool:
        """Repair if needed; True if something was repaired."""
        generation = self.watch.generation()
        if generation == self._generation:
            return False
        fingerprint = self.watch.fingerprint(FAMILY, TABLE)
        problems = [] if fingerprint is not None else [f"table {FAMILY} {TABLE} is gone"]
        if fingerprint is not None and self._fingerprint is not None:
            problems += self._fingerprint.differences(fingerprint)
        if not self.queue_rule.present(self.watch):
            problems.append("the first-packet queue rule is gone")
        if not problems:
            self._generation = generation
            return False
        log.error("%s. %s. Repairing now.", "; ".join(problems), ADVICE)
        self.reload()
        calls = self.engine.reinstall(now)
        self.queue_rule.install()
        self.arm()
        self.repairs += 1
        self.engine.stats["kernel.repairs"] += 1
        log.warning("repaired: table %s %s reloaded, %d live calls put back", FAMILY, TABLE, calls)
        return True

    def close(self) -> None:
        self.watch.close()
