"""Stopping a process the lab or a benchmark started, bounded: a signal, a grace period,
then SIGKILL."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any


def terminate(
    proc: subprocess.Popen[Any],
    sig: int = signal.SIGTERM,
    grace: float = 10.0,
    reap: float | None = 5.0,
) -> int | None:
    """Send `sig` to `proc` unless it has exited, and wait up to `grace` seconds for it to
    end; then SIGKILL it and wait `reap` seconds more (None: as long as it takes). Its exit
    status (None only if even SIGKILL did not end it within `reap`)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(reap)
    return proc.returncode


def rss_kib(pid: int | str = "self") -> int:
    """A process's resident set (VmRSS) in KiB: how the tests and benchmarks weigh a node."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
