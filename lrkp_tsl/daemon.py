"""`lrkp-tsl run`: wires config, lock, store, data plane, engine and sockets together.

Startup order matters, and each step says why:
1. the instance lock, before anything touches the kernel: a second node in the same
   network namespace exits here, naming the first, and changes nothing;
2. the state directory, made this node's own (a node that uses it already is named, and
   this one exits), then the state store in it (a bad state directory is a config error,
   found before the kernel);
3. sysctls, kernel probe, the table (reloaded in place: live calls keep flowing);
4. the conntrack event socket, before the kernel state is read, so no stream that ends
   during the restore goes unnoticed;
5. restore: stored calls and kernel state reconciled (engine.restore);
6. the queue rule and the queue, the control sockets, then the self-healing check.

A start that fails before the node is up takes back what it added to the kernel (the
table it created, the queue rule it added, the sysctls it changed: DataPlane.abandon_start)
and leaves a previous run's table and calls as they were. What exits 2 (the host or the
configuration must change) and what exits 1 (a restart may help): docs/systemd.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lrkp_tsl import __version__, ctcapacity, drainfile
from lrkp_tsl.admission import NodeLimits
from lrkp_tsl.config import DEFAULT_CONFIG, Config
from lrkp_tsl.ctcapacity import Capacity
from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.added import AddedRecord
from lrkp_tsl.dataplane.ctevents import ConntrackEvents, Reaper
from lrkp_tsl.dataplane.queue import PacketQueue, QueueRule
from lrkp_tsl.dataplane.routes import routed_networks
from lrkp_tsl.engine import Engine, RestoreReport, Settings
from lrkp_tsl.errors import ConfigError, HostError, KernelError, StoreError
from lrkp_tsl.frontends.lrkproxy import LrkproxyFrontEnd
from lrkp_tsl.frontends.ng import NgFrontEnd
from lrkp_tsl.hostcheck import may_be_absent
from lrkp_tsl.lock import StateDirLock, acquire_instance_lock, lock_state_dir
from lrkp_tsl.mgmt import Management
from lrkp_tsl.ng.callmodel import Interfaces
from lrkp_tsl.operations import NG
from lrkp_tsl.pair import ROLE_INTERVAL, Followed, Following, Prober, ReplicatedStore, RoleWatch
from lrkp_tsl.pairhealth import PairHealth, Probe
from lrkp_tsl.protocol import NodeConfig
from lrkp_tsl.publishing import Publishing
from lrkp_tsl.records import Store, StoredCall
from lrkp_tsl.replication import Follower, redacted
from lrkp_tsl.selfheal import CHECK_INTERVAL, SelfHeal
from lrkp_tsl.server import Server, attach_queue, open_control
from lrkp_tsl.store import FILENAME, SqliteStore, open_state

log = logging.getLogger("lrkp_tsl.daemon")

# Reading the kernel's maps can fail (a table removed meanwhile, netlink trouble): tried
# this often, a second apart. A ruleset that keeps changing is no failure (nftsets.py).
RECONCILE_ATTEMPTS = 5
# A read the ruleset changed during is followed by this many more, this far apart, for the
# elements of no call it may have skipped; the last one settles what is left.
RECONCILE_REREADS = 2
REREAD_DELAY = 2.0


def reap_interval(idle_timeout: float) -> float:
    """How often the kernel is made to reap expired conntrack entries: a quarter of the idle
    timeout, 0.5-5 s. An idle call ends at most this long after its idle timeout."""
    return min(5.0, max(0.5, idle_timeout / 4))


async def reap(reaper: Reaper, interval: float, server: Server, stop: asyncio.Event) -> None:
    """Sweep in a worker thread (the kernel walk releases the GIL), never on the loop."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            try:
                await loop.run_in_executor(None, reaper.sweep)
            except Exception as exc:
                server.stats["error.conntrack"] += 1
                log.error("conntrack sweep failed: %s", exc)


async def watch_conntrack(
    capacity: Capacity, engine: Engine, server: Server, stop: asyncio.Event
) -> None:
    """Conntrack's fill level at start and every CHECK_INTERVAL (three /proc reads, on the
    loop: microseconds); ctcapacity decides what to log."""
    while not stop.is_set():
        fill = ctcapacity.read_fill()
        if fill is not None:
            now = time.monotonic()
            _ok, found = server.guarded(
                "conntrack-capacity", capacity.check, fill, len(engine.table), now
            )
            for level, text in found or ():
                ctcapacity.log.log(level, "%s", text)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=ctcapacity.CHECK_INTERVAL)


