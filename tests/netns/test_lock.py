"""The instance lock across real network namespaces: one lock file per namespace, in one
directory that `ip netns exec` leaves shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lrkp_lab.lab import Lab

ROOT = Path(__file__).resolve().parents[2]

# Takes the lock of the namespace it runs in, prints "<code> <path or reason>", then waits
# for stdin to close if it got it.
TAKE = """
import sys
from pathlib import Path
from lrkp_tsl.lock import LockError, acquire_instance_lock
try:
    lock = acquire_instance_lock(Path(sys.argv[1]))
except LockError as error:
    print(error.code, error.reason, flush=True)
    sys.exit(3)
print("held", lock.path, flush=True)
if sys.argv[2:] == ["hold"]:
    sys.stdin.read()
lock.release()
"""


def command(lab: Lab, host: str, directory: Path, *extra: str) -> list[str]:
    return [
        "ip", "netns", "exec", lab.ns(host), "env", f"PYTHONPATH={ROOT}",
        sys.executable, "-c", TAKE, str(directory), *extra,
    ]  # fmt: skip


def take(lab: Lab, host: str, directory: Path) -> tuple[int, str]:
    result = subprocess.run(
        command(lab, host, directory), capture_output=True, text=True, check=False
    )
    assert not result.stderr, result.stderr
    return result.returncode, result.stdout.strip()


def netns_inode(lab: Lab, host: str) -> int:
    return int(lab.run(host, "stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout)


def test_each_namespace_has_its_own_lock_file(lab: Lab, tmp_path: Path) -> None:
    relay, caller = netns_inode(lab, "relay"), netns_inode(lab, "a")
    assert relay != caller != os.stat("/proc/self/ns/net").st_ino
    assert take(lab, "relay", tmp_path) == (0, f"held {tmp_path}/netns-{relay}.lock")
    assert take(lab, "a", tmp_path) == (0, f"held {tmp_path}/netns-{caller}.lock")


def test_a_second_node_in_one_namespace_is_refused_and_others_are_not(
    lab: Lab, tmp_path: Path
) -> None:
    relay = netns_inode(lab, "relay")
    with subprocess.Popen(
        command(lab, "relay", tmp_path, "hold"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as first:
        try:
            assert first.stdout is not None
            assert first.stdout.readline().strip() == f"held {tmp_path}/netns-{relay}.lock"
            code, said = take(lab, "relay", tmp_path)
            assert code == 3
            # `ip netns exec` execs the command: the holder's pid is the one we started.
            assert said.startswith(f"locked another lrkp-tsl node, pid {first.pid} ")
            assert f"netns-{relay}.lock" in said
            assert take(lab, "a", tmp_path)[0] == 0
        finally:
            first.kill()
            first.wait(timeout=10)
    # Killed, not released: the kernel let the lock go with the process.
    assert take(lab, "relay", tmp_path)[0] == 0
