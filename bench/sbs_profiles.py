"""How much the side-by-side benchmark measures: --tiny, --quick or the full run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Profile:
    """How much to measure: --tiny (the test suite), --quick, or the full run."""

    flows: int
    ladder: list[int]
    bisect: int
    step_s: float
    cpu_pps: int
    cpu_s: float
    cpu_hi_pps: int
    rtt_pps: int
    rtt_s: float
    live: list[int]
    cps_pairs: int
    clients: tuple[int, ...]  # closed-loop clients per call-rate run (Kamailio workers)
    ng_calls: int
    ng_live: int
    warm_s: float = 0.5
    quiet_wait: float = 0.0
    retries: int = 0


FULL_LADDER = [
    20_000,
    40_000,
    60_000,
    80_000,
    100_000,
    150_000,
    200_000,
    300_000,
    400_000,
    500_000,
    600_000,
    800_000,
]

# One row per setting, one column per profile: what --tiny and --quick cut, side by side.
NAMES = ("tiny", "quick", "full")
SETTINGS: dict[str, tuple[Any, Any, Any]] = {
    "flows": (4, 1000, 1000),
    "ladder": ([400], [20_000, 50_000, 100_000, 200_000, 400_000, 600_000], FULL_LADDER),
    "bisect": (0, 1, 3),
    "step_s": (0.5, 1.5, 3.0),
    "cpu_pps": (400, 50_000, 50_000),
    "cpu_hi_pps": (300, 300_000, 300_000),
    "cpu_s": (1.0, 3.0, 8.0),
    "rtt_pps": (200, 5_000, 5_000),
    "rtt_s": (1.0, 2.0, 5.0),
    "live": ([10, 20], [1000, 10_000], [1000, 10_000, 50_000]),
    "cps_pairs": (40, 1000, 3000),
    "clients": ((1, 2), (1, 4), (1, 4, 8)),
    "ng_calls": (20, 1000, 3000),
    "ng_live": (20, 1000, 2000),
    "quiet_wait": (0.0, 5.0, 20.0),
    "retries": (0, 1, 2),
}
PROFILES = {
    name: Profile(**{key: values[i] for key, values in SETTINGS.items()})
    for i, name in enumerate(NAMES)
}
