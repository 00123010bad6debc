"""The drain flag on disk, `<state_dir>/draining`: a node drained for maintenance stays
drained across a restart (an upgrade, a crash, systemd's Restart=on-failure) until an
operator runs `lrkp-ctl undrain`. Coming back undrained would hand it new calls in the
middle of the maintenance it was drained for."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

FILENAME = "draining"


def path(state_dir: Path) -> Path:
    return state_dir / FILENAME


def is_set(state_dir: Path) -> bool:
    return path(state_dir).exists()


def persist(state_dir: Path, draining: bool) -> str | None:
    """Write (atomically: a temporary file renamed) or remove the flag; None when done,
    else what failed, for the operator (the in-memory state applies either way)."""
    flag = path(state_dir)
    temporary = flag.with_name(f".{FILENAME}.{os.getpid()}")
    try:
        if draining:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            temporary.write_text(f"drained by lrkp-ctl drain at {stamp}\n")
            os.replace(temporary, flag)
        else:
            flag.unlink(missing_ok=True)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)  # nothing half-written left behind
        return f"{flag}: {exc.strerror or exc}"
    return None
