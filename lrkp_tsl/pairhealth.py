"""Is the pair ready for a takeover? Each node's view of it, and the alarms it logs. Pure.

A standby that cannot follow its active node is a pair that will lose every call at the
next takeover, and nothing else shows it: the standby answers nothing while it waits. So
both nodes look at replication every PROBE_INTERVAL (pair.py's prober thread reads the
Redis servers; the verdict is made here, on the event loop) and say what they see in
`lrkp-ctl ping`/`stats`, in the metrics and in the log.

The standby is *in sync* when its Redis is a replica of the peer's with the link up and
no copy in progress, the peer's Redis answers it, the following thread has loaded the
active's table and reads its changes without error, and it is known to hold everything
the active had LAG_ALARM seconds ago or later. *Lag* is measured, not guessed: a probe
reads the active's replication offset (at `Probe.at`), then its own Redis's offset and
last change; once this Redis's offset has reached that offset and the engine has applied
that change, the standby holds everything the active had at `Probe.at`. Lag is the age of
the newest such moment, so it grows while the link is cut or Redis stands still.

The active is *followed* when its Redis has a replica that is online and acknowledges,
and the standby node's own report (written into the active's Redis by the standby, with
an expiry) says it is in sync.

Alarms: a problem that lasts ALARM_AFTER (the standby) or NO_STANDBY_ALARM (the active,
whose standby may be restarting) is logged as a WARNING that says what is wrong and what
it means, then reminded every REMIND_EVERY while it lasts; an INFO line says when it is
over and how long it lasted. A standby still copying the active's table (a full resync,
a first load of 50k calls) is given CATCH_UP_ALARM before it alarms.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("lrkp_tsl.pair")

PROBE_INTERVAL = 0.5
"""How often the prober reads the Redis servers (seconds)."""
PROBE_TIMEOUT = 0.5
"""How long one Redis may take to answer a probe."""
ALARM_AFTER = 1.0
"""A standby's problem is logged once it has lasted this long (one more probe confirms it)."""
CATCH_UP_ALARM = 30.0
"""A standby still copying or loading the active's table alarms after this long."""
NO_STANDBY_ALARM = 10.0
"""The active alarms when no standby has followed it for this long (one may be restarting)."""
LAG_ALARM = 5.0
"""A standby that holds nothing newer than this many seconds is not in sync."""
ACK_ALARM = 5
"""An active whose replica has not acknowledged for this many seconds (Redis's `lag`)."""
REMIND_EVERY = 60.0
"""While a problem lasts, it is logged again this often."""
REPORT_TTL = 3.0
"""The standby's report in the active's Redis expires after this long."""
TARGETS = 256


def replicas(info: Mapping[str, str]) -> list[dict[str, str]]:
    """A master's replicas from its INFO replication (`slaveN:ip=...,port=...,state=...,
    offset=...,lag=...`), in order."""
    found = []
    for index in range(int(info.get("connected_slaves", "0") or 0)):
        line = info.get(f"slave{index}")
        if line:
            found.append(dict(part.partition("=")[::2] for part in line.split(",")))
    return found


def stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Probe:
    """One look at the Redis servers, taken at `at` (monotonic, before the peer was read)."""

    at: float
    local: Mapping[str, str] | None  # INFO replication of this node's Redis
    local_error: str | None = None
    last_change: str | None = None  # standby: the last entry of its replica's change stream
    peer: Mapping[str, str] | None = None  # standby: INFO replication of the active's Redis
    peer_error: str | None = None
    peer_calls: int | None = None  # standby: the calls the active's Redis holds
    standby: Mapping[str, Any] | None = None  # active: the standby node's report
    peer_active: bool | None = None  # active: the peer node is active too (None: unknown)


@dataclass(frozen=True, slots=True)
class FollowState:
    """The following thread's state (pair.py), as the event loop reads it."""

    loaded: bool  # the active's whole table was handed over since following started
    error: str | None  # its last failure, while it lasts


@dataclass(frozen=True, slots=True)
class PublishState:
    """The publishing worker's state (publishing.py), as the event loop reads it."""

    master: bool  # told to publish (the node is active)
    ok: bool  # Redis is a master and holds the whole table, as far as the worker knows
    error: str | None  # the last failure, while Redis is failing
    queued: int  # changes waiting
    written: int  # changes written since the start
    resets: int  # whole-table republishes since the start
    dropped: int  # changes not queued (the queue was full): covered by a reset


