"""One node per network namespace, and one node per state directory.

Two nodes in one namespace would fight over the same kernel state: one `table ip lrkp`
(each reload flushes the other's rules), one NFQUEUE rule, one conntrack table (each
deletes the other's entries), and each would repair what the other just changed. So before
it touches the kernel the node takes two exclusive flocks (`LOCK_EX | LOCK_NB`):

- on the network namespace itself: the file /proc/self/ns/net, whose inode is the
  namespace's (how namespaces are told apart). This is the guard: it exists exactly as long
  as the namespace, nobody can delete it, and every process of the namespace opens the same
  inode, whatever its mounts (`ip netns exec` remounts /sys, not /proc/self/ns);
- on `<directory>/netns-<inode>.lock` (/run/lrkp-tsl, which `ip netns exec` leaves shared):
  the holder's pid, namespace and start time for people and error messages, and the lock an
  earlier release takes. Deleting this file no longer lets a second node in.

Two nodes sharing one state directory (the default `state_dir` is the same for every node
of a host) would share one store and one drain flag: each would load, delete and reinstall
the other's calls. So the node also takes an flock on the state directory itself
(`lock_state_dir`) for its whole life, and a second node naming the same directory is
refused, whatever namespace it runs in: the holder is named from /proc/locks (pid, and the
network namespace it runs in).

The kernel releases an flock when the last descriptor of its open file goes away, so a node
killed with SIGKILL never blocks its restart. The lock file is never deleted by the node; the
pid written into it is for the error message only, and a stale one is harmless. Descriptors
are close-on-exec, so the iptables-nft processes the node spawns never inherit a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from lrkp_tsl.errors import LrkpError

DEFAULT_DIRECTORY = Path("/run/lrkp-tsl")
NETNS = "/proc/self/ns/net"
PROC_LOCKS = Path("/proc/locks")


class LockError(LrkpError):
    """The instance lock cannot be taken for a reason other than another node holding it."""

    code = "lock"


class LockedError(LockError):
    """Another node already runs in this network namespace: `holder` says which (its pid),
    `path` is the lock it holds."""

    code = "locked"

    def __init__(self, reason: str, holder: str = "", path: Path | None = None) -> None:
        super().__init__(reason)
        self.holder = holder
        self.path = path


def netns_inode() -> int:
    """The inode of this process's network namespace."""
    try:
        return os.stat(NETNS).st_ino
    except OSError as exc:
        raise LockError(f"cannot identify the network namespace ({NETNS}): {exc}") from exc


def lock_path(directory: Path, inode: int) -> Path:
    return directory / f"netns-{inode}.lock"


class InstanceLock:
    """A held instance lock; `release()` (or leaving the `with` block) lets it go."""

    def __init__(self, path: Path, fd: int, inode: int, namespace_fd: int | None = None) -> None:
        self.path = path
        self.inode = inode
        self._fd: int | None = fd
        self._namespace_fd = namespace_fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close; idempotent. The file stays (see the module docstring)."""
        fd, self._fd = self._fd, None
        namespace_fd, self._namespace_fd = self._namespace_fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # still locked here: nobody reads a half-written file
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            if namespace_fd is not None:
                os.close(namespace_fd)

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(path: Path, pid: int | None = None) -> str:
    """Who holds the lock, for an error message: what the lock file says about its holder
    (if `pid`, the holder /proc/locks names, only when the file names that same pid)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    lines = text.splitlines()
    written = lines[0].strip() if lines else ""
    if pid is not None and written != str(pid):
        return f"pid {pid}"
    if not written.isdigit():
        return "a process whose pid is not in the file yet (it is starting)"
    details = [line.strip() for line in lines[1:] if line.strip()]
    return f"pid {written}" + (f" ({', '.join(details)})" if details else "")


