"""The instance lock: one node per network namespace, freed by the kernel when a node dies."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from lrkp_tsl.errors import LrkpError
from lrkp_tsl.lock import (
    InstanceLock,
    LockedError,
    LockError,
    acquire_instance_lock,
    lock_path,
    lock_state_dir,
    netns_inode,
)
from tests import nobody

ROOT = Path(__file__).resolve().parents[2]
INODE = 4026531999


def namespace(inode: int) -> Path:
    """A stand-in for the file of network namespace `inode` (/proc/self/ns/net): its
    flock is the namespace's lock. Unique to this test run (other runs share /tmp)."""
    path = Path(tempfile.gettempdir()) / f"lrkp-test-netns-{os.getpid()}-{inode}"
    path.touch()
    return path


def acquire(directory: Path, inode: int = INODE) -> InstanceLock:
    return acquire_instance_lock(directory, namespace=namespace(inode), inode=lambda: inode)


# A second process, importing the project: acquires, prints a line, waits for stdin to close.
HOLDER = """
import sys
from pathlib import Path
from lrkp_tsl.lock import LockError, acquire_instance_lock
try:
    lock = acquire_instance_lock(
        Path(sys.argv[1]), namespace=Path(sys.argv[3]), inode=lambda: int(sys.argv[2])
    )
except LockError as error:
    print(error.code, error.reason, flush=True)
    sys.exit(3)
print("held", flush=True)
sys.stdin.read()
lock.release()
print("released", flush=True)
"""