def ng_interfaces(config: Config) -> Interfaces:
    """The node's addresses as rtpengine's named interfaces (ng's `direction`): `internal`
    (the default) and `external`."""
    return Interfaces({"internal": config.internal_ip, "external": config.external_ip})


def node_config(config: Config) -> NodeConfig:
    return NodeConfig(
        config.ports.start,
        config.ports.end,
        config.ports.start,
        str(config.internal_ip),
        str(config.external_ip),
    )


# What an operator does about a socket that cannot be bound (the node exits 2 on it).
LISTEN_ADVICE = {
    errno.EADDRINUSE: "another process holds it (`ss -lupn`, `ss -lxp`): stop it, or move this",
    errno.EADDRNOTAVAIL: "it is no address of this host",
    errno.EACCES: "ports below 1024 need CAP_NET_BIND_SERVICE (the packaged unit has only "
    "CAP_NET_ADMIN)",
}


def cannot_listen(exc: OSError) -> str:
    advice = LISTEN_ADVICE.get(exc.errno or 0)
    return f"cannot listen: {exc.strerror or exc}" + (f": {advice}" if advice else "")


def open_store(config: Config) -> tuple[SqliteStore, StateDirLock]:
    """The state directory, made this node's own (lock.lock_state_dir: a second node naming
    it is refused, LockedError), and the store in it.

    Only what a restart cannot fix is a configuration error (exit code 2, which the systemd
    unit never restarts): a state_dir that is no directory, or that the node may not use.
    A bad store file, or a disk that is full or failing, never keeps the node from serving
    (store.open_state)."""
    where = f"state_dir = {str(config.state_dir)!r}"
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        owned = lock_state_dir(config.state_dir)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from None
    if not os.access(config.state_dir, os.W_OK | os.X_OK):
        owned.release()
        raise ConfigError(f"{where}: not writable by this node (uid {os.geteuid()})")
    try:
        return open_state(config.state_dir / FILENAME), owned
    except StoreError as error:
        owned.release()
        raise ConfigError(f"{where}: {error.reason}") from None


async def reconcile(plane: DataPlane, engine: Engine, server: Server, stop: asyncio.Event) -> None:
    """Compare the loaded calls with the kernel while the node already serves.

    The kernel's maps are read in a worker thread (the dump is kernel time, O(n^2) in the
    number of elements: seconds at 50k calls), then compared in steps of a few thousand
    calls, one event-loop turn each. A call changed meanwhile has put its own view back,
    and what the node changed since the read began is never judged from it
    (`Engine.begin_read`). Commands keep changing the ruleset on a busy node, so a read is
    often not one snapshot: the stored calls are still all compared (engine.reconcile
    says how), and up to RECONCILE_REREADS more reads look for what it may have skipped.
    """
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    reads = failures = 0
    while not stop.is_set():
        engine.begin_read()
        read_at = time.monotonic()
        try:
            state = await loop.run_in_executor(None, plane.state)
        except KernelError as error:
            failures += 1
            log.error("reading the kernel state failed (attempt %d): %s", failures, error)
            if failures >= RECONCILE_ATTEMPTS:
                engine.journal = None
                log.error(
                    "calls not compared with the kernel: each puts its whole state back "
                    "when it next changes; restart the node to compare them all"
                )
                return
            await _pause(stop, 1.0)
            continue
        reads += 1
        compared_at = time.monotonic()
        if stop.is_set():
            return
        final = state.consistent or reads > RECONCILE_REREADS
        report = RestoreReport()
        try:
            for _ in engine.reconcile(state, time.monotonic(), report, final=final):
                server.flush()
                await asyncio.sleep(0)
        except Exception:
            server.stats["error.internal.reconcile"] += 1
            log.exception("comparing the calls with the kernel failed; the node carries on")
            return
        server.flush()
        log.info(
            "kernel state read in %.3f s (%s) and compared in %.3f s",
            compared_at - read_at,
            "one snapshot" if state.consistent else "the ruleset changed meanwhile",
            time.monotonic() - compared_at,
        )
        if final:
            log.info(
                "reconciliation finished %.3f s after it began: %d reads of the kernel, the "
                "last one %s",
                time.monotonic() - started,
                reads,
                "a snapshot" if state.consistent else "not a snapshot either",
            )
            return
        await _pause(stop, REREAD_DELAY)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def void(_result: object) -> None:
    """Drop a result (a callback whose caller expects none)."""