class CatchUp:
    """Since when a node is known to hold everything the other had: targets (what the
    other had, at a time) are reached by progress (what this node has)."""

    def __init__(self) -> None:
        self._targets: deque[tuple[float, Any]] = deque(maxlen=TARGETS)
        self.as_of: float | None = None

    def target(self, at: float, value: Any) -> None:
        self._targets.append((at, value))

    def progress(self, value: Any) -> None:
        while self._targets and self._targets[0][1] <= value:
            self.as_of = self._targets.popleft()[0]

    def reset(self) -> None:
        self._targets.clear()
        self.as_of = None


class Alarm:
    """A condition logged once it has lasted `after` (or `soft_after` for problems that are
    expected for a while), reminded every REMIND_EVERY, and its end logged once."""

    def __init__(self, subject: str, meaning: str, after: float, soft_after: float) -> None:
        self.subject = subject  # "standby"
        self.meaning = meaning  # what holds when all is well: "following the active node"
        self.after = after
        self.soft_after = soft_after
        self.bad_since: float | None = None
        self.raised_at: float | None = None  # when the first WARNING was logged
        self._said_at = 0.0
        self.raised = 0  # WARNINGs logged (first ones and reminders)

    def update(self, problems: list[str], soft: list[str], now: float) -> bool:
        """Returns True when a WARNING was logged now."""
        if not problems and not soft:
            if self.raised_at is not None and self.bad_since is not None:
                log.info(
                    "%s: %s again, after %.0f s", self.subject, self.meaning, now - self.bad_since
                )
            self.bad_since = self.raised_at = None
            return False
        if self.bad_since is None:
            self.bad_since = now
        lasted = now - self.bad_since
        what = "; ".join(problems + soft)
        if self.raised_at is None:
            if lasted < (self.after if problems else self.soft_after):
                return False
            self.raised_at = self._said_at = now
            log.warning(
                "%s: NOT %s (a takeover now would lose calls): %s", self.subject, self.meaning, what
            )
        elif now - self._said_at >= REMIND_EVERY:
            self._said_at = now
            log.warning(
                "%s: still NOT %s, for %.0f s (a takeover now would lose calls): %s",
                self.subject,
                self.meaning,
                lasted,
                what,
            )
        else:
            return False
        self.raised += 1
        return True


