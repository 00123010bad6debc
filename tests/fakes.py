"""In-memory stand-ins for the kernel and the store, with fault injection.

They implement the engine's interfaces (lrkp_tsl/kernel.py `Kernel`, lrkp_tsl/records.py
`Store`) so that every engine path, failures included, runs without root in milliseconds.
They never replace the real kernel tests (tests/netns/): they exist to make failures
happen on demand, which the real kernel does not do.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable, Mapping, Sequence

from lrkp_tsl.errors import KernelError, StoreError
from lrkp_tsl.kernel import Counters, KernelChange, KernelState, KernelView, Repair, StreamKey
from lrkp_tsl.media import Endpoint, Flow, InstalledFlow
from lrkp_tsl.records import StoredCall
from lrkp_tsl.session import Call


class FakeKernel:
    """The node's maps, learning set and conntrack entries, as dicts.

    `fail_next(method, n)` makes the next n calls of `method` raise KernelError before
    changing anything; `fail_after_deletions = True` makes the next `change` delete what it
    should and then fail before adding (the worst case of a non-atomic path).
    """

    def __init__(self) -> None:
        self.flows: dict[StreamKey, tuple[Flow | InstalledFlow, str]] = {}
        self.learning: dict[Endpoint, str] = {}
        self.entries: dict[StreamKey, float] = {}  # conntrack: key -> seconds left
        self.counted: dict[StreamKey, Counters] = {}  # conntrack counters of live entries
        self.seen: set[StreamKey] = set()
        self.displaced: set[StreamKey] = set()
        self.calls: collections.Counter[str] = collections.Counter()
        self.forgotten: list[frozenset[StreamKey]] = []  # each `forget`'s keys
        self._failures: collections.Counter[str] = collections.Counter()
        self.fail_after_deletions = False
        self.failing_calls: set[str] = set()
        self.batches: list[list[str]] = []  # Call-IDs of each change_many, in order

    def fail_next(self, method: str, times: int = 1) -> None:
        self._failures[method] += times

    def clear_failures(self) -> None:
        self._failures.clear()
        self.fail_after_deletions = False
        self.failing_calls.clear()

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self._failures[method] > 0:
            self._failures[method] -= 1
            raise KernelError(f"injected failure of {method}")

    # -- Kernel ------------------------------------------------------------------------------

    def change(
        self,
        call_id: str,
        before: KernelView,
        after: KernelView,
        displace: Iterable[StreamKey] = (),
    ) -> None:
        self._enter("change")
        if call_id in self.failing_calls:
            raise KernelError(f"injected failure of call {call_id}")
        for flow in before.flows - after.flows:
            self.flows.pop((flow.sender, flow.relay), None)
        for endpoint in before.learning - after.learning:
            self.learning.pop(endpoint, None)
        if self.fail_after_deletions:
            self.fail_after_deletions = False
            raise KernelError("injected failure after the deletions")
        for flow in after.flows - before.flows:
            self.flows[(flow.sender, flow.relay)] = (flow, call_id)
        for endpoint in after.learning - before.learning:
            self.learning[endpoint] = call_id
        self.displaced |= set(displace)

    def change_many(self, changes: Sequence[KernelChange]) -> list[KernelError | None]:
        """Each change as `change` would make it; a failure refuses that change only.

        `fail_call(call_id)` makes the changes of that call fail (inside a batch or not)."""
        self.batches.append([call_id for call_id, *_ in changes])
        results: list[KernelError | None] = []
        for call_id, before, after, displace in changes:
            try:
                self.change(call_id, before, after, displace)
                results.append(None)
            except KernelError as error:
                results.append(error)
        return results

    def fail_call(self, call_id: str) -> None:
        self.failing_calls.add(call_id)

    def repair(self, calls: Sequence[Repair]) -> list[KernelError | None]:
        self.batches.append([call_id for call_id, *_ in calls])
        results: list[KernelError | None] = []
        for call_id, keys, learning, view in calls:
            try:
                self._enter("repair")
                if call_id in self.failing_calls:
                    raise KernelError(f"injected failure of call {call_id}")
            except KernelError as error:
                results.append(error)
                continue
            for key in keys:
                self.flows.pop(key, None)
            for endpoint in learning:
                self.learning.pop(endpoint, None)
            for flow in view.flows:
                self.flows[(flow.sender, flow.relay)] = (flow, call_id)
            for endpoint in view.learning:
                self.learning[endpoint] = call_id
            results.append(None)
        return results

    def install(self, views: Iterable[tuple[str, KernelView]]) -> None:
        self._enter("install")
        for call_id, view in views:
            for flow in view.flows:
                self.flows[(flow.sender, flow.relay)] = (flow, call_id)
            for endpoint in view.learning:
                self.learning[endpoint] = call_id

    def remove(self, flows: Iterable[InstalledFlow], learning: Iterable[Endpoint]) -> None:
        self._enter("remove")
        for flow in flows:
            self.flows.pop((flow.sender, flow.relay), None)
        for endpoint in learning:
            self.learning.pop(endpoint, None)

    def forget(self, keys: Iterable[StreamKey]) -> None:
        self._enter("forget")
        keys = frozenset(keys)
        self.forgotten.append(keys)
        for key in keys:
            self.entries.pop(key, None)

    def alive(self, keys: Iterable[StreamKey]) -> Mapping[StreamKey, float]:
        self._enter("alive")
        return {key: self.entries[key] for key in keys if key in self.entries}

    def counters(self, keys: Iterable[StreamKey]) -> Mapping[StreamKey, Counters]:
        self._enter("counters")
        return {key: self.counted[key] for key in keys if key in self.counted}

    def streams(
        self, keys: Iterable[StreamKey]
    ) -> Mapping[StreamKey, tuple[StreamKey, Counters] | None]:
        self._enter("streams")
        return {
            key: (key, self.counted.get(key, Counters()))
            for key in keys
            if key in self.entries or key in self.counted
        }

    def is_seen(self, sender: Endpoint, relay: Endpoint) -> bool:
        self._enter("is_seen")
        return (sender, relay) in self.seen

    def state(self) -> KernelState:
        self._enter("state")
        flows = []
        for (sender, relay), (flow, call_id) in self.flows.items():
            target = flow.target
            relay_out = flow.relay_out
            flows.append(InstalledFlow(call_id, sender, relay, target, relay_out))
        return KernelState(tuple(flows), frozenset(self.learning))

    # -- what tests look at ------------------------------------------------------------------

    def holds(self) -> KernelView:
        """Everything in the maps and the learning set, as one view."""
        return KernelView(
            frozenset(f for f, _c in self.flows.values() if isinstance(f, Flow)),
            frozenset(self.learning),
        )


class MemoryStore:
    """The engine's Store as a dict; `fail_next(method, n)` like FakeKernel."""

    def __init__(self) -> None:
        self.records: dict[str, StoredCall] = {}
        self.groups = 0
        self._failures: collections.Counter[str] = collections.Counter()

    def fail_next(self, method: str, times: int = 1) -> None:
        self._failures[method] += times

    def clear_failures(self) -> None:
        self._failures.clear()

    def _enter(self, method: str) -> None:
        if self._failures[method] > 0:
            self._failures[method] -= 1
            raise StoreError(f"injected failure of {method}")

    def group(self) -> contextlib.AbstractContextManager[None]:
        """Writes to a dict are immediate: a group adds nothing (it is counted)."""
        self.groups += 1
        return contextlib.nullcontext()

    def put(self, call: Call, quiet_since: float | None) -> None:
        self._enter("put")
        self.records[call.call_id] = StoredCall(call, quiet_since)

    def delete(self, call_id: str) -> None:
        self._enter("delete")
        self.records.pop(call_id, None)

    def set_quiet(self, call_id: str, quiet_since: float | None) -> None:
        self._enter("set_quiet")
        record = self.records.get(call_id)
        if record is not None:
            self.records[call_id] = StoredCall(record.call, quiet_since)

    def load(self) -> list[StoredCall]:
        self._enter("load")
        return list(self.records.values())
