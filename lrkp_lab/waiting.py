"""Waiting for a condition in the lab: polled, bounded, and failing with what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float = 5.0,
    step: float = 0.005,
    detail: Callable[[], object] | None = None,
) -> float:
    """Poll `check()` until true; return how long it took; fail naming `what` otherwise
    (with `detail()`, what there is to see then, when given)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            shown = "" if detail is None else f"\n{detail()}"
            raise AssertionError(f"{what}: not within {timeout} s{shown}")
        time.sleep(step)
    return time.monotonic() - start
