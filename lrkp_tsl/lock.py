"""One node per network namespace: an exclusive lock named after the namespace.

Two nodes in one namespace would fight over the same kernel state: one `table ip lrkp`
(each reload flushes the other's rules), one NFQUEUE rule, one conntrack table (each
deletes the other's entries), and each would repair what the other just changed. So the
node takes `flock(LOCK_EX | LOCK_NB)` on `<directory>/netns-<inode>.lock` before it touches
the kernel, where `<inode>` is the inode of /proc/self/ns/net (how network namespaces are
told apart; `ip netns exec` keeps /run shared, so one directory serves every namespace).

The kernel releases an flock when the last descriptor of its open file goes away, so a node
killed with SIGKILL never blocks its restart. The file is never deleted (deleting a lock
file lets a process that opened the old inode and one that creates a new one both "hold"
it); the pid written into it is for the error message only, and a stale one is harmless.
The descriptor is close-on-exec, so the iptables-nft processes the node spawns never
inherit the lock.
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

    def __init__(self, path: Path, fd: int, inode: int) -> None:
        self.path = path
        self.inode = inode
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close; idempotent. The file stays (see the module docstring)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # still locked here: nobody reads a half-written file
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(path: Path) -> str:
    """What the lock file says about its holder, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    lines = text.splitlines()
    pid = lines[0].strip() if lines else ""
    if not pid.isdigit():
        return "a process whose pid is not in the file yet (it is starting)"
    details = [line.strip() for line in lines[1:] if line.strip()]
    return f"pid {pid}" + (f" ({', '.join(details)})" if details else "")


def acquire_instance_lock(
    directory: Path = DEFAULT_DIRECTORY, *, inode: Callable[[], int] = netns_inode
) -> InstanceLock:
    """Take this network namespace's instance lock, or raise LockedError naming the holder.

    `inode` identifies the namespace (injectable so that tests can play two namespaces).
    """
    namespace = inode()
    try:
        if not directory.is_dir():
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            directory.chmod(0o755)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise LockError(
            f"cannot create the lock directory {directory}: {exc.strerror or exc} "
            "(the node runs as root, or give it a directory it may write)"
        ) from None
    path = lock_path(directory, namespace)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LockError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = describe_holder(path)
        raise LockedError(
            f"another lrkp-tsl node, {holder}, already runs in this network "
            f"namespace (inode {namespace}; it holds {path}). Two nodes cannot share one "
            "network namespace: a second one would fight the first over the same kernel "
            "tables (table ip lrkp, the NFQUEUE rule, conntrack). Stop that node first, or "
            "run this one in another network namespace.",
            holder,
            path,
        ) from None
    except OSError as exc:
        os.close(fd)
        raise LockError(f"cannot lock {path}: {exc.strerror or exc}") from None
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    content = f"{os.getpid()}\nnetns {namespace}\nstarted {started}\n".encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
    except OSError as exc:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise LockError(f"cannot write the lock file {path}: {exc.strerror or exc}") from None
    return InstanceLock(path, fd, namespace)
