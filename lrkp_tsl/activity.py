"""Media activity, as the kernel pushes it: which calls have live conntrack entries. Pure.

Every relayed stream's conntrack entry carries the node's idle timeout (an nft `ct timeout`
policy, lrkp_tsl/rules/lrkp.nft), so the kernel itself says when a stream went quiet: its entry
expires and ctnetlink reports the DESTROY. A call is *live* while any of its streams has
an entry (RTP on hold with RTCP still flowing stays up) and *quiet* otherwise, from a known
moment on. Nothing here is polled: the cost is per event, not per call per tick.

- STARTED: a stream carries media; the call is live.
- EXPIRED: no packet for the whole idle timeout. If it was the call's last entry, the call
  has been quiet since `now - idle_timeout` (already due).
- REMOVED: deleted early (the node re-binding a stream, an operator, a flush): says
  nothing about media. If it was the last entry, the call is quiet from now on; a next
  packet creates a new entry and makes it live again.

Quiet calls are checked against the kernel before they end (engine.py), so an event lost
to a full socket buffer can delay an expiry but never end a live call.
"""

from __future__ import annotations

from lrkp_tsl.kernel import StreamChange, StreamKey


class Activity:
    def __init__(self) -> None:
        self._live: dict[str, set[StreamKey]] = {}
        self._quiet: dict[str, float] = {}

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._live or call_id in self._quiet

    def quiet_since(self, call_id: str) -> float | None:
        """Since when the call has had no live stream; None while it has one."""
        return self._quiet.get(call_id)

    def quiet(self, call_id: str, since: float) -> None:
        """Treat the call as quiet since `since` (a new call, or one whose state is
        unknown: restored after a restart, or after lost events)."""
        self._live.pop(call_id, None)
        self._quiet[call_id] = since

    def live(self, call_id: str, keys: set[StreamKey]) -> None:
        """The kernel was asked and has these live entries for the call."""
        self._quiet.pop(call_id, None)
        self._live[call_id] = set(keys)

    def drop(self, call_id: str) -> None:
        self._live.pop(call_id, None)
        self._quiet.pop(call_id, None)

    def live_calls(self) -> list[str]:
        return list(self._live)

    def on_event(
        self, call_id: str, change: StreamChange, key: StreamKey, now: float, idle: float
    ) -> bool:
        """Apply one stream event of a known call; True if the call turned live or quiet."""
        keys = self._live.get(call_id)
        if change is StreamChange.STARTED:
            if keys is None:
                self._quiet.pop(call_id, None)
                self._live[call_id] = {key}
                return True
            keys.add(key)
            return False
        if keys is None or key not in keys:
            return False
        keys.discard(key)
        if keys:
            return False
        del self._live[call_id]
        self._quiet[call_id] = now - idle if change is StreamChange.EXPIRED else now
        return True
