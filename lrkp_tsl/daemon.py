"""`lrkp-tsl run`: wires config, data plane, call table and control sockets together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from lrkp_tsl.activity import MediaActivity
from lrkp_tsl.config import Config
from lrkp_tsl.control import Controller, open_control
from lrkp_tsl.dataplane import DataPlane
from lrkp_tsl.dataplane.queue import PacketQueue, QueueRule
from lrkp_tsl.dataplane.routes import routed_networks
from lrkp_tsl.errors import ConfigError
from lrkp_tsl.session import CallTable

log = logging.getLogger("lrkp_tsl.daemon")

DEFAULT_IDLE_TIMEOUT = 60.0  # what Kamailio always sends in S


def poll_interval(config: Config) -> float:
    """How often conntrack counters are read: a quarter of the idle timeout, 0.5-5 s."""
    idle = config.idle_timeout or DEFAULT_IDLE_TIMEOUT
    return min(5.0, max(0.5, idle / 4))


def readopt(plane: DataPlane, table: CallTable, config: Config) -> None:
    """Take back the calls a previous run left relaying in the kernel (kept on exit).

    They restart their idle and lifetime clocks now: the node cannot know how long they
    ran before. Flows that form no complete call are removed.
    """
    now = time.monotonic()
    idle = config.idle_timeout or DEFAULT_IDLE_TIMEOUT
    actions, orphans = table.adopt(plane.nft.installed(), idle, now)
    for action in actions:
        table.applied(action, now)  # the kernel already holds them
        log.info("[%s] re-adopted from the kernel", action.call_id)
    if orphans:
        plane.nft.remove("(orphans)", orphans)
        plane.conntrack.forget_keys((flow.sender, flow.relay) for flow in orphans)
        log.warning("removed %d kernel flows that belong to no complete call", len(orphans))
    if actions:
        log.info("re-adopted %d live calls", len(actions))


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the node until `stop` is set (SIGTERM/SIGINT set it)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state_dir = {str(config.state_dir)!r}: {exc.strerror}") from None

    plane = DataPlane(config.rules)
    features = plane.start(config.relay_addrs, config.ports)
    routed = routed_networks()
    log.info(
        "latching %s; networks reached without the default route: %s",
        config.policy.value,
        ", ".join(map(str, routed)) or "none",
    )
    table = CallTable(config.max_lifetime, config.policy, routed)
    controller = Controller(config, table, plane, clock=time.monotonic)
    readopt(plane, table, config)
    queue_rule = QueueRule(features.queue_path, config.queue_num, plane.nft)
    queue_rule.install()
    listeners: list[asyncio.AbstractServer | asyncio.BaseTransport] = []
    queue: PacketQueue | None = None
    try:
        queue = PacketQueue(config.queue_num, controller.on_packet)
        queue.attach(loop)
        for address in config.control:
            try:
                listeners.append(await open_control(address, controller, config))
            except OSError as exc:
                raise ConfigError(
                    f"control = {str(address)!r}: cannot listen: {exc.strerror}"
                ) from None
            log.info("control: listening on %s", address)
        log.info(
            "node up: internal %s, external %s, ports %s, allow %s",
            config.internal_ip,
            config.external_ip,
            config.ports,
            ", ".join(map(str, config.allow)),
        )
        activity = MediaActivity()
        interval = poll_interval(config)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if len(table):
                activity.observe(plane.conntrack.entries(), table, time.monotonic())
                controller.expire()
    finally:
        for listener in listeners:
            listener.close()
        if queue is not None:
            queue.close()
        for held in controller.held.values():
            for item in held:
                item.packet.drop()
        queue_rule.remove()
        log.info(
            "stopping: %d live calls; counters: %s",
            len(table),
            ", ".join(f"{k}={v}" for k, v in sorted(controller.stats.items())) or "none",
        )
        plane.shutdown(flush=config.flush_on_exit)