@dataclass
class PairParts:
    """What pair mode adds to the node (pair.py, publishing.py, pairhealth.py)."""

    publishing: Publishing
    store: ReplicatedStore
    health: PairHealth

    def status(self) -> dict[str, Any]:
        """The pair's health as of its last probe, with the running totals (on the loop)."""
        published = self.publishing.state()
        return self.health.status() | {
            "applied": self.health.applied,
            "published": published.written,
            "queued": published.queued,
            "republished": published.resets,
        }


def pair_parts(config: Config, store: SqliteStore, engine: Callable[[], Engine]) -> PairParts:
    """The publisher and the replicated store (started, on the running event loop: the
    engine writes through it from the first command on), and the pair's health."""
    assert config.pair_redis is not None and config.pair_peer_redis is not None
    publishing = Publishing(config.pair_redis, store.records, store.wall_offset)
    publishing.start()
    replicated = ReplicatedStore(store, publishing, lambda: engine().active)
    return PairParts(publishing, replicated, PairHealth(redacted(config.pair_peer_redis)))


async def run_pair(
    config: Config,
    engine: Engine,
    parts: PairParts,
    server: Server,
    wall_offset: float,
    stop: asyncio.Event,
    cleanup: list[tuple[str, Callable[[], Any]]],
) -> None:
    """Watch the VIPs; follow the active node while this one is standby (pair.py); probe
    the pair's health all the while (pairhealth.py).

    What the following thread reads is applied in order by one task (`applying`): a whole
    table in steps, one event-loop turn each, so the role check keeps running meanwhile.
    """
    assert config.pair_redis is not None and config.pair_peer_redis is not None
    loop = asyncio.get_running_loop()
    health = parts.health
    pending: asyncio.Queue[tuple[str, dict[str, StoredCall] | list[Followed]]]
    pending = asyncio.Queue()

    async def applying() -> None:
        while True:
            last, item = await pending.get()
            if engine.active:
                continue  # promoted meanwhile: its own table is the truth now
            if isinstance(item, dict):
                await apply_all(last, item)
            else:
                apply(last, item)

    async def apply_all(last: str, records: dict[str, StoredCall]) -> None:
        changed = 0
        steps = engine.follow_all_steps(records, time.monotonic())
        while not engine.active:
            ok, step = server.guarded("follow", next, steps, None)
            if not ok:
                following.resync.set()
                return
            if step is None:
                health.table_loaded(last)
                log.info(
                    "following: the active node's table loaded (%d calls, %d changed)",
                    len(records),
                    changed,
                )
                return
            changed = step
            await asyncio.sleep(0)

    def apply(last: str, batch: list[Followed]) -> None:
        now = time.monotonic()
        for change in batch:
            if change.op == "quiet":
                ok, _ = server.guarded(
                    "follow", engine.follow_media, change.call_id, change.quiet_since, now
                )
            elif change.op == "put" and change.record is None:
                continue  # unreadable (logged): the next change of the call, or a reload
            else:
                ok, _ = server.guarded("follow", engine.follow, change.call_id, change.record, now)
            if not ok:
                following.resync.set()
                return
        health.changes_applied(last, len(batch), now)

    following = Following(
        Follower(config.pair_redis),
        config.pair_peer_redis,
        lambda last, table: pending.put_nowait((last, table)),
        lambda last, batch: pending.put_nowait((last, batch)),
        wall_offset,
        loop,
    )
    cleanup.append(("following", following.join))
    applier = asyncio.create_task(applying())
    cleanup.append(("following applier", applier.cancel))

    def probed(probe: Probe) -> None:
        now = time.monotonic()
        if health.role == "standby":
            health.probed_standby(probe, following.state(), len(engine.table), now)
        else:
            health.probed_active(probe, parts.publishing.state(), len(engine.table), now)

    prober = Prober(
        config.pair_redis,
        config.pair_peer_redis,
        lambda: health.role,
        health.report,
        lambda probe: void(server.guarded("pair health", probed, probe)),
        loop,
    )
    prober.start()
    cleanup.append(("pair probe", prober.close))
    role = RoleWatch(tuple(config.relay_addrs), engine, parts.publishing, following, health)
    while not stop.is_set():
        server.guarded("role", role.check)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=ROLE_INTERVAL)


# Python's cyclic collector: a full collection walks every live object, so with tens of
# thousands of calls each one stalls the loop (0.2-0.3 s at 20k calls), and with the
# default thresholds one came every few thousand commands (a call's objects outlive a young
# collection, are promoted, then die by reference counting, which the collector never
# learns of). The node makes almost no cycles (under a thousand in 30k commands), so young
# collections are made rare and full ones rarer still: measured, GC time 3.4 -> 0.7 s in a
# 30 s run, node CPU per S+D pair -10 to -17 % (docs/speed.md).
GC_THRESHOLDS = (20_000, 50, 100)


