"""The management socket: what `lrkp-ctl` asks a running node, answered from its own state.

Why a socket of its own, not the lrkproxy control port: the control port speaks Kamailio's
protocol to the controlling layer (and is reachable from it); operators need more (list,
delete, drain) and must never be able to reach that from the SIP network.

Where: by default the *abstract* unix socket `@lrkp-tsl` (`DEFAULT_SOCKET`). The kernel
scopes abstract names to the network namespace, so `lrkp-ctl` run with no options inside a
node's namespace (`ip netns exec NS lrkp-ctl sessions`) finds that namespace's node, and
several nodes on one host, one per namespace, never collide (one node per namespace is what
the instance lock enforces anyway). `ctl_socket` in the config (or `--ctl-socket`) moves
it: `@name` for another abstract name, `/path` for a file. Only root, or the node's own
user, may talk to it: the peer's credentials (SO_PEERCRED) are checked on every connection.

Anyone on the host may connect to an abstract socket (it has no file permissions), so a
connection costs the node nothing until its peer is known to be allowed: the node accepts
on a raw socket, reads the peer's uid at once, and answers a stranger with one line and
closes (`mgmt.refused`); it never holds a stranger's connection, so no unprivileged user can
use up its file descriptors. Allowed connections are capped (MAX_CONNECTIONS, and
MAX_PER_UID per user: more are answered `busy` and closed), must send their request within
READ_TIMEOUT and read each part of the answer within WRITE_TIMEOUT. Accepting is done in
batches (ACCEPT_BATCH per event-loop turn), and every log line a connection can cause is
rate-limited (ratelog.py): a flood of connections costs log lines per minute, not per
connection.

Protocol: JSON lines. The client sends one request, `{"cmd": NAME, ...}`; the node answers
with zero or more `{"item": ...}` lines (a listing, streamed) then one final line,
`{"ok": true, "result": ...}` or `{"ok": false, "error": CODE, "reason": TEXT}`, and
closes. Nothing here blocks the event loop for long at 50,000 calls: whole-table kernel
reads (a conntrack dump, the nft sets) run in a worker thread on sockets of their own, and
listings are built and written in chunks, one event-loop turn each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import nftables

from lrkp_tsl import __version__, drainfile
from lrkp_tsl.config import Config
from lrkp_tsl.ctlsocket import socket_name
from lrkp_tsl.dataplane import DataPlane, reserve, sysctl
from lrkp_tsl.dataplane.conntrack import ConntrackTable, raw_key
from lrkp_tsl.dataplane.nft import FAMILY, FLOW_MAPS, TABLE
from lrkp_tsl.dataplane.nftcounters import CounterReader
from lrkp_tsl.dataplane.nftsets import (
    ENDPOINT_SIZE,
    FLOW_KEY_SIZE,
    SetElements,
    SetReader,
    element_comment,
)
from lrkp_tsl.dataplane.nftwatch import RulesetWatch
from lrkp_tsl.dataplane.queue import QueueRule
from lrkp_tsl.engine import Engine
from lrkp_tsl.errors import KernelError, StoreError
from lrkp_tsl.kernel import Counters, StreamKey
from lrkp_tsl.latching import Rule
from lrkp_tsl.media import Endpoint
from lrkp_tsl.ratelog import RateLimitedLog
from lrkp_tsl.server import Server
from lrkp_tsl.session import Call, Leg
from lrkp_tsl.traffic import Heard, learned_from_a_packet, leg_of

log = logging.getLogger("lrkp_tsl.mgmt")

# Rows per event-loop turn when a listing is built: ~6 ms of work (measured: 1,000 rows
# built and encoded in ~27 ms).
CHUNK = 200
REQUEST_LIMIT = 65536
# An allowed client has this long to send its request, and to take each part of the answer.
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 30.0
# Allowed connections at once: overall, and per user (root, the node's own user).
MAX_CONNECTIONS = 16
MAX_PER_UID = 8
# Connections accepted per event-loop turn: a flood must leave the loop to the control path.
ACCEPT_BATCH = 32
BACKLOG = 4096  # clamped to net.core.somaxconn by the kernel
# After the kernel refused an accept (out of descriptors or memory), wait this long.
ACCEPT_PAUSE = 1.0
_PEERCRED = struct.Struct("3i")

Entries = Mapping[StreamKey, tuple[Counters, float]]


def _leg_state(leg: Leg) -> str:
    """Where the leg's address came from: learning (none yet); fixed (the SDP address, never
    re-learned: `strict`); trusted (the SDP address, relayed to from the start because the
    node can reach it; the same IP may re-latch it); latched (taught by the party's own
    packet). Whether the party was heard is `learned` (show/sessions read conntrack)."""
    if leg.latched is None:
        return "learning"
    if leg.rule is Rule.EXACT:
        return "fixed"
    return "latched" if learned_from_a_packet(leg) else "trusted"


def _side(side: str, legs: list[Leg], relay: Endpoint, heard: Heard) -> dict[str, Any]:
    """One party of one stream: its RTP leg, and its RTCP leg unless the stream has none
    (rtcp-mux, or not RTP: `latching_rtcp` "none")."""
    rtp = legs[0]
    rtcp = legs[1] if len(legs) > 1 else None

    def heard_on(leg: Leg | None) -> bool:
        return leg is not None and (side, leg.index, leg.stream) in heard

    return {
        "sdp": None if rtp.sdp is None else str(rtp.sdp),
        "relay": str(relay),
        # Only addresses the party was heard from: a trusted SDP address it never sent
        # from (an RTCP port it does not use) is not "learned".
        "learned": str(rtp.latched) if rtp.latched and heard_on(rtp) else None,
        "learned_rtcp": (
            str(rtcp.latched) if rtcp is not None and rtcp.latched and heard_on(rtcp) else None
        ),
        "latching": _leg_state(rtp),
        "latching_rtcp": "none" if rtcp is None else _leg_state(rtcp),
        "rule": rtp.rule.value,
    }


def _of(legs: tuple[Leg, ...], index: int) -> list[Leg]:
    return [leg for leg in legs if leg.index == index]


def session_row(engine: Engine, call: Call, entries: Entries, now: float) -> dict[str, Any]:
    """One call as `sessions`/`show` report it; `entries`: its live conntrack entries.

    `caller`/`callee` are its first stream's parties (None: no stream relayed yet, an ng
    call offered and not answered); `media_streams` has every stream's."""
    live = [(key, counters) for key, (counters, _left) in entries.items()]
    tally = engine.traffic.total(call, live)
    heard = engine.traffic.heard(call, live)
    if entries:
        freshest = max(left for _counters, left in entries.values())
        idle: float | None = max(0.0, call.idle_timeout - freshest)
    else:
        quiet = engine.activity.quiet_since(call.call_id)
        idle = None if quiet is None else max(0.0, now - quiet)
    streams = [
        {
            "stream": index + 1,
            "caller": _side("caller", _of(call.caller, index), spec.caller_relay, heard),
            "callee": _side("callee", _of(call.callee, index), spec.callee_relay, heard),
        }
        for index, spec in enumerate(call.streams)
    ]
    return {
        "call_id": call.call_id,
        "protocol": call.protocol,
        "about": dict(engine.about(call)),
        "age": round(now - call.started, 1),
        "idle": None if idle is None else round(idle, 1),
        "media": "live" if entries else "quiet",
        "streams": len(entries),
        "caller": streams[0]["caller"] if streams else None,
        "callee": streams[0]["callee"] if streams else None,
        "media_streams": streams,
        "ends_in": None if call.end_at is None else round(max(0.0, call.end_at - now), 1),
        **tally.as_dict(),
    }


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return pid, uid


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Listener:
    """The management socket, accepted from by `Management` on the event loop."""

    def __init__(self, sock: socket.socket, path: Path | None, loop: asyncio.AbstractEventLoop):
        self.sock = sock
        self.path = path
        self.loop = loop

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock)
        self.sock.close()


