"""`lrkp-tsl flush`: take what a stopped node left in the kernel out of its network namespace.

A node that stops leaves its kernel state, so that live calls keep flowing and a restart
adopts them (README, "Never cutting a live call"): the table `ip lrkp`, whose guard goes on
dropping packets to relay ports of no call, the first-packet queue rule, the calls'
conntrack entries and the relay range in ip_local_reserved_ports. When the node goes for
good (the Debian package's prerm on remove, an operator retiring it), `flush` removes them:
the very removal kernel.flush_on_exit makes at exit (DataPlane.flush), with what a node
added beyond its table on record (dataplane/added.py). It empties the state store as that
flush does, so that the calls it cut do not come back with a node started later.

It takes the namespace's instance lock (lock.py): it is refused while a node runs there,
and no node starts while it works.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from lrkp_tsl import lock
from lrkp_tsl.dataplane import DataPlane, Flushed
from lrkp_tsl.dataplane.added import AddedRecord
from lrkp_tsl.dataplane.queue import QueueRule
from lrkp_tsl.errors import StoreError
from lrkp_tsl.store import FILENAME, SqliteStore


def queue_rule(plane: DataPlane, record: AddedRecord, queue_num: int) -> QueueRule | None:
    """The xt rule a node may have left, by the number on record (else `queue_num`, the
    configuration's). The nft path's queue chain is part of the table. Without iptables-nft
    no node could have installed an xt rule."""
    if shutil.which("iptables-nft") is None:
        return None
    recorded = record.added.queue_num
    return QueueRule("xt", queue_num if recorded is None else recorded, plane.nft, record)


def forget_calls(state_dir: Path) -> list[str]:
    """Empty the state store, if there is one; what it held, for the operator. The store
    is taken as its node takes it (lock.lock_state_dir): a node of another network namespace
    that uses the same state_dir makes this refuse (LockedError), never lose its calls."""
    path = state_dir / FILENAME
    if not path.exists():
        return []
    owned = lock.lock_state_dir(state_dir)
    try:
        store = SqliteStore(path)
        try:
            count = store.clear()
        finally:
            store.close()
    finally:
        owned.release()
    return [f"the state store's calls ({count}) from {path}"] if count else []


def flush(
    state_dir: Path, queue_num: int, lock_directory: Path = lock.DEFAULT_DIRECTORY
) -> Flushed:
    """Remove what a node left in this network namespace's kernel, and its stored calls.

    Raises LockedError while a node runs here. The store is left alone when a kernel step
    failed: the calls it holds may still be in the kernel, and a node started later takes
    them back from it."""
    with lock.acquire_instance_lock(lock_directory) as held:
        record = AddedRecord.beside(held)
        plane = DataPlane(record=record)
        try:
            rule = queue_rule(plane, record, queue_num)
            flushed = plane.flush(partial(rule.remove, recorded=True) if rule else None)
        finally:
            plane.close()
        record.save()  # removes it once empty, and a stale one of another namespace
        if not flushed.failed:
            try:
                flushed.removed += forget_calls(state_dir)
            except StoreError as error:
                flushed.failed.append(f"the stored calls: {error.reason}")
            except lock.LockedError as error:
                flushed.failed.append(f"the stored calls, left alone: {error.reason}")
    return flushed