class PairHealth:
    """Both roles' views (only the current role's is fed), on the event loop."""

    def __init__(self, peer: str) -> None:
        self.peer = peer  # the peer's Redis as configured (password redacted)
        where = urlsplit(peer)
        self._peer_address = f"{where.hostname}:{where.port or 6379}"
        self.role = "starting"
        self.role_since = 0.0
        self.standby_alarm = _standby_alarm()
        self.active_alarm = _active_alarm()
        self._redis = CatchUp()
        self._apply = CatchUp()
        self._first_sync_said = False
        self.applied_id = "0-0"
        self.applied_at: float | None = None
        self.applied = 0
        self._status: dict[str, Any] = {"role": "starting", "peer": peer, "in_sync": False}

    # -- inputs ----------------------------------------------------------------------------

    def became(self, role: str, now: float) -> None:
        """The node became `active` or `standby`."""
        self.role = role
        self.role_since = now
        self.standby_alarm = _standby_alarm()
        self.active_alarm = _active_alarm()
        self._redis.reset()
        self._apply.reset()
        self._first_sync_said = False
        self._status = {"role": role, "peer": self.peer, "in_sync": False}

    def changes_applied(self, stream_id: str, count: int, now: float) -> None:
        """The standby's engine applied changes up to `stream_id`."""
        self.applied_id = stream_id
        self.applied_at = now
        self.applied += count
        self._apply.progress(stream_key(stream_id))

    def table_loaded(self, stream_id: str) -> None:
        """The standby loaded the active's whole table, as of `stream_id`."""
        self.applied_id = stream_id
        self._apply.progress(stream_key(stream_id))

    def probed_standby(self, probe: Probe, follow: FollowState, calls: int, now: float) -> None:
        if self.role != "standby":
            return
        problems: list[str] = []
        soft: list[str] = []
        link = self._local_link(probe, problems, soft)
        if probe.peer_error is not None:
            problems.append(f"the active's Redis {self.peer} does not answer this node: "
                            f"{_short(probe.peer_error)}")  # fmt: skip
        elif probe.peer is not None and probe.local is not None and link == "up":
            self._redis_target(probe, problems, soft)
        if follow.error is not None:
            problems.append(f"reading the active's changes fails: {_short(follow.error)}")
        elif not follow.loaded:
            soft.append("loading the active's table")
        if probe.last_change is not None:
            self._apply.target(probe.at, stream_key(probe.last_change))
            self._apply.progress(stream_key(self.applied_id))
        lag = self._lag(now)
        applied_ago = None if self.applied_at is None else round(now - self.applied_at, 1)
        if lag is None and not problems and not soft:
            soft.append("not yet known to hold the active's changes")
        elif lag is not None and lag > LAG_ALARM and not problems:
            problems.append(f"holds nothing newer than {lag:.1f} s ago from the active")
        in_sync = not problems and not soft
        state = "in sync" if in_sync else ("catching up" if not problems else "not following")
        self._status = {
            "role": "standby",
            "peer": self.peer,
            "in_sync": in_sync,
            "state": state,
            "problems": problems + soft,
            "link": link,
            "lag": None if lag is None else round(lag, 3),
            "last_applied_ago": applied_ago,
            "last_applied_id": self.applied_id,
            "applied": self.applied,
            "calls": calls,
            "active_calls": probe.peer_calls,
            "state_since": round(now - (self.standby_alarm.bad_since or self.role_since), 1),
        }
        self.standby_alarm.update(problems, soft, now)
        if in_sync and not self._first_sync_said:
            self._first_sync_said = True
            log.info(
                "standby: in sync with the active node (%d calls here, %s on the active; "
                "lag %.3f s)",
                calls,
                "?" if probe.peer_calls is None else probe.peer_calls,
                lag or 0.0,
            )

    def probed_active(self, probe: Probe, publish: PublishState, calls: int, now: float) -> None:
        if self.role != "active":
            return
        problems: list[str] = []
        soft: list[str] = []
        if probe.peer_active:
            problems.append(
                "SPLIT BRAIN: the peer node is active too (its Redis is a master and it "
                "announces itself): both nodes hold the VIPs, so VRRP between them is lost; "
                "when it returns, the node that loses the VIPs drops the calls set up on it "
                "meanwhile (README, 'Split brain')"
            )
        if probe.local_error is not None:
            problems.append(f"this node's Redis does not answer: {_short(probe.local_error)}")
        elif publish.error is not None:
            problems.append(f"this node's Redis does not take changes: {_short(publish.error)}")
        followers = replicas(probe.local or {})
        replica: dict[str, Any] | None = None
        if probe.local is not None and not followers:
            soft.append("no standby's Redis replicates this node's Redis")
        elif followers:
            first = followers[0]
            offset = int(probe.local.get("master_repl_offset", "0") or 0) if probe.local else 0
            replica = {
                "address": f"{first.get('ip')}:{first.get('port')}",
                "state": first.get("state"),
                "behind_bytes": max(0, offset - int(first.get("offset", "0") or 0)),
                "ack_ago": int(first.get("lag", "0") or 0),
            }
            if replica["state"] != "online":
                soft.append(f"the standby's Redis copies this node's table ({replica['state']})")
            elif replica["ack_ago"] >= ACK_ALARM:
                problems.append(f"the standby's Redis acknowledged last {replica['ack_ago']} s ago")
        report = probe.standby
        if report is None:
            if probe.local is not None:
                soft.append(
                    "the standby node does not report (not running, or it cannot reach "
                    "this node's Redis)"
                )
        elif not report.get("in_sync"):
            said = "; ".join(str(p) for p in report.get("problems", [])) or "it is starting"
            # A standby starting or copying this node's table has its own time to do so.
            (problems if report.get("state") == "not following" else soft).append(
                f"the standby is not in sync: {said}"
            )
        in_sync = not problems and not soft
        self._status = {
            "role": "active",
            "peer": self.peer,
            "in_sync": in_sync,
            "state": "followed"
            if in_sync
            else "split brain"
            if probe.peer_active
            else "not followed",
            "split_brain": bool(probe.peer_active),
            "problems": problems + soft,
            "replica": replica,
            "standby": dict(report) if report is not None else None,
            "lag": report.get("lag") if report is not None else None,
            "calls": calls,
            "standby_calls": report.get("calls") if report is not None else None,
            "published": publish.written,
            "queued": publish.queued,
            "republished": publish.resets,
            "state_since": round(now - (self.active_alarm.bad_since or self.role_since), 1),
        }
        self.active_alarm.update(problems, soft, now)
        if in_sync and not self._first_sync_said:
            self._first_sync_said = True
            log.info(
                "active: the standby follows this node in sync (%s calls there, %d here)",
                self._status["standby_calls"],
                calls,
            )

    # -- outputs ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `lrkp-ctl ping`/`stats` and the metrics show (as of the last probe)."""
        return dict(self._status)

    def report(self) -> dict[str, Any]:
        """What the standby tells the active (into the active's Redis)."""
        status = self._status
        return {
            "in_sync": bool(status.get("in_sync")),
            "state": status.get("state", "starting"),
            "problems": status.get("problems", []),
            "lag": status.get("lag"),
            "calls": status.get("calls"),
        }

    # -- internals -------------------------------------------------------------------------

    def _local_link(self, probe: Probe, problems: list[str], soft: list[str]) -> str:
        """The replication link as this node's Redis sees it."""
        if probe.local_error is not None:
            problems.append(f"this node's Redis does not answer: {_short(probe.local_error)}")
            return "unknown"
        info = probe.local or {}
        role = info.get("role")
        if role != "slave":
            problems.append(f"this node's Redis is not a replica of the active's (role {role})")
            return "none"
        master = f"{info.get('master_host')}:{info.get('master_port')}"
        if master != self._peer_address:
            problems.append(f"this node's Redis replicates {master}, not {self.peer}")
            return "wrong master"
        if info.get("master_link_status") != "up":
            down = int(info.get("master_link_down_since_seconds", "-1") or -1)
            since = "never up" if down < 0 else f"down for {down} s"
            problems.append(f"the replication link to {master} is down ({since})")
            return "down"
        if info.get("master_sync_in_progress") == "1" or info.get("loading") == "1":
            soft.append("this node's Redis is copying the active's table (full resync)")
            return "syncing"
        return "up"

    def _redis_target(self, probe: Probe, problems: list[str], soft: list[str]) -> None:
        peer = probe.peer or {}
        local = probe.local or {}
        if peer.get("role") != "master":
            problems.append(f"the peer's Redis is not a master (role {peer.get('role')})")
            return
        if peer.get("master_replid") != local.get("master_replid"):
            soft.append("this node's Redis holds another history than the active's (resync)")
            return
        self._redis.target(probe.at, int(peer.get("master_repl_offset", "0") or 0))
        self._redis.progress(int(local.get("slave_repl_offset", "-1") or -1))

    def _lag(self, now: float) -> float | None:
        if self._redis.as_of is None or self._apply.as_of is None:
            return None
        return max(0.0, now - min(self._redis.as_of, self._apply.as_of))