def banner(config: Config, config_file: Path | None) -> str:
    """The first line a node logs: what it runs, from which files, where it listens."""
    source = (
        f"config {config_file}"
        if config_file
        else f"no config file ({DEFAULT_CONFIG} not found: flags only)"
    )
    metrics = "off" if config.metrics_listen is None else "{}:{}".format(*config.metrics_listen)
    return (
        f"lrkp-tsl {__version__} starting: {source}; rules {config.rules}; relay "
        f"{config.internal_ip}/{config.external_ip} ports {config.ports}; control "
        f"{', '.join(map(str, config.control))}; "
        + (f"ng {', '.join(map(str, config.ng))}; " if config.ng else "")
        + f"lrkp-ctl {config.ctl_socket}; metrics {metrics}"
        + ("; pair mode" if config.paired else "")
    )


async def serve(
    config: Config, stop: asyncio.Event | None = None, config_file: Path | None = None
) -> None:
    """Run the node until `stop` is set (SIGTERM/SIGINT set it)."""
    log.info("%s", banner(config, config_file))
    gc.set_threshold(*GC_THRESHOLDS)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    cleanup: list[tuple[str, Callable[[], Any]]] = []
    lock = acquire_instance_lock()
    cleanup.append(("lock", lock.release))
    try:
        await _run(config, stop, loop, cleanup, AddedRecord.beside(lock))
    finally:
        for what, action in reversed(cleanup):
            try:
                action()
            except Exception:
                log.exception("stopping: %s failed", what)


