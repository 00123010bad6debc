"""Checkpoints of the state store's write-ahead log, on a thread of their own.

SQLite checkpoints a WAL by itself once it holds `wal_autocheckpoint` pages (1,000 by
default), inside the commit that crossed the mark: that commit copies the pages into the
database file and syncs both, a few milliseconds on the event loop every few hundred
commands, which every command queued behind it waits for (measured on this VM's ext4: 25 µs
of a put + delete's 75 on average, and the commands' p99). So the node's writing connection
checkpoints only as a backstop (BACKSTOP_PAGES, should this thread die) and this thread does
it, PASSIVE (it never waits for, nor blocks, the writer or a reader), on its own connection,
every INTERVAL seconds: sqlite3 releases Python's lock while SQLite copies and syncs, so the
event loop goes on meanwhile. What is committed is in the WAL either way: when the pages
reach the database file changes nothing a restart reads.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Final
from urllib.parse import quote

log = logging.getLogger("lrkp_tsl.store")

INTERVAL: Final = 0.5
BACKSTOP_PAGES: Final = 16_000
"""The writer's own `wal_autocheckpoint` (64 MiB of 4 KiB pages): reached only if this
thread stopped checkpointing, and then the WAL still stays bounded."""
FAILURES_LOGGED: Final = 3  # then every 1000th


class WalCheckpointer:
    """A daemon thread checkpointing `path`'s WAL every `interval` s until `stop()`."""

    def __init__(self, path: Path, interval: float = INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self.checkpoints = 0  # that moved every frame of the WAL into the database file
        self.failures = 0
        self._stop = threading.Event()
        self._db: sqlite3.Connection | None = None  # opened by start(), then the thread's
        self._thread = threading.Thread(target=self._run, name="lrkp-wal-checkpoint", daemon=True)

    def start(self) -> None:
        """Open the thread's connection now (the node's descriptors are all open once it
        serves), and start checkpointing."""
        self._db = self._open()
        self._thread.start()

    def stop(self) -> None:
        """Stop after the checkpoint under way, if any (a few ms)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        db, self._db = self._db, None
        try:
            while not self._stop.wait(self.interval):
                if db is None:
                    db = self._open()
                if db is not None:
                    self.checkpoint(db)
        finally:
            if db is not None:
                db.close()

    def _open(self) -> sqlite3.Connection | None:
        """The thread's own connection; None (tried again next time) if the file cannot be
        opened now (the store's own connection then checkpoints at BACKSTOP_PAGES)."""
        # mode=rw: never create the file (a store that could not be created stays absent).
        uri = f"file:{quote(str(self.path))}?mode=rw"
        try:
            db = sqlite3.connect(
                uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False
            )
            try:  # a read opens the WAL and its index too: every descriptor, now
                db.execute("PRAGMA schema_version").fetchone()
            except BaseException:
                db.close()
                raise
            return db
        except sqlite3.Error as exc:
            self._failed(f"opening it: {exc}")
            return None

    def checkpoint(self, db: sqlite3.Connection) -> None:
        """One PASSIVE checkpoint; a busy or failed one is tried again next time."""
        try:
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            self._failed(str(exc))
            return
        if not busy and frames > 0 and copied == frames:
            self.checkpoints += 1

    def _failed(self, reason: str) -> None:
        self.failures += 1
        if self.failures <= FAILURES_LOGGED or self.failures % 1000 == 0:
            log.warning("state store %s: WAL checkpoint failed (%d so far; the node's own "
                        "connection checkpoints every %d pages meanwhile): %s", self.path,
                        self.failures, BACKSTOP_PAGES, reason)  # fmt: skip
