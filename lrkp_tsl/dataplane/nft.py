"""nftables adapter: `table ip lrkp`, loaded from lrkp_tsl/rules/lrkp.nft, changed only
through its maps.

Uses libnftables' official Python binding (Debian's python3-nftables, the same version as
the installed library). Every change is one nftables transaction: a call's flows appear or
disappear together, never half. Map data that is a concatenation cannot be *declared*
through JSON in libnftables 1.0.6 (it can crash the process), so the maps are declared in
the rules file and only elements travel as JSON.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import nftables

from lrkp_tsl.dataplane import nftbatch
from lrkp_tsl.dataplane.nftbatch import endpoint_bytes
from lrkp_tsl.dataplane.nftsets import SetReader
from lrkp_tsl.dataplane.nftwatch import BaseChain, RulesetWatch
from lrkp_tsl.defaults import DEFAULT_RULES
from lrkp_tsl.errors import KernelError
from lrkp_tsl.kernel import KernelState
from lrkp_tsl.media import Endpoint, Flow, InstalledFlow, PortRange

log = logging.getLogger("lrkp_tsl.dataplane.nft")

FAMILY = "ip"
FAMILY_NUMBER = 2  # AF_INET: nf_tables' "ip" family
TABLE = "lrkp"
FLOW_MAPS = ("dnat_to", "snat_to")
# nftables keeps at most 128 bytes of comment per element.
COMMENT_MAX = 128
IDLE_POLICY = "relay_idle"
# The base chain of the nft queue path (queue.py): the node's, but not in the rules file.
QUEUE_CHAIN = "queue"
# What libnftables says when the kernel refuses to change a base chain's type, hook or
# priority in place.
_NOT_SUPPORTED = os.strerror(errno.EOPNOTSUPP)
CTA_TIMEOUT_UDP_UNREPLIED = 1
# Elements per transaction when many calls go in at once (restart, reinstall): big enough
# to amortise the transaction, small enough to keep one failure's blast radius bounded.
INSTALL_BATCH = 4096
# Chains and sets of earlier releases' rules: the `unmark` chain (the node now clears the
# queue mark in its verdict) and the `seen` set (silence is read from conntrack now).
OBSOLETE = ((nftbatch.NFT_MSG_DELCHAIN, "unmark"), (nftbatch.NFT_MSG_DELSET, "seen"))
_POLICY = re.compile(r"policy = \{[^}]*\}")


def _chain_change(old: BaseChain, new: BaseChain | None) -> str:
    """What changed in a base chain, for a log line: "prerouting priority -310 -> -305"."""
    if new is None:
        return f"{old}: no longer in the rules file, removed"
    parts = []
    if new.type != old.type:
        parts.append(f"type {old.type} -> {new.type}")
    if new.hook != old.hook:
        parts.append(f"hook {old.hook} -> {new.hook}")
    if new.priority != old.priority:
        parts.append(f"{new.hook} priority {old.priority} -> {new.priority}")
    return ", ".join(parts)


def element_comment(call_id: str) -> str:
    """The Call-ID as an nft comment: printable, unquoted, bounded.

    The comment is for operators reading `nft list table ip lrkp`; the node's own records
    keep the exact Call-ID.
    """
    if call_id.isprintable() and '"' not in call_id and "\\" not in call_id:
        text = call_id  # the usual Call-ID: nothing to replace (per-command hot path)
    else:
        text = "".join(c if c.isprintable() and c not in '"\\' else "_" for c in call_id)
    if text.isascii() and len(text) <= COMMENT_MAX:
        return text
    return text.encode()[:COMMENT_MAX].decode(errors="ignore")


def _key(flow: Flow | InstalledFlow) -> dict[str, Any]:
    return {"concat": [str(flow.sender.ip), flow.sender.port, str(flow.relay.ip), flow.relay.port]}


def _element(verb: str, name: str, elem: list[Any]) -> dict[str, Any]:
    return {verb: {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elem}}}


def add_commands(call_id: str, flows: Iterable[Flow]) -> list[dict[str, Any]]:
    """JSON commands adding each flow to both maps, commented with the Call-ID."""
    comment = element_comment(call_id)
    dnat: list[Any] = []
    snat: list[Any] = []
    for flow in flows:
        key = {"elem": {"val": _key(flow), "comment": comment}}
        dnat.append([key, {"concat": [str(flow.target.ip), flow.target.port]}])
        snat.append([key, {"concat": [str(flow.relay_out.ip), flow.relay_out.port]}])
    if not dnat:
        return []
    return [_element("add", "dnat_to", dnat), _element("add", "snat_to", snat)]


def delete_commands(flows: Iterable[Flow | InstalledFlow]) -> list[dict[str, Any]]:
    keys = [_key(flow) for flow in flows]
    if not keys:
        return []
    return [_element("delete", name, keys) for name in FLOW_MAPS]


class NftTable:
    """The node's nftables table in the network namespace this object was created in."""

    def __init__(self, rules_path: Path = DEFAULT_RULES) -> None:
        self.rules_path = rules_path
        # One context for JSON transactions (the hot path), one for text (load, list).
        self._json = nftables.Nftables()
        self._json.set_json_output(True)
        self._text = nftables.Nftables()
        # Read the maps and objects over netlink (nftsets.py, nftwatch.py), in this
        # namespace whoever calls: libnftables would fetch every element to list anything.
        self._reader = SetReader()
        self._watch = RulesetWatch()
        self._batch = nftbatch.BatchSocket(FAMILY_NUMBER, TABLE)

    # -- text: load, list, drop ------------------------------------------------------------

    def run_text(self, commands: str, what: str) -> str:
        rc, output, error = self._text.cmd(commands)
        if rc != 0:
            raise KernelError(f"{what}: nft said: {error.strip()}")
        return str(output)

    def load(
        self, relay_addrs: Sequence[IPv4Address], ports: PortRange, idle_timeout: float
    ) -> bool:
        """Install or refresh the table in one transaction, keeping existing map elements
        (`load_batch` says how); base chains that changed are replaced in that transaction
        (`_replace_base_chains`). True if the idle policy held another value and was made
        anew: the live calls' conntrack entries lost it (engine.renew_streams)."""
        current = self.idle_policy()
        replaced = current is not None and current != max(1, round(idle_timeout))
        what = f"loading {self.rules_path}"
        try:
            self.run_text(self.load_batch(relay_addrs, ports, idle_timeout), what)
        except KernelError as error:
            if _NOT_SUPPORTED not in error.reason:
                raise
            self._replace_base_chains(relay_addrs, ports, idle_timeout, what)
        self._drop_obsolete()
        return replaced

    def check_load(
        self, relay_addrs: Sequence[IPv4Address], ports: PortRange, idle_timeout: float
    ) -> None:
        """Have the kernel validate exactly what `load` would send, committing nothing
        (libnftables' dry run, `nft -c`); KernelError with what nft said if it refuses."""
        batch = self.load_batch(relay_addrs, ports, idle_timeout)
        dry = nftables.Nftables()
        dry.set_dry_run(True)
        rc, _output, error = dry.cmd(batch)
        if rc != 0 and _NOT_SUPPORTED in error:
            # A base chain that changed: `load` replaces it, so check that transaction.
            names = self._replaceable_chains()
            rc, _output, error = dry.cmd(self.load_batch(relay_addrs, ports, idle_timeout, names))
        if rc != 0:
            raise KernelError(f"checking {self.rules_path}: nft said: {error.strip()}")

    def load_batch(
        self,
        relay_addrs: Sequence[IPv4Address],
        ports: PortRange,
        idle_timeout: float,
        replace_chains: Sequence[str] = (),
    ) -> str:
        """The one transaction that installs or refreshes the table.

        `flush table` empties the chains but keeps sets and maps with their elements (live
        calls keep flowing through a reload); the file then re-adds the rules. Relay
        addresses and ports are replaced from config; the `relay_idle` conntrack timeout
        policy is set to `idle_timeout`. That object is replaced only when its value
        changes: deleting it strips the policy from every live conntrack entry.
        `replace_chains`: base chains deleted after the flush, for the file to declare anew.
        """
        try:
            rules = self.rules_path.read_text()
        except OSError as exc:
            raise KernelError(f"cannot read nftables rules {self.rules_path}: {exc}") from exc
        seconds = max(1, round(idle_timeout))
        policy = f"policy = {{ unreplied : {seconds}, replied : {seconds} }}"
        rules = _POLICY.sub(policy, rules, count=1)
        current = self.idle_policy()
        addrs = ", ".join(str(a) for a in relay_addrs)
        head = [f"add table {FAMILY} {TABLE}", f"flush table {FAMILY} {TABLE}"]
        if current is not None and current != seconds:
            head.append(f"delete ct timeout {FAMILY} {TABLE} {IDLE_POLICY}")
        body = [
            rules,
            f"flush set {FAMILY} {TABLE} relay_addrs",
            f"flush set {FAMILY} {TABLE} relay_ports",
            f"add element {FAMILY} {TABLE} relay_addrs {{ {addrs} }}",
            f"add element {FAMILY} {TABLE} relay_ports {{ {ports.start}-{ports.end} }}",
        ]
        deletes = [f"delete chain {FAMILY} {TABLE} {name}" for name in replace_chains]
        return "\n".join(head + deletes + body)

    def _replaceable_chains(self) -> list[str]:
        return [name for name in self._watch.base_chains(FAMILY, TABLE) if name != QUEUE_CHAIN]

    def _replace_base_chains(
        self,
        relay_addrs: Sequence[IPv4Address],
        ports: PortRange,
        idle_timeout: float,
        what: str,
    ) -> None:
        """Load the rules over a table whose base chains differ from the file's.

        The kernel cannot change a base chain's type, hook or priority in place (an upgraded
        rules file, or a chain an operator re-created by hand): the plain reload fails with
        EOPNOTSUPP. So the table's base chains are deleted and declared again by the file in
        the same transaction: packets meet the old chains until the commit and the new ones
        after it. Sets, maps, counters and the idle policy are not touched, so live calls
        keep their elements and their conntrack entries keep their timeout.
        """
        before = self._watch.base_chains(FAMILY, TABLE)
        names = [name for name in before if name != QUEUE_CHAIN]
        self.run_text(self.load_batch(relay_addrs, ports, idle_timeout, names), what)
        after = self._watch.base_chains(FAMILY, TABLE)
        changes = [
            f"replaced base chain {name} ({_chain_change(before[name], after.get(name))})"
            for name in names
            if after.get(name) != before[name]
        ]
        log.warning(
            "%s: %s. The kernel cannot change a base chain's type, hook or priority in "
            "place, so the table's base chains were deleted and declared again in the same "
            "transaction as the rules; map elements, counters and the live calls' conntrack "
            "entries were kept",
            self.rules_path,
            "; ".join(changes) or f"re-created base chains {', '.join(names)}",
        )

    def _drop_obsolete(self) -> None:
        """Remove what older rules files declared and this one no longer does (a reload keeps
        chains and sets): an empty base chain would still cost every packet a hook."""
        for msg_type, name in OBSOLETE:
            if nftbatch.delete_object(self._batch, msg_type, name):
                log.info("removed %s from table %s %s (no longer used)", name, FAMILY, TABLE)

    def idle_policy(self) -> int | None:
        """The `relay_idle` timeout in the kernel (seconds), or None if there is none.

        Over netlink: a libnftables listing of a ct timeout fetches every set element first
        (9 s at 50k calls), and its JSON output aborts the process (libnftables 1.0.6).
        """
        policy = self._watch.ct_timeout(FAMILY, TABLE, IDLE_POLICY)
        return None if policy is None else policy.get(CTA_TIMEOUT_UDP_UNREPLIED)

    def close(self) -> None:
        self._reader.close()
        self._watch.close()
        self._batch.close()

    def present(self) -> bool:
        """Whether the table is in the kernel, over netlink: no map element is read (a
        libnftables listing would fetch them all: seconds at 50k calls)."""
        return self._watch.fingerprint(FAMILY, TABLE) is not None

    def exists(self) -> bool:
        rc, _output, _error = self._text.cmd(f"list table {FAMILY} {TABLE}")
        return bool(rc == 0)

    def drop(self) -> None:
        """Remove the whole table (everything the node installed in nftables)."""
        if self.exists():
            self.run_text(f"delete table {FAMILY} {TABLE}", "removing table")

    def listing(self) -> str:
        """`nft list table ip lrkp`, as an operator sees it."""
        return self.run_text(f"list table {FAMILY} {TABLE}", "listing table")

    def learning(self) -> frozenset[Endpoint]:
        """The relay endpoints in the `learning` set, read back from the kernel.

        Read over nf_tables netlink (nftsets), on sockets of this table's namespace.
        """
        return self._reader.read_learning(FAMILY, TABLE, "learning")

    def flow_keys(self) -> list[tuple[Endpoint, Endpoint]]:
        """(sender, relay) of every flow in the table, read back from the kernel."""
        return [(flow.sender, flow.relay) for flow in self.installed()]

    def installed(self) -> list[InstalledFlow]:
        """Every flow in the kernel with its comment, for re-adoption after a restart.

        A flow whose two map elements disagree (one missing) is returned with the missing
        side as None, so the caller can clean it up. Read over nf_tables netlink (nftsets:
        no libnftables cache left behind, several times faster at 100,000s of elements), on
        sockets of this table's namespace. One reader at a time.
        """
        return self._reader.read_flows(FAMILY, TABLE, FLOW_MAPS)

    def state(self) -> KernelState:
        """Both flow maps and the learning set as one snapshot, consistent or not
        (nftsets.SetReader.read_state): the startup reconciliation's read."""
        return self._reader.read_state(FAMILY, TABLE, FLOW_MAPS, "learning")

    def counter_packets(self, name: str) -> int:
        output = self.run_text(f"list counter {FAMILY} {TABLE} {name}", f"reading {name}")
        for line in output.splitlines():
            words = line.split()
            if "packets" in words:
                return int(words[words.index("packets") + 1])
        raise KernelError(f"counter {name}: no packet count in {output!r}")

    # -- JSON: the per-call transactions -----------------------------------------------------

    def transaction(self, commands: list[dict[str, Any]], what: str) -> None:
        if not commands:
            return
        rc, _output, error = self._json.cmd(json.dumps({"nftables": commands}))
        if rc != 0:
            raise KernelError(f"{what}: nft said: {error.strip()}")

    def change(self, change: ElementChange) -> int:
        """One call's element changes (delete, then add) in one transaction.

        Deletion is idempotent: an element to delete that is already gone (an operator, or
        an earlier failure) is counted (and the count returned), and the rest is committed
        atomically without it. Encoded as netlink directly (nftbatch.py).
        """
        (error,) = self.change_many([change])
        if error is not None:
            raise error
        return change.missing

    def change_many(self, changes: Sequence[ElementChange]) -> list[KernelError | None]:
        """Several calls' changes in as few transactions as possible (group commit).

        Per change, None (committed) or its error; one refused change never refuses the
        others (nftbatch.commit). Each change's `missing` says how many of its deletions
        found nothing to delete.
        """
        encoded = [c.encode(i) for i, c in enumerate(changes)]
        what = [c.describe() for c in changes]
        results = nftbatch.commit(self._batch, encoded, what)
        for change, done in zip(changes, encoded, strict=True):
            change.missing = done.missing
            if done.missing:
                log.warning("%s: %d elements to delete were already gone", change.describe(),
                            done.missing)  # fmt: skip
        return results

    def install(self, calls: Iterable[tuple[str, Iterable[Flow], Iterable[Endpoint]]]) -> None:
        """Add the flows and learning endpoints of many calls, INSTALL_BATCH elements per
        transaction. Adding an element that exists with the same data changes nothing."""
        commands: list[dict[str, Any]] = []
        size = 0
        for call_id, flows, learning in calls:
            flows, learning = list(flows), list(learning)
            commands += add_commands(call_id, flows)
            commands += endpoint_commands("add", "learning", learning, element_comment(call_id))
            size += 2 * len(flows) + len(learning)
            if size >= INSTALL_BATCH:
                self.transaction(commands, f"installing {size} elements")
                commands, size = [], 0
        self.transaction(commands, f"installing {size} elements")


