"""Calls and their lifecycle: what `S`, `D`, media activity and time do to the call table.

Pure: no I/O, no clock. Every entry point takes `now` and returns the kernel actions to
apply; the table changes only when the caller reports an action as applied (`applied`).
So a kernel failure leaves the table as it was, and the table never claims a call the
kernel does not relay.

Rules (issue 3):
- Calls are keyed by Call-ID. An `S` for a live call with other addresses (183 then 200,
  a re-INVITE's answer) moves it in place; an identical `S` changes nothing.
- Relay ports belong to one call. An `S` whose relay ports belong to another live call
  replaces that call: Kamailio allocated them anew, so the older call is stale (newest
  wins, and the reason is logged).
- A call with no media in either direction for its idle timeout (the `S` timeout field,
  or the node's override) is removed; so is every call at its maximum lifetime. Kamailio
  5.6 never sends `D`, so expiry is what frees its calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from lrkp_tsl.errors import MediaError
from lrkp_tsl.media import CallMedia, Endpoint, InstalledFlow


@dataclass(frozen=True, slots=True)
class Install:
    """Make the kernel relay `media`, replacing `previous` (this call's old addresses)."""

    media: CallMedia
    previous: CallMedia | None
    idle_timeout: float


@dataclass(frozen=True, slots=True)
class Uninstall:
    """Stop relaying `media`; `reason` is for the log and the operator."""

    media: CallMedia
    reason: str


Action = Install | Uninstall


@dataclass(slots=True)
class Call:
    media: CallMedia
    idle_timeout: float
    started: float
    last_media: float  # last time media was seen, or when the call was (re)committed

    def expiry(self, max_lifetime: float) -> tuple[float, str]:
        idle_at = self.last_media + self.idle_timeout
        end_at = self.started + max_lifetime
        if end_at <= idle_at:
            return end_at, f"reached the maximum lifetime of {max_lifetime:g} s"
        return idle_at, f"no media for {self.idle_timeout:g} s"


class CallTable:
    def __init__(self, max_lifetime: float) -> None:
        self.max_lifetime = max_lifetime
        self._calls: dict[str, Call] = {}
        self._owner: dict[Endpoint, str] = {}  # relay endpoint -> Call-ID

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._calls

    def __iter__(self) -> Iterator[Call]:
        return iter(list(self._calls.values()))

    def get(self, call_id: str) -> Call | None:
        return self._calls.get(call_id)

    def owner(self, relay: Endpoint) -> str | None:
        """The Call-ID whose relay endpoints include `relay`."""
        return self._owner.get(relay)

    # -- decisions (no state change) ------------------------------------------------------

    def on_set(self, media: CallMedia, idle_timeout: float) -> list[Action]:
        existing = self._calls.get(media.call_id)
        if existing is not None and existing.media == media:
            return []
        taken = sorted(
            {
                owner
                for endpoint in media.relay_endpoints()
                if (owner := self._owner.get(endpoint)) not in (None, media.call_id)
            }
        )
        actions: list[Action] = [
            Uninstall(
                self._calls[owner].media,
                f"relay ports reassigned to call {media.call_id!r} (newest wins)",
            )
            for owner in taken
        ]
        previous = existing.media if existing is not None else None
        actions.append(Install(media, previous, idle_timeout))
        return actions

    def on_delete(self, call_id: str) -> list[Action]:
        call = self._calls.get(call_id)
        if call is None:
            return []
        return [Uninstall(call.media, "deleted by the controlling layer (D)")]

    def on_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for call in self._calls.values():
            at, reason = call.expiry(self.max_lifetime)
            if at <= now:
                actions.append(Uninstall(call.media, reason))
        return actions

    def next_deadline(self) -> float | None:
        return min((c.expiry(self.max_lifetime)[0] for c in self._calls.values()), default=None)

    # -- state changes ----------------------------------------------------------------------

    def on_media(self, call_id: str, now: float) -> None:
        """Media was seen for `call_id` (either direction, any stream) at `now`."""
        call = self._calls.get(call_id)
        if call is not None and now > call.last_media:
            call.last_media = now

    def applied(self, action: Action, now: float) -> None:
        """Record that the kernel now does what `action` asked."""
        if isinstance(action, Install):
            if action.previous is not None:
                self._release(action.previous)
            existing = self._calls.get(action.media.call_id)
            started = existing.started if existing is not None else now
            self._calls[action.media.call_id] = Call(
                action.media, action.idle_timeout, started, now
            )
            for endpoint in action.media.relay_endpoints():
                self._owner[endpoint] = action.media.call_id
        else:
            self._release(action.media)
            self._calls.pop(action.media.call_id, None)

    def _release(self, media: CallMedia) -> None:
        for endpoint in media.relay_endpoints():
            if self._owner.get(endpoint) == media.call_id:
                del self._owner[endpoint]


def adopt(flows: Iterable[InstalledFlow]) -> tuple[list[CallMedia], list[InstalledFlow]]:
    """Rebuild calls from the flows a previous run left in the kernel (grouped by comment).

    A group becomes a call only if it is exactly the flows of one CallMedia; anything else
    (a missing element, a truncated Call-ID shared by two calls, a stray element) is
    returned as orphans for the caller to remove. Caller and callee may come back swapped:
    the kernel state of a call is symmetric, so that changes nothing.
    """
    groups: dict[str, list[InstalledFlow]] = {}
    for flow in flows:
        groups.setdefault(flow.comment, []).append(flow)
    calls: list[CallMedia] = []
    orphans: list[InstalledFlow] = []
    for comment, group in groups.items():
        first = min(group, key=lambda f: (f.relay.port, f.sender.port, f.relay.ip, f.sender.ip))
        if not comment or first.target is None or first.relay_out is None:
            orphans += group
            continue
        try:
            media = CallMedia(comment, first.sender, first.relay, first.target, first.relay_out)
        except MediaError:
            orphans += group
            continue
        expected = {(f.sender, f.relay, f.target, f.relay_out) for f in media.flows()}
        found = {(f.sender, f.relay, f.target, f.relay_out) for f in group}
        if expected != found or len(group) != len(expected):
            orphans += group
            continue
        calls.append(media)
    return calls, orphans