async def _run(
    config: Config,
    stop: asyncio.Event,
    loop: asyncio.AbstractEventLoop,
    cleanup: list[tuple[str, Callable[[], Any]]],
    record: AddedRecord,
) -> None:
    store, state_dir_lock = open_store(config)
    cleanup.append(("state_dir lock", state_dir_lock.release))
    cleanup.append(("store", store.close))
    store.checkpoint_in_background()  # not inside a command's commit (walcheckpoint.py)
    plane = DataPlane(config.rules, record)
    queue_rule: QueueRule | None = None
    up = False  # set once the node serves: until then, a failure takes the start back

    def shutdown_kernel() -> None:
        if not up:
            added_rule = queue_rule if queue_rule is not None and queue_rule.added else None
            plane.abandon_start(added_rule.remove if added_rule is not None else None)
            return
        log.info(
            "stopping: %d live calls; counters: %s",
            len(engine.table),
            ", ".join(f"{k}={v}" for k, v in sorted(engine.stats.items())) or "none",
        )
        # The same removal as `lrkp-tsl flush` (flush.py) makes after a stop.
        remove_rule = partial(queue_rule.remove, recorded=True) if queue_rule else None
        plane.shutdown(config.flush_on_exit, remove_rule)
        if config.flush_on_exit:
            log.info("flushed: %d calls forgotten by the state store", store.clear())

    cleanup.append(("kernel state", shutdown_kernel))
    features = plane.start(config.relay_addrs, config.ports, config.idle_timeout)
    events = ConntrackEvents()
    cleanup.append(("conntrack events", events.close))
    routed = routed_networks()
    log.info(
        "latching %s; networks reached without the default route: %s",
        config.policy.value,
        ", ".join(map(str, routed)) or "none",
    )
    settings = Settings(
        config.max_lifetime,
        config.idle_timeout,
        config.policy,
        tuple(routed),
        config.ports,
    )
    engine_store: Store = store
    pair: PairParts | None = None
    if config.pair_redis is not None:
        # The engine is created below; the store asks it for its role when writing.
        pair = pair_parts(config, store, lambda: engine)
        cleanup.append(("publishing", pair.publishing.close))
        engine_store = pair.store
    engine = Engine(settings, plane, engine_store)
    limits = NodeLimits(frozenset(config.relay_addrs), config.ports)
    LrkproxyFrontEnd(engine, node_config(config), limits)
    # Attached whether or not an ng socket is open: the ng calls a store holds (an earlier
    # run served ng) are followed, shown and end as any; only commands need the socket.
    NgFrontEnd(
        engine,
        ng_interfaces(config),
        delete_delay=config.ng_delete_delay,
        wall_offset=store.wall_offset,
    )
    if drainfile.is_set(config.state_dir):
        engine.draining = True
        log.warning(
            "starting drained: %s says an operator drained this node (P is answered with "
            "an empty datagram: lrkproxy sends new calls to other nodes of its set); "
            "`lrkp-ctl undrain` ends it",
            drainfile.path(config.state_dir),
        )
    if config.paired:
        engine.active = False  # until this node holds the VIPs (RoleWatch)
    started = time.monotonic()
    engine.load(store.load(), started)
    log.info("store loaded in %.3f s", time.monotonic() - started)
    if plane.policy_replaced:
        plane.policy_replaced = False
        renewed = engine.renew_streams(time.monotonic())
        log.info("idle timeout changed: the conntrack entries of %d live calls renewed", renewed)
    gc.freeze()  # the restored calls: live for minutes, never garbage of a cycle
    server = Server(engine, config)
    queue_rule = QueueRule(features.queue_path, config.queue_num, plane.nft, record)
    try:
        queue_rule.install()
    except KernelError as error:
        raise HostError(f"the first-packet queue rule: {error.reason}") from error
    queue: PacketQueue = attach_queue(server, config.queue_num, loop)
    cleanup.append(("queue", queue.close))
    cleanup.append(("held packets", server.shutdown))
    loop.add_reader(events.fileno(), server.on_events, events)
    cleanup.append(("events reader", lambda: loop.remove_reader(events.fileno())))
    for address in config.control:
        try:
            listener = await open_control(address, server, freebind=may_be_absent(config))
        except OSError as exc:
            raise HostError(f"control = {str(address)!r}: {cannot_listen(exc)}") from None
        cleanup.append((f"control {address}", listener.close))
        log.info("control: listening on %s", address)
    for address in config.ng:
        try:
            listener = await open_control(
                address, server, freebind=may_be_absent(config), protocol=NG
            )
        except OSError as exc:
            raise HostError(f"ng = {str(address)!r}: {cannot_listen(exc)}") from None
        cleanup.append((f"ng {address}", listener.close))
        log.info(
            "ng: listening on %s (rtpengine's ng protocol; interfaces internal %s, external %s)",
            address,
            config.internal_ip,
            config.external_ip,
        )
    server.attach(loop)
    pair_status = pair.status if pair is not None else None
    management = Management(engine, server, plane, queue_rule, config, pair=pair_status)
    cleanup.append(("management", management.close))
    try:
        ctl = await management.listen(config.ctl_socket)
    except OSError as exc:
        raise HostError(f"ctl_socket = {config.ctl_socket!r}: {cannot_listen(exc)}") from None
    cleanup.append(("management socket", ctl.close))
    log.info("lrkp-ctl: listening on %s", config.ctl_socket)
    if config.metrics_listen is not None:
        from lrkp_tsl.metrics import Exporter  # prometheus_client only when asked for

        listen = config.metrics_listen
        ports_total = config.ports.end - config.ports.start + 1
        try:
            exporter = Exporter(listen, engine, server.latency, ports_total, loop, pair=pair_status)
        except OSError as exc:
            raise HostError(
                "metrics.listen = '{}:{}': {}".format(*listen, cannot_listen(exc))
            ) from None
        cleanup.append(("metrics", exporter.close))
        log.info("metrics: serving /metrics on %s port %d", *exporter.address[:2])
    heal = SelfHeal(
        plane,
        queue_rule,
        engine,
        lambda: plane.load(config.relay_addrs, config.ports, config.idle_timeout),
        config.relay_addrs,
        config.ports,
    )
    cleanup.append(("self-healing", heal.close))
    heal.arm()
    reaper = Reaper()
    cleanup.append(("conntrack reaper", reaper.close))
    reaping = asyncio.create_task(reap(reaper, reap_interval(config.idle_timeout), server, stop))
    cleanup.append(("conntrack reaper task", reaping.cancel))
    watching = asyncio.create_task(watch_conntrack(Capacity(config.ports), engine, server, stop))
    cleanup.append(("conntrack capacity", watching.cancel))
    up = True
    log.info(
        "node up: internal %s, external %s, ports %s, allow %s, %d calls",
        config.internal_ip,
        config.external_ip,
        config.ports,
        ", ".join(map(str, config.allow)),
        len(engine.table),
    )
    reconciling = asyncio.create_task(reconcile(plane, engine, server, stop))
    cleanup.append(("reconciliation", reconciling.cancel))
    if pair is not None:
        pairing = asyncio.create_task(
            run_pair(config, engine, pair, server, store.wall_offset, stop, cleanup)
        )
        cleanup.append(("pair", pairing.cancel))
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=CHECK_INTERVAL)
        except TimeoutError:
            server.guarded("self-healing", heal.check, time.monotonic())
            store.tick(time.monotonic())  # the clock for call ages, retries of the store
    await reaping  # stop is set: it ends after the sweep in flight, if any
    await reconciling  # ends after a read in flight: its sockets are the table's