def _standby_alarm() -> Alarm:
    return Alarm("standby", "following the active node", ALARM_AFTER, CATCH_UP_ALARM)


def _active_alarm() -> Alarm:
    """Confirmed problems alarm at once; a standby that is absent may be restarting."""
    return Alarm("active", "followed by a standby in sync", ALARM_AFTER, NO_STANDBY_ALARM)


HINTS = (
    (
        "protected mode",
        "the peer's redis-server refuses other hosts: set `protected-mode no` there and "
        "bind it to the pair's own addresses only (examples/redis-pair.conf)",
    ),
    (
        "noauth",
        "the peer's Redis wants a password: masterauth in this node's redis.conf, and "
        "redis://:PASSWORD@HOST:PORT in pair.peer_redis",
    ),
    ("wrongpass", "the password in pair.peer_redis (or masterauth) is not the peer's"),
    (
        "connection refused",
        "nothing listens there: is the peer's redis-server running, and bound to that address?",
    ),
    ("timeout", "no answer: the link to the peer, or a firewall dropping its Redis port"),
    ("timed out", "no answer: the link to the peer, or a firewall dropping its Redis port"),
)


def _short(error: str, limit: int = 200) -> str:
    """An error as one line (Redis's protected-mode refusal is a paragraph), and what it
    usually means."""
    line = " ".join(error.split())
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    lowered = error.lower()
    for clue, hint in HINTS:
        if clue in lowered:
            return f"{line} [{hint}]"
    return line
