"""What bench/ctlclient.py and bench/ngclient.py share: endpoints, percentiles, K clients in
parallel and the one-JSON-line-out entry point.

Both run as scripts inside the relay namespace (`sys.path[0]` is bench/), so a plain import.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

Job = TypeVar("Job")


def endpoint(text: str) -> tuple[str, int]:
    ip, port = text.rsplit(":", 1)
    return ip, int(port)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def p50_p99(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5), 3), "p99": round(percentile(values, 0.99), 3)}


def in_parallel(
    worker: Callable[[Job], dict[str, Any]], jobs: Sequence[Job]
) -> tuple[list[dict[str, Any]], float]:
    """One job in this process, several in as many forked processes (one client each): their
    results, and the seconds all took (forking included, as a rate must count it)."""
    started = time.monotonic()
    if len(jobs) == 1:
        results = [worker(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
            results = pool.map(worker, jobs)
    return results, time.monotonic() - started


def merged(results: list[dict[str, Any]], key: str) -> list[float]:
    """Every client's samples of `key`, as one list."""
    return [v for r in results for v in r[key]]


def closed_loop(
    worker: Callable[[Job], dict[str, Any]], jobs: Sequence[Job], done: str, latencies: list[str]
) -> dict[str, Any]:
    """K clients, each one closed loop (a job), as one figure: how many `done` in all, per
    second, and each of `latencies` (lists of ms per client) as p50 / p99."""
    results, elapsed = in_parallel(worker, jobs)
    total = sum(r[done] for r in results)
    return {
        "clients": len(jobs),
        done: total,
        f"{done}_per_s": round(total / elapsed, 1),
        **{key: p50_p99(merged(results, key)) for key in latencies},
    }


def run(name: str, main: Callable[[], dict[str, Any]]) -> None:
    """Print main's result as one JSON line; a RuntimeError or OSError exits non-zero with
    `name: error` on stderr (the benchmark shows it)."""
    try:
        result = main()
    except (RuntimeError, OSError) as error:
        sys.exit(f"{name}: {error}")
    print(json.dumps(result))
    sys.exit(0)