class CommandError(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Management:
    """Answers `lrkp-ctl` on the management socket (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        server: Server,
        plane: DataPlane,
        queue_rule: QueueRule,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        pair: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.engine = engine
        self.pair = pair  # a pair's health (pairhealth.py), as of its last probe
        self.server = server
        self.plane = plane
        self.queue_rule = queue_rule
        self.config = config
        self.clock = clock
        self.started = time.time()
        # Whole-table reads, one at a time, on sockets that only the worker thread uses.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mgmt")
        self._queued: set[Future[Any]] = set()
        self._conntrack: ConntrackTable | None = None
        self._listener: Listener | None = None
        self._clients: dict[asyncio.Task[None], int] = {}  # connection -> peer's uid
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._log = RateLimitedLog(log)
        self._log_flush: asyncio.TimerHandle | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]] = {
            "ping": self._ping,
            "sessions": self._sessions,
            "show": self._show,
            "delete": self._delete,
            "stats": self._stats,
            "kernel": self._kernel,
            "ruleset": self._ruleset,
            "drain": self._drain,
            "undrain": self._undrain,
        }

    async def listen(self, name: str) -> Listener:
        """Listen on `name` (`@abstract` or `/path`); the caller closes the listener."""
        address = socket_name(name)
        path = None if address.startswith("\0") else Path(address)
        if path is not None and path.is_socket():
            path.unlink()  # left by a previous run; a live node holds the instance lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            if path is not None:
                os.chmod(path, 0o600)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self._listener = Listener(sock, path, loop)
        loop.add_reader(sock, self._accept)
        return self._listener

    def close(self) -> None:
        """Stop serving: connections cancelled, the worker let go once its socket is closed
        (by the worker itself: a dump in flight may still be using it)."""
        for task in list(self._clients):
            task.cancel()
        if self._log_flush is not None:
            self._log_flush.cancel()
        for future in list(self._queued):
            future.cancel()  # not started yet: never will
        if self._conntrack is not None:
            conntrack, self._conntrack = self._conntrack, None
            self._pool.submit(conntrack.close)
        self._pool.shutdown(wait=False)

    # -- connections ---------------------------------------------------------------------

    def _accept(self) -> None:
        """Accept what is waiting (at most ACCEPT_BATCH); strangers and connections over the
        caps are answered and closed here, before anything else is spent on them."""
        listener = self._listener
        if listener is None:
            return
        now = self.clock()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors or memory: wait rather than spin on a ready socket.
                self.engine.stats["mgmt.accept_failed"] += 1
                reason = exc.strerror or str(exc)
                self._note(now, logging.ERROR, "management accept failures",
                           "management socket: accept failed (%s); accepting again in %g s",
                           reason, ACCEPT_PAUSE)  # fmt: skip
                listener.loop.remove_reader(listener.sock)
                listener.loop.call_later(ACCEPT_PAUSE, self._resume, listener)
                return
            self._admit(conn, now)

    def _resume(self, listener: Listener) -> None:
        if self._listener is listener and listener.sock.fileno() >= 0:
            listener.loop.add_reader(listener.sock, self._accept)

    def _admit(self, conn: socket.socket, now: float) -> None:
        try:
            pid, uid = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        refusal = None
        if uid not in (0, os.geteuid()):
            self.engine.stats["mgmt.refused"] += 1
            refusal = _failure("forbidden", f"uid {uid} is not root")
            self._note(now, logging.WARNING, "management connections refused",
                       "management socket: connection from uid %d (pid %d) refused: only root "
                       "or the node's own user may use it", uid, pid)  # fmt: skip
        elif len(self._clients) >= MAX_CONNECTIONS or self._per_uid[uid] >= MAX_PER_UID:
            self.engine.stats["mgmt.busy"] += 1
            refusal = _failure("busy", f"too many management connections (uid {uid}); try again")
            self._note(now, logging.WARNING, "management connections over the limit",
                       "management socket: connection from uid %d (pid %d) refused: %d open "
                       "(at most %d, %d per user)", uid, pid, len(self._clients),
                       MAX_CONNECTIONS, MAX_PER_UID)  # fmt: skip
        if refusal is not None:
            with contextlib.suppress(OSError):
                conn.send(_line(refusal), socket.MSG_DONTWAIT)
            conn.close()
            return
        task = asyncio.ensure_future(self._serve(conn))
        self._clients[task] = uid
        self._per_uid[uid] += 1
        task.add_done_callback(self._gone)

    def _gone(self, task: asyncio.Task[None]) -> None:
        uid = self._clients.pop(task, None)
        if uid is not None:
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]

    def _note(self, now: float, level: int, kind: str, message: str, *args: object) -> None:
        """A rate-limited log line; the summary of what was not shown is written when due."""
        self._log.log(now, level, kind, message, *args)
        self._arm_log_flush(now)

    def _arm_log_flush(self, now: float) -> None:
        due = self._log.next_flush()
        if due is not None and self._log_flush is None and self._listener is not None:
            self._log_flush = self._listener.loop.call_later(due - now, self._flush_log)

    def _flush_log(self) -> None:
        self._log_flush = None
        now = self.clock()
        self._log.flush(now)
        self._arm_log_flush(now)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=REQUEST_LIMIT)
        except OSError:
            conn.close()
            return
        await self._client(reader, writer)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            try:
                request = json.loads(line)
                command = request["cmd"]
                handler = self._handlers[command]
            except (ValueError, KeyError, TypeError):
                await self._send(writer, _failure("bad-request", f"unknown request {line[:80]!r}"))
                return
            self.engine.stats[f"mgmt.{command}"] += 1
            try:
                async for message in handler(request):
                    await self._send(writer, message)
            except CommandError as error:
                await self._send(writer, _failure(error.code, error.reason))
            except (KernelError, StoreError) as error:
                await self._send(writer, _failure(error.code, error.reason))
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("management client dropped: %s", exc)
        except Exception:
            self.engine.stats["error.internal.mgmt"] += 1
            log.exception("management request failed; the node carries on")
            await self._send(writer, _failure("internal", "internal error (see the node's log)"))
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        if writer.is_closing():
            return
        writer.write(_line(message))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    async def _in_worker(self, function: Callable[..., Any], *args: Any) -> Any:
        future = self._pool.submit(function, *args)
        self._queued.add(future)
        future.add_done_callback(self._queued.discard)
        return await asyncio.wrap_future(future)

    # -- commands ------------------------------------------------------------------------

    async def _ping(self, _request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield _result(
            {
                "version": __version__,
                "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 1),
                "calls": len(self.engine.table),
                "draining": self.engine.draining,
                "active": self.engine.active,
                "control": [str(address) for address in self.config.control],
                "ng": [str(address) for address in self.config.ng],
                **({"pair": self.pair()} if self.pair is not None else {}),
            }
        )

    def _dump(self) -> dict[bytes, tuple[int, int, int, int, int]]:
        """Worker thread: every UDP conntrack entry of the node's namespace (raw_key)."""
        if self._conntrack is None:
            self._conntrack = ConntrackTable()
        return self._conntrack.stream_counters()

    async def _sessions(self, _request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        dump = await self._in_worker(self._dump)
        calls = list(self.engine.table)
        for first in range(0, len(calls), CHUNK):
            now = self.clock()
            for call in calls[first : first + CHUNK]:
                if call.call_id not in self.engine.table:
                    continue  # ended while the listing was built
                mine = {}
                keys = call.view().keys()
                for key in keys:
                    raw = dump.get(raw_key(key))
                    if raw is not None:
                        mine[key] = (Counters(*raw[:4]), float(raw[4]))
                yield {"item": session_row(self.engine, call, mine, now)}
            await asyncio.sleep(0)
        yield _result({"calls": len(calls)})

    def _call(self, request: dict[str, Any]) -> Call:
        call_id = request.get("call_id")
        call = self.engine.table.get(call_id) if isinstance(call_id, str) else None
        if call is None:
            raise CommandError("not-found", f"no call {call_id!r} on this node")
        return call

    async def _show(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        call = self._call(request)
        keys = call.view().keys()
        counters = self.engine.kernel.counters(keys)  # a few GETs, not a dump
        left = self.engine.kernel.alive(counters)
        entries = {key: (value, left.get(key, 0.0)) for key, value in counters.items()}
        row = session_row(self.engine, call, entries, self.clock())
        row["flows"] = [
            {
                "stream": flow.stream.value,
                "from": str(flow.sender),
                "to_relay": str(flow.relay),
                "out_relay": str(flow.relay_out),
                "target": str(flow.target),
            }
            for flow in sorted(call.view().flows, key=lambda f: (f.stream.value, f.relay, f.sender))
        ]
        row["learning"] = sorted(str(endpoint) for endpoint in call.view().learning)
        row["idle_timeout"] = call.idle_timeout
        yield _result(row)

    async def _delete(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        call = self._call(request)
        if not self.engine.active:
            raise CommandError(
                "standby", "this node is a standby: delete the call on the active node"
            )
        try:
            self.engine.delete(call.call_id, self.clock())
        finally:
            self.server.flush()  # held packets' verdicts, the timer
        log.warning("[%s] deleted by an operator (lrkp-ctl delete)", call.call_id)
        yield _result({"call_id": call.call_id, "deleted": True})

    async def _stats(self, _request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        engine = self.engine
        gauges = {
            "calls": len(engine.table),
            "calls.live_media": len(engine.activity.live_calls()),
            "packets.held_now": sum(len(held) for held in engine.held.values()),
            "calls.suspect_now": len(engine.suspect),
            "calls.unverified_now": len(engine.unverified),
            "ports.used": len(engine.table.ports),
            "draining": int(engine.draining),
        }
        result = {"counters": dict(sorted(engine.stats.items())), "gauges": gauges}
        if self.pair is not None:
            result["pair"] = self.pair()
        yield _result(result)

    def _kernel_state(self) -> dict[str, Any]:
        """Worker thread: what the kernel holds for the node, read on fresh sockets."""
        with RulesetWatch() as watch:
            table = watch.fingerprint(FAMILY, TABLE) is not None
            queue_rule = table and self.queue_rule.present(watch)
            policy = watch.ct_timeout(FAMILY, TABLE, "relay_idle") if table else None
        reader = CounterReader()
        try:
            found = reader.counters(FAMILY, TABLE) or {}
        finally:
            reader.close()
        counters = {name: packets for name, (packets, _bytes) in sorted(found.items())}
        sysctls = {}
        for name, (wanted, why) in sysctl.REQUIRED.items():
            try:
                value: str | None = sysctl.read(name)
            except OSError:
                value = None
            sysctls[name] = {"value": value, "wanted": wanted, "why": why}
        try:
            ephemeral: str | None = " ".join(sysctl.read(reserve.EPHEMERAL).split())
            reserved: str | None = sysctl.read(reserve.RESERVED)
        except OSError:
            ephemeral = reserved = None
        return {
            "table_present": table,
            "queue_rule": queue_rule,
            "idle_policy": None if policy is None else policy.get(1),
            "counters": counters,
            "sysctls": sysctls,
            "ports": {
                "ephemeral": ephemeral,
                "reserved": reserved,
                "relay_range_reserved": self.plane.reservation.reserved,
            },
        }

    async def _kernel(self, _request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        features = self.plane.features
        state = await self._in_worker(self._kernel_state)
        probes = {}
        if features is not None:
            probes = {
                "native_queue": features.native_queue,
                "xt_nfqueue": features.xt_nfqueue,
                "iptables_nft": features.iptables_nft,
                "flowtable": features.flowtable,
                "conntrack_acct": features.conntrack_acct,
                "socket_lookup": features.socket_lookup,
            }
        yield _result(
            {
                "queue_path": self.queue_rule.path,
                "queue_num": self.queue_rule.queue_num,
                "probes": probes,
                "table": f"{FAMILY} {TABLE}",
                **state,
            }
        )

    def _read_ruleset(self) -> dict[str, Any]:
        """Worker thread: the table's rules (terse: no elements) and every element."""
        nft = nftables.Nftables()
        nft.set_terse_output(True)
        rc, output, error = nft.cmd(f"list table {FAMILY} {TABLE}")
        if rc != 0:
            raise KernelError(f"nft list table {FAMILY} {TABLE}: {str(error).strip()}")
        # Raw bytes, not objects: 100,000s of elements as Endpoints would hand the cyclic
        # GC that many objects to track, and a full collection stalls the event loop.
        # Elements are decoded a chunk at a time in `_ruleset`, and die young.
        with SetReader() as reader:
            dnat, snat = (
                reader.elements(FAMILY, TABLE, name, FLOW_KEY_SIZE, ENDPOINT_SIZE)
                for name in FLOW_MAPS
            )
            learning = reader.elements(FAMILY, TABLE, "learning", ENDPOINT_SIZE)
            displaced = reader.elements(FAMILY, TABLE, "displaced", FLOW_KEY_SIZE)
        keys = list(dnat.values) + [key for key in snat.values if key not in dnat.values]
        return {
            "rules": str(output),
            "keys": keys,
            "dnat": dnat,
            "snat": snat,
            "learning": list(learning.values),
            "displaced": list(displaced.values),
        }

    async def _ruleset(self, _request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        read = await self._in_worker(self._read_ruleset)
        table = self.engine.table
        yield {"item": {"kind": "rules", "text": read["rules"]}}
        keys: list[bytes] = read["keys"]
        dnat: SetElements = read["dnat"]
        snat: SetElements = read["snat"]
        for first in range(0, len(keys), CHUNK):
            for raw in keys[first : first + CHUNK]:
                sender, relay = _endpoint(raw[:8]), _endpoint(raw[8:])
                target, relay_out = dnat.values.get(raw), snat.values.get(raw)
                udata = dnat.userdata.get(raw) or snat.userdata.get(raw)
                owner = table.owner(relay)
                call = table.get(owner) if owner is not None else None
                found = leg_of(call, (sender, relay)) if call is not None else None
                yield {
                    "item": {
                        "kind": "flow",
                        "maps": [
                            name
                            for name, value in zip(FLOW_MAPS, (target, relay_out), strict=True)
                            if value is not None
                        ],
                        "key": f"{sender} . {relay}",
                        "dnat_to": None if target is None else str(_endpoint(target)),
                        "snat_to": None if relay_out is None else str(_endpoint(relay_out)),
                        "comment": element_comment(udata) if udata else "",
                        "call_id": owner,
                        "side": found[0] if found else None,
                        "stream": found[1].stream.value if found else None,
                        "explained": _explain_flow(owner, found),
                    }
                }
            await asyncio.sleep(0)
        for count, raw in enumerate(read["learning"], 1):
            if count % CHUNK == 0:
                await asyncio.sleep(0)
            relay = _endpoint(raw)
            owner = table.owner(relay)
            call = table.get(owner) if owner is not None else None
            legs = (
                [
                    f"{side} {leg.stream.value} ({_leg_state(leg)})"
                    for side, pair in (("caller", call.caller), ("callee", call.callee))
                    for leg in pair
                    if leg.relay == relay
                ]
                if call is not None
                else []
            )
            yield {
                "item": {
                    "kind": "learning",
                    "key": str(relay),
                    "call_id": owner,
                    "legs": legs,
                    "explained": (
                        f"call {owner!r}: packets from unknown sources to this relay endpoint "
                        f"go to the node, which latches {', '.join(legs) or 'its parties'}"
                        if owner
                        else "belongs to no call (stale)"
                    ),
                }
            }
        for count, raw in enumerate(read["displaced"], 1):
            if count % CHUNK == 0:
                await asyncio.sleep(0)
            source, relay = _endpoint(raw[:8]), _endpoint(raw[8:])
            owner = table.owner(relay)
            yield {
                "item": {
                    "kind": "displaced",
                    "key": f"{source} . {relay}",
                    "call_id": owner,
                    "explained": (
                        f"{source} was latched by a call whose relay ports went to "
                        f"{owner!r}: dropped while it keeps sending"
                    ),
                }
            }
        yield _result({"flows": len(keys), "learning": len(read["learning"])})

    async def _drain(self, _request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if not self.engine.draining:
            log.warning(
                "draining: P is answered with an empty datagram, so lrkproxy disables this "
                "node and sends new calls to other nodes of its set (not if this node is "
                "alone in it); %d live calls continue and end normally",
                len(self.engine.table),
            )
        self.engine.draining = True
        yield _result(self._drain_result())

    async def _undrain(self, _request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self.engine.draining:
            log.warning("no longer draining: P is answered with PONG again")
        self.engine.draining = False
        yield _result(self._drain_result())

    def _drain_result(self) -> dict[str, Any]:
        """The drain state now, written to the state directory so that a restart keeps it;
        a failed write is reported (the state applies in memory all the same)."""
        draining = self.engine.draining
        result: dict[str, Any] = {"draining": draining, "calls": len(self.engine.table)}
        failed = drainfile.persist(self.config.state_dir, draining)
        if failed is not None:
            log.error("drain state not saved: %s: a restart would %s", failed,
                      "not be draining" if draining else "be draining again")  # fmt: skip
            result["warning"] = f"not saved ({failed}): a restarted node would " + (
                "not be draining" if draining else "be draining again"
            )
        return result


def _endpoint(raw: bytes) -> Endpoint:
    """An nf_tables `ipv4_addr . inet_service` value (address, port, 2 bytes of padding)."""
    return Endpoint(IPv4Address(raw[:4]), (raw[4] << 8) | raw[5])


def _explain_flow(owner: str | None, found: tuple[str, Leg] | None) -> str:
    if owner is None:
        return "belongs to no call (stale)"
    if found is None:
        return f"call {owner!r}: not a flow of its current legs (being replaced)"
    side, leg = found
    other = "callee" if side == "caller" else "caller"
    return f"call {owner!r}: {side}'s {leg.stream.value} from {leg.latched}, relayed to the {other}"


def _result(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def _failure(code: str, reason: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "reason": reason}
