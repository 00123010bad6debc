"""Self-healing: put the node's kernel state back when something removes or changes it.

Operators break it without meaning to: Debian's `nftables.service` starts its ruleset with
`flush ruleset` (so does `systemctl restart nftables`), `iptables -t raw -F` takes the queue
rule, `iptables -t raw -I PREROUTING 1 -j ACCEPT` puts a rule ahead of it, `nft flush map`
empties a map, a chain is re-created by hand at another priority. Without the state the node
would keep answering `PONG` and relay nothing, or send every packet through the queue.

Every CHECK_INTERVAL the node asks the kernel for its ruleset generation (one tiny netlink
request). Only when the generation moved (any nftables transaction, the node's own
included) does it look closer, at a cost that does not follow the number of calls:
- the table's fingerprint (table handle and flags, chains with their hooks and policies,
  rules with their expressions; nftwatch.py), and the idle timeout policy's handle;
- the relay addresses and the port range in `relay_addrs`/`relay_ports` (one element GET
  each);
- how many elements `dnat_to`, `snat_to` and `learning` hold, against what the live calls
  need (the call table keeps the sums: `CallTable.flow_count`); on kernels that do not
  report a set's count (older ones), one element of each of a few calls is looked up
  instead, which finds an emptied map;
- the queue rule: there, and first in iptables' raw PREROUTING.

What it finds is logged as an error that says what changed and how to keep it from
happening, then repaired, doing only what is needed: the table is reloaded (rules, relay
sets, the idle policy; base chains whose priority changed are replaced, nft.py), the live
calls' elements are put back, the queue rule is put back first. When the idle policy was
created anew, or a map was emptied, the live calls' conntrack entries are renewed
(engine.renew_streams): they lost the policy (and would live on the kernel's 120 s default
instead of the idle timeout), or a stream that started while a map was empty got an entry
without NAT (which its packets would keep alive for ever). The next check verifies the
repair.

Repairs are paced (`RepairPacer`): one at once, but a repair that fails is retried after 1,
2, 4 ... up to 30 s, and repairs that keep being needed (something fights the node) are
spaced out the same way; the log lines are rate-limited per kind (ratelog.py).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.nft import FAMILY, IDLE_POLICY, TABLE
from lrkp_tsl.dataplane.nftbatch import endpoint_bytes
from lrkp_tsl.dataplane.nftwatch import NFT_OBJECT_CT_TIMEOUT, Fingerprint, RulesetWatch
from lrkp_tsl.dataplane.queue import QueueRule
from lrkp_tsl.engine import Engine
from lrkp_tsl.errors import KernelError
from lrkp_tsl.media import PortRange
from lrkp_tsl.ratelog import RateLimitedLog

log = logging.getLogger("lrkp_tsl.selfheal")

CHECK_INTERVAL = 0.5
# Calls whose elements are looked up where the kernel does not count a set's elements.
WITNESSES = 4
FLUSHED_ADVICE = (
    "Something removed the node's kernel state (`nft flush ruleset`, which Debian's "
    "nftables.service runs on start and restart, or `iptables -t raw -F`). To keep it from "
    "happening: make /etc/nftables.conf flush only its own tables (`table inet filter` + "
    "`delete table inet filter` instead of `flush ruleset`), and order lrkp-tsl.service "
    "After=nftables.service (see the README, 'Living with nftables.service')"
)
CHANGED_ADVICE = (
    "Something changed the node's kernel state. Table ip lrkp and the first-packet queue "
    "rule are the node's own: to change them, change the rules file (kernel.rules) and "
    "restart the node, which replaces them in place and keeps live calls"
)


class RepairPacer:
    """When the next repair may start. Pure: the caller passes the clock.

    An isolated problem is repaired at once. A repair that failed is tried again after
    FIRST, then twice as long each time, up to CAP. Repairs that succeed but keep being
    needed (more than FREE within WINDOW: something keeps undoing them) are spaced out the
    same way, so a fight costs the node a repair every CAP seconds at most, not every check.
    """

    FIRST = 1.0
    CAP = 30.0
    WINDOW = 60.0
    FREE = 3

    def __init__(self) -> None:
        self.next_at = float("-inf")
        self.failures = 0
        self._recent: deque[float] = deque()

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> float:
        """A repair failed: how long until the next attempt."""
        self.failures += 1
        return self._wait(now, self.failures)

    def succeeded(self, now: float) -> float:
        """A repair succeeded: how long until another may start."""
        self.failures = 0
        self._recent.append(now)
        while self._recent and now - self._recent[0] >= self.WINDOW:
            self._recent.popleft()
        return self._wait(now, len(self._recent) - self.FREE)

    def _wait(self, now: float, excess: int) -> float:
        delay = 0.0 if excess <= 0 else min(self.CAP, self.FIRST * 2 ** (excess - 1))
        self.next_at = now + delay
        return delay


@dataclass
class Findings:
    """What a check found wrong, and what the repair must do about it."""

    problems: list[str] = field(default_factory=list)
    gone: bool = False  # the whole table, or the queue rule (not just changed)
    reload: bool = False  # rules, relay sets, idle policy
    reinstall: bool = False  # every live call's elements
    # The live calls' conntrack entries must be made again: they lost the idle policy, or
    # a stream that started while a map was empty got an entry without NAT.
    renew: bool = False
    queue: bool = False  # the queue rule

    def __bool__(self) -> bool:
        return bool(self.problems)


class SelfHeal:
    def __init__(
        self,
        plane: DataPlane,
        queue_rule: QueueRule,
        engine: Engine,
        reload: Callable[[], None],
        relay_addrs: Sequence[IPv4Address] = (),
        ports: PortRange | None = None,
        watch: RulesetWatch | None = None,
    ) -> None:
        self.plane = plane
        self.queue_rule = queue_rule
        self.engine = engine
        self.reload = reload
        self.relay_addrs = tuple(dict.fromkeys(relay_addrs))
        self.ports = ports
        self.watch = watch or RulesetWatch()
        self.repairs = 0
        self.pacer = RepairPacer()
        self.log = RateLimitedLog(log)
        self._generation: int | None = None
        self._fingerprint: Fingerprint | None = None
        self._policy: int | None = None

    def arm(self) -> None:
        """Remember the state the node just installed as the one to keep."""
        self._generation = self.watch.generation()
        self._remember()

    def _remember(self) -> None:
        self._fingerprint = self.watch.fingerprint(FAMILY, TABLE)
        self._policy = self._policy_handle()

    def _policy_handle(self) -> int | None:
        return self.watch.object_handle(FAMILY, TABLE, IDLE_POLICY, NFT_OBJECT_CT_TIMEOUT)

    def check(self, now: float) -> bool:
        """Repair if needed; True if something was repaired."""
        self.log.flush(now)
        if not self.pacer.ready(now):
            return False
        generation = self.watch.generation()
        if generation == self._generation:
            return False
        found = self.inspect()
        if not found:
            self._generation = generation
            return False
        advice = FLUSHED_ADVICE if found.gone else CHANGED_ADVICE
        findings = "; ".join(found.problems)
        self.log.log(
            now, logging.ERROR, "kernel findings", "%s. %s. Repairing now.", findings, advice
        )
        try:
            done = self.repair(found, now)
        except (KernelError, OSError) as error:
            wait = self.pacer.failed(now)
            self.engine.stats["kernel.repairs_failed"] += 1
            self.log.log(
                now, logging.ERROR, "failed repairs",
                "repair failed: %s; next attempt in %g s", error, wait,
            )  # fmt: skip
            return False
        self.pacer.succeeded(now)
        # The state just put back is the one to keep; the next check verifies it.
        self._remember()
        self._generation = None
        self.repairs += 1
        self.engine.stats["kernel.repairs"] += 1
        self.log.log(now, logging.WARNING, "repairs", "repaired: %s", ", ".join(done))
        return True

    # -- looking ---------------------------------------------------------------------------

    def inspect(self) -> Findings:
        """Everything the node relies on in the kernel, compared with what it should be."""
        found = Findings()
        fingerprint = self.watch.fingerprint(FAMILY, TABLE)
        if fingerprint is None:
            found.problems.append(f"table {FAMILY} {TABLE} is gone")
            found.gone = found.reload = found.reinstall = found.renew = True
        else:
            self._inspect_table(fingerprint, found)
        problem = self.queue_rule.problem(self.watch)
        if problem is not None:
            found.problems.append(problem.text)
            found.queue = True
            found.gone = found.gone or problem.gone
        return found

    def _inspect_table(self, fingerprint: Fingerprint, found: Findings) -> None:
        if self._fingerprint is not None:
            changes = self._fingerprint.differences(fingerprint)
            if changes:
                found.problems += changes
                found.reload = True
            if fingerprint.table_handle != self._fingerprint.table_handle:
                found.reinstall = found.renew = True
        policy = self._policy_handle()
        if policy != self._policy:
            found.problems.append(
                f"the idle timeout policy {IDLE_POLICY} was deleted"
                + (" and created again" if policy is not None else "")
            )
            found.reload = found.renew = True
        self._inspect_relay_sets(found)
        self._inspect_calls(found)

    def _inspect_relay_sets(self, found: Findings) -> None:
        for address in self.relay_addrs:
            if not self.watch.has_element(FAMILY, TABLE, "relay_addrs", address.packed):
                found.problems.append(f"set relay_addrs no longer holds {address}")
                found.reload = True
        if self.ports is not None:
            for port in sorted({self.ports.start, self.ports.end}):
                if not self.watch.has_element(FAMILY, TABLE, "relay_ports", port.to_bytes(2)):
                    found.problems.append(f"set relay_ports no longer holds port {port}")
                    found.reload = True

    def _inspect_calls(self, found: Findings) -> None:
        """The live calls' elements: counted where the kernel counts, else looked up."""
        engine = self.engine
        if engine.suspect or engine.unverified:
            return  # the kernel may differ until they are resynchronised or compared
        counts = self.watch.set_counts(FAMILY, TABLE) or {}
        table = engine.table
        expected = {
            "dnat_to": ("map", table.flow_count),
            "snat_to": ("map", table.flow_count),
            "learning": ("set", table.learning_count),
        }
        if all(counts.get(name) is not None for name in expected):
            for name, (kind, want) in expected.items():
                have = counts[name]
                assert have is not None
                if have < want:
                    found.problems.append(
                        f"{kind} {name} holds {have} elements, the live calls need {want}"
                    )
                    found.reinstall = True
                    found.renew = found.renew or kind == "map"
            return
        for problem in self._witness_problems():
            found.problems.append(problem)
            found.reinstall = True
            found.renew = found.renew or problem.startswith("map")

    def _witness_problems(self) -> list[str]:
        """Without the kernel's counts: one element of each map and of `learning`, taken
        from the first calls of the table, looked up (a few GETs)."""
        problems = []
        for call in self.engine.table.oldest(WITNESSES):
            view = call.view()
            for flow in itertools.islice(view.flows, 1):
                key = endpoint_bytes(flow.sender) + endpoint_bytes(flow.relay)
                for name in ("dnat_to", "snat_to"):
                    if not self.watch.has_element(FAMILY, TABLE, name, key):
                        lost = f"{flow.sender} . {flow.relay}"
                        problems.append(f"map {name} lost call {call.call_id!r}'s flow {lost}")
            for endpoint in itertools.islice(view.learning, 1):
                if not self.watch.has_element(FAMILY, TABLE, "learning", endpoint_bytes(endpoint)):
                    problems.append(f"set learning lost call {call.call_id!r}'s {endpoint}")
        return problems

    # -- repairing ---------------------------------------------------------------------------

    def repair(self, found: Findings, now: float) -> list[str]:
        """Do what `found` needs, in order: the table, the calls' elements, the queue rule,
        then the conntrack entries (whose next packets need all of the rest)."""
        done = []
        if found.reload:
            self.reload()
            done.append(f"table {FAMILY} {TABLE} reloaded")
        if found.reinstall:
            done.append(f"{self.engine.reinstall(now)} live calls put back")
        if found.queue or found.reload:
            # A reload also empties the nft queue path's chain; the xt rule, if it is there
            # and first, is left as it is.
            self.queue_rule.install(self.watch)
            if found.queue:
                done.append("the queue rule put back first")
        if found.renew:
            calls = self.engine.renew_streams(now)
            if calls:
                done.append(
                    f"the conntrack entries of {calls} live calls deleted, made again by their "
                    "next packets (with the idle policy and the NAT)"
                )
        return done

    def close(self) -> None:
        self.watch.close()
