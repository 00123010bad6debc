"""Run the node's own code as an unprivileged user, wherever the checkout is.

A checkout may sit where only root can go (a clone under `mktemp -d`, mode 0700), and so
may its virtualenv and pytest's temporary directories (/tmp/pytest-of-root is 0700). So a
test that runs code as `nobody` runs a copy: the `lrkp_tsl` package copied into a fresh
directory under /tmp that every user may read, with the base interpreter (not the venv's
wrapper) and that directory as the only import path of ours. What nobody runs must then be
pure standard library plus the package (lrkp-ctl and the instance lock are).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lrkp_tsl

NOBODY = 65534
PACKAGE = Path(lrkp_tsl.__file__).resolve().parent


def interpreter() -> str:
    """The interpreter the venv was made from: a system path any user may execute."""
    real = os.path.realpath(sys.executable)
    if os.access(real, os.X_OK) and not real.startswith(sys.prefix + os.sep):
        return real
    return os.path.realpath(
        getattr(sys, "_base_executable", None) or shutil.which("python3") or real
    )


@contextmanager
def readable_copy() -> Iterator[Path]:
    """A directory every user can read holding a copy of `lrkp_tsl`; removed afterwards.
    The directory itself (mode 0755, owned by root) is also a place nobody cannot write."""
    base = Path(tempfile.mkdtemp(prefix="lrkp-nobody-"))
    try:
        shutil.copytree(PACKAGE, base / "lrkp_tsl", ignore=shutil.ignore_patterns("__pycache__"))
        for path in (base, *base.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def argv(base: Path, *python_args: str) -> list[str]:
    """`python ARGS` as nobody, importing the copy in `base`, from `/` (the caller's working
    directory may be private)."""
    return [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "env", "-C", "/", f"PYTHONPATH={base}", interpreter(), "-s", *python_args,
    ]  # fmt: skip
