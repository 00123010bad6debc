"""`lrkp-tsl flush` on the command line: the keys it reads, what it prints, its exit codes.
(What it removes from the kernel: tests/netns/test_flush.py.)"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from lrkp_tsl import cli, hostdeps
from lrkp_tsl.dataplane import Flushed
from lrkp_tsl.errors import LrkpError
from lrkp_tsl.lock import LockedError

OUTCOME: list[Flushed | Exception] = []  # what the fake flush returns or raises


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, int]]:
    """lrkp_tsl.flush.flush, recording its arguments; `result` says what it does."""
    made: list[tuple[Path, int]] = []

    def flush(state_dir: Path, queue_num: int) -> Flushed:
        made.append((state_dir, queue_num))
        if isinstance(OUTCOME[0], Exception):
            raise OUTCOME[0]
        return OUTCOME[0]

    module = types.ModuleType("lrkp_tsl.flush")
    module.flush = flush  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lrkp_tsl.flush", module)
    monkeypatch.setattr(hostdeps, "check", lambda: None)
    OUTCOME[:] = [Flushed([], [])]
    return made


def result(outcome: Flushed | Exception) -> None:
    OUTCOME[0] = outcome


def test_reads_state_dir_and_queue_num_of_a_file_that_could_not_run_a_node(
    tmp_path: Path, calls: list[tuple[Path, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The packaged file before internal_ip is set, with a key this release does not know:
    flush needs neither, and the purge must not stop on them."""
    path = tmp_path / "node.toml"
    path.write_text('state_dir = "/srv/lrkp"\nfuture_key = 1\n[kernel]\nqueue_num = 7\n')
    assert cli.main(["flush", "--config", str(path)]) == 0
    assert calls == [(Path("/srv/lrkp"), 7)]
    assert capsys.readouterr().out.startswith("lrkp-tsl flush: nothing to remove")
    assert cli.main(["flush", "--config", str(path), "--queue-num", "9"]) == 0
    assert cli.main(["flush", "--config", "/dev/null"]) == 0
    assert calls[1:] == [(Path("/srv/lrkp"), 9), (Path("/var/lib/lrkp-tsl"), 22333)]


def test_a_bad_key_it_reads_is_refused_naming_it(
    tmp_path: Path, calls: list[tuple[Path, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[kernel]\nqueue_num = "7"\n')
    assert cli.main(["flush", "--config", str(path)]) == cli.EXIT_CONFIG
    assert "kernel.queue_num = '7': a string" in capsys.readouterr().err
    assert calls == []


def test_what_it_removed_and_what_failed(
    calls: list[tuple[Path, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    result(Flushed(["table ip lrkp (4 flows) and its calls' conntrack entries (2)"], []))
    assert cli.main(["flush", "--config", "/dev/null"]) == 0
    out = capsys.readouterr().out
    assert out == "lrkp-tsl flush: removed table ip lrkp (4 flows) and its calls' conntrack " \
        "entries (2)\n"  # fmt: skip
    result(Flushed(["the queue rule"], ["table ip lrkp: nft said: busy"]))
    assert cli.main(["flush", "--config", "/dev/null"]) == cli.EXIT_RUNTIME
    printed = capsys.readouterr()
    assert printed.out == "lrkp-tsl flush: removed the queue rule\n"
    assert printed.err == "lrkp-tsl flush: could not remove table ip lrkp: nft said: busy\n"


def test_refused_while_a_node_runs_naming_its_pid(
    calls: list[tuple[Path, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    holder = "pid 4242 (netns 4026531840, started 2026-01-01T00:00:00+0000)"
    result(LockedError("another node ...", holder, Path("/run/lrkp-tsl/netns-1.lock")))
    assert cli.main(["flush", "--config", "/dev/null"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"refused: a node, {holder}, runs in this network namespace" in err
    assert "(it holds /run/lrkp-tsl/netns-1.lock)" in err and "Stop it first" in err
    result(LrkpError("cannot create the lock directory /run/lrkp-tsl: Permission denied"))
    assert cli.main(["flush", "--config", "/dev/null"]) == cli.EXIT_RUNTIME
    assert "Permission denied" in capsys.readouterr().err