def flock_holder(fd: int) -> int | None:
    """The pid holding an flock on the file of `fd`, read from /proc/locks (None: unknown)."""
    status = os.fstat(fd)
    wanted = (os.major(status.st_dev), os.minor(status.st_dev), status.st_ino)
    try:
        lines = PROC_LOCKS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:04:4026531840 0 EOF"; waiters have "->".
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        device = fields[5].split(":")
        try:
            found = (int(device[0], 16), int(device[1], 16), int(device[2]))
            pid = int(fields[4])
        except (IndexError, ValueError):
            continue
        if found == wanted:
            return pid
    return None


def _flock(fd: int) -> bool:
    """Take the exclusive lock without waiting: False if another holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def acquire_instance_lock(
    directory: Path = DEFAULT_DIRECTORY,
    *,
    namespace: Path = Path(NETNS),
    inode: Callable[[], int] | None = None,
) -> InstanceLock:
    """Take this network namespace's instance lock, or raise LockedError naming the holder.

    `namespace` is the namespace's file (/proc/self/ns/net); `inode` identifies it for the
    lock file's name (by default, that file's inode). Both are injectable so that tests can
    play two namespaces.
    """
    try:
        namespace_fd = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LockError(
            f"cannot identify the network namespace ({namespace}): {exc.strerror or exc}"
        ) from None
    try:
        number = inode() if inode is not None else os.fstat(namespace_fd).st_ino
        path = lock_path(directory, number)
        if not _flock(namespace_fd):
            holder = flock_holder(namespace_fd)
            holder_text = describe_holder(path, holder)
            raise LockedError(_locked(holder_text, number, path), holder_text, path)
        return _take_file(directory, path, number, namespace_fd)
    except BaseException:
        os.close(namespace_fd)
        raise


def _locked(holder: str, namespace: int, path: Path) -> str:
    return (
        f"another lrkp-tsl node, {holder}, already runs in this network namespace (inode "
        f"{namespace}; it holds {path} and a lock on the namespace itself). Two nodes cannot "
        "share one network namespace: a second one would fight the first over the same "
        "kernel tables (table ip lrkp, the NFQUEUE rule, conntrack). Stop that node first, "
        "or run this one in another network namespace."
    )


def _take_file(directory: Path, path: Path, namespace: int, namespace_fd: int) -> InstanceLock:
    try:
        if not directory.is_dir():
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            directory.chmod(0o755)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise LockError(
            f"cannot create the lock directory {directory}: {exc.strerror or exc} "
            "(the node runs as root, or give it a directory it may write)"
        ) from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LockError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    try:
        taken = _flock(fd)
    except OSError as exc:
        os.close(fd)
        raise LockError(f"cannot lock {path}: {exc.strerror or exc}") from None
    if not taken:  # a node of an earlier release, which locks only the file
        os.close(fd)
        holder_text = describe_holder(path)
        raise LockedError(_locked(holder_text, namespace, path), holder_text, path)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    content = f"{os.getpid()}\nnetns {namespace}\nstarted {started}\n".encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
    except OSError as exc:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise LockError(f"cannot write the lock file {path}: {exc.strerror or exc}") from None
    return InstanceLock(path, fd, namespace, namespace_fd)


class StateDirLock:
    """The flock on a state directory, held for the node's life; `release()` lets it go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the last descriptor: the kernel drops the lock


def lock_state_dir(path: Path) -> StateDirLock:
    """Make `path` this node's own state directory, or raise LockedError naming the node
    that already uses it (its pid and network namespace). OSError if it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _flock(fd):
            return StateDirLock(path, fd)
        pid = flock_holder(fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    who = "a process whose pid /proc/locks does not show" if pid is None else f"pid {pid}"
    if pid is not None:
        with contextlib.suppress(OSError):
            who += f" (network namespace {os.readlink(f'/proc/{pid}/ns/net')})"
    raise LockedError(
        f"state_dir {str(path)!r} is in use by another lrkp-tsl node, {who}. One state "
        "directory belongs to one node: two nodes sharing it would load, delete and "
        "reinstall each other's calls, and share one drain flag. Give each node its own "
        "state_dir (e.g. /var/lib/lrkp-tsl/<instance>), or stop that node first."
    )