def endpoint_commands(
    verb: str, name: str, endpoints: Iterable[Endpoint], comment: str | None = None
) -> list[dict[str, Any]]:
    """Add or delete (ip . port) elements of a set such as `learning`."""
    elems: list[Any] = []
    for endpoint in endpoints:
        key: dict[str, Any] = {"concat": [str(endpoint.ip), endpoint.port]}
        elems.append({"elem": {"val": key, "comment": comment}} if comment else key)
    return [_element(verb, name, elems)] if elems else []


class ElementChange:
    """One call's element changes, as `NftTable.change_many` takes them."""

    __slots__ = ("add", "call_id", "delete", "displace", "learn", "missing", "unlearn")

    def __init__(
        self,
        call_id: str,
        add: Iterable[Flow] = (),
        delete: Iterable[Flow | InstalledFlow] = (),
        learn: Iterable[Endpoint] = (),
        unlearn: Iterable[Endpoint] = (),
        displace: Iterable[tuple[Endpoint, Endpoint]] = (),
    ) -> None:
        self.call_id = call_id
        self.add = list(add)
        self.delete = list(delete)
        self.learn = list(learn)
        self.unlearn = list(unlearn)
        self.displace = list(displace)
        self.missing = 0

    def describe(self) -> str:
        return f"change of call {self.call_id!r} (+{len(self.add)}/-{len(self.delete)} flows)"

    def encode(self, owner: int) -> nftbatch.Changes:
        def key(sender: Endpoint, relay: Endpoint) -> bytes:
            return endpoint_bytes(sender) + endpoint_bytes(relay)

        return nftbatch.call_changes(
            owner,
            element_comment(self.call_id),
            add=[
                (key(f.sender, f.relay), endpoint_bytes(f.target), endpoint_bytes(f.relay_out))
                for f in self.add
            ],
            delete=[key(f.sender, f.relay) for f in self.delete],
            learn=[endpoint_bytes(e) for e in self.learn],
            unlearn=[endpoint_bytes(e) for e in self.unlearn],
            displace=[key(s, r) for s, r in self.displace],
        )
