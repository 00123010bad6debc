"""The state store's WAL checkpointed on a thread of its own (walcheckpoint.py), on a real
SQLite file: the node's writing connection no longer checkpoints inside a command's commit
(only as a backstop), the thread does, and it stops with the store."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lrkp_tsl.store import FILENAME, SqliteStore
from lrkp_tsl.walcheckpoint import BACKSTOP_PAGES, WalCheckpointer
from tests.unit.test_store import learned_call

WAIT = 20.0  # for a thread that wakes every 0.5 s; never a measure of speed


def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what}")
        time.sleep(0.05)


def test_the_writer_only_checkpoints_as_a_backstop_and_the_thread_does_it(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    store = SqliteStore(path)
    db = store._connection()
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # SQLite's own
    store.checkpoint_in_background()
    try:
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == BACKSTOP_PAGES
        checkpointer = store._checkpointer
        assert checkpointer is not None and checkpointer.running
        call = learned_call()
        for n in range(300):  # more than SQLite's 1,000 pages would have let through
            store.put(replace(call, call_id=f"c{n}"), 1.0)
        store.delete("c0")
        until(lambda: checkpointer.checkpoints > 0, "a checkpoint of every frame written")
        assert checkpointer.failures == 0
    finally:
        store.close()
    assert not checkpointer.running  # stopped with the store
    reopened = SqliteStore(path)
    assert len(reopened.load()) == 299  # nothing lost by checkpointing elsewhere
    reopened.close()


def test_a_file_it_cannot_open_is_logged_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone" / FILENAME  # its directory does not exist (yet)
    checkpointer = WalCheckpointer(missing, interval=0.05)
    with caplog.at_level(logging.WARNING, logger="lrkp_tsl.store"):
        checkpointer.start()
        try:
            until(lambda: checkpointer.failures >= 2, "two failed tries")
            assert checkpointer.running  # it goes on trying
            (tmp_path / "gone").mkdir()
            time.sleep(0.2)  # tries on an existing directory: it creates no file there
            assert not missing.exists()
            store = SqliteStore(missing)  # the file appears: the next try checkpoints it
            store.put(learned_call(), 1.0)
            until(lambda: checkpointer.checkpoints > 0, "a checkpoint once the file exists")
            store.close()
        finally:
            checkpointer.stop()
    assert not checkpointer.running
    assert "WAL checkpoint failed" in caplog.text and str(missing) in caplog.text
    assert f"every {BACKSTOP_PAGES} pages" in caplog.text