@contextmanager
def running(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`script` in a process of its own (this checkout's lrkp_tsl), stdin and stdout piped;
    killed at the end whatever happens."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def holder(directory: Path, inode: int = INODE) -> AbstractContextManager[subprocess.Popen[str]]:
    """A process holding (or failing to take) the lock; stopped at the end whatever happens."""
    return running(HOLDER, str(directory), str(inode), str(namespace(inode)))


def first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def test_lock_file_names_the_namespace_and_holds_pid_netns_and_start(tmp_path: Path) -> None:
    with acquire(tmp_path) as lock:
        assert lock.path == tmp_path / f"netns-{INODE}.lock" == lock_path(tmp_path, INODE)
        pid, netns, started = lock.path.read_text().splitlines()
        assert pid == str(os.getpid())
        assert netns == f"netns {INODE}"
        assert started.startswith("started 20")
        assert lock.held
    assert not lock.held


def test_default_inode_is_the_network_namespace_inode() -> None:
    assert netns_inode() == os.stat("/proc/self/ns/net").st_ino


def test_another_process_cannot_take_a_held_lock_and_is_told_who_holds_it(
    tmp_path: Path,
) -> None:
    with acquire(tmp_path) as lock, holder(tmp_path) as proc:
        line = first_line(proc)
        assert proc.wait(timeout=10) == 3
    assert line.startswith("locked ")
    assert f"pid {os.getpid()}" in line
    assert str(lock.path) in line
    assert "fight the first over the same kernel" in line
    assert "cannot share one network namespace" in line


def test_a_lock_held_elsewhere_raises_locked_error_naming_that_pid(tmp_path: Path) -> None:
    with holder(tmp_path) as proc:
        assert first_line(proc) == "held"
        with pytest.raises(LockedError) as caught:
            acquire(tmp_path)
        assert f"pid {proc.pid} (netns {INODE}, started " in caught.value.reason
        assert str(lock_path(tmp_path, INODE)) in caught.value.reason
        assert caught.value.code == "locked"
        assert isinstance(caught.value, LrkpError)
        assert str(caught.value).startswith("locked: another lrkp-tsl node, pid ")


def test_release_by_the_holder_frees_the_lock(tmp_path: Path) -> None:
    with holder(tmp_path) as proc:
        assert first_line(proc) == "held"
        assert proc.stdin is not None
        proc.stdin.close()
        assert first_line(proc) == "released"
        assert proc.wait(timeout=10) == 0
    with acquire(tmp_path):
        pass


def test_a_killed_holder_never_blocks_a_restart(tmp_path: Path) -> None:
    with holder(tmp_path) as proc:
        assert first_line(proc) == "held"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # Its pid is still in the file: stale, and harmless.
        assert lock_path(tmp_path, INODE).read_text().startswith(f"{proc.pid}\n")
        with acquire(tmp_path) as lock:
            assert lock.path.read_text().startswith(f"{os.getpid()}\n")


def test_two_namespaces_do_not_conflict(tmp_path: Path) -> None:
    with acquire(tmp_path, inode=1) as first, acquire(tmp_path, inode=2) as second:
        assert first.path != second.path
        with holder(tmp_path, inode=3) as proc:
            assert first_line(proc) == "held"
        with holder(tmp_path, inode=1) as proc:
            assert first_line(proc).startswith("locked ")


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with acquire(tmp_path), pytest.raises(LockedError):
        acquire(tmp_path)


def test_release_is_idempotent_and_leaves_the_file(tmp_path: Path) -> None:
    lock = acquire(tmp_path)
    lock.release()
    lock.release()
    assert lock.path.exists() and lock.path.read_text() == ""
    with acquire(tmp_path):
        pass


def test_a_holder_that_has_not_written_its_pid_yet(tmp_path: Path) -> None:
    path = lock_path(tmp_path, INODE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LockedError, match="pid is not in the file yet"):
            acquire(tmp_path)
    finally:
        os.close(fd)


def test_a_stale_file_is_overwritten(tmp_path: Path) -> None:
    lock_path(tmp_path, INODE).write_text("999999\nnetns 1\nstarted long ago, and more text\n")
    with acquire(tmp_path) as lock:
        assert lock.path.read_text().splitlines()[0] == str(os.getpid())
        assert "long ago" not in lock.path.read_text()


def test_directory_is_created_with_mode_0755(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "lrkp-tsl"
    old = os.umask(0o077)
    try:
        with acquire(directory):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755


def test_a_directory_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LockError, match=r"cannot create the lock directory .*file/lrkp-tsl"):
        acquire(blocker / "lrkp-tsl")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_directory_an_unprivileged_node_may_not_create() -> None:
    """The lock code run as nobody (a copy every user can read: the checkout may be
    private), in a directory root owns that nobody can enter but not write."""
    code = (
        "import sys; from pathlib import Path; from lrkp_tsl.lock import LockError, "
        "acquire_instance_lock\ntry:\n    acquire_instance_lock(Path(sys.argv[1]), "
        "namespace=Path(sys.argv[2]))\nexcept LockError as e:\n    print(e)"
    )
    # Not the host's own namespace (other test runs may lock it): a stand-in nobody can open.
    fake = namespace(0)
    fake.chmod(0o644)
    with nobody.readable_copy() as base:
        parent = base / "root-only"
        parent.mkdir(mode=0o755)
        result = subprocess.run(
            nobody.argv(base, "-c", code, str(parent / "lrkp-tsl"), str(fake)),
            capture_output=True,
            text=True,
            check=False,
        )
    assert result.stderr == "", result.stderr
    assert result.stdout.startswith("lock: cannot create the lock directory")
    assert "Permission denied" in result.stdout


def test_deleting_the_lock_file_does_not_let_a_second_node_in(tmp_path: Path) -> None:
    with holder(tmp_path) as proc:
        assert first_line(proc) == "held"
        lock_path(tmp_path, INODE).unlink()  # an operator, or a cleanup script
        with pytest.raises(LockedError) as caught:
            acquire(tmp_path)
        # The namespace's own lock names the holder (from /proc/locks).
        assert f"pid {proc.pid}" in caught.value.reason
        assert "a lock on the namespace itself" in caught.value.reason


# A second process holding a state directory until stdin closes.
STATE_HOLDER = """
import sys
from pathlib import Path
from lrkp_tsl.lock import lock_state_dir
lock = lock_state_dir(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_state_dir_belongs_to_one_node_and_is_freed_with_it(tmp_path: Path) -> None:
    with running(STATE_HOLDER, str(tmp_path)) as proc:
        assert first_line(proc) == "held"
        with pytest.raises(LockedError) as caught:
            lock_state_dir(tmp_path)
        reason = caught.value.reason
        assert f"state_dir {str(tmp_path)!r} is in use by another lrkp-tsl node" in reason
        own_namespace = os.readlink("/proc/self/ns/net")
        assert f"pid {proc.pid} (network namespace {own_namespace})" in reason
    owned = lock_state_dir(tmp_path)  # killed: the kernel dropped its lock
    with pytest.raises(LockedError):
        lock_state_dir(tmp_path)  # exclusive within one process too
    owned.release()
    lock_state_dir(tmp_path).release()
