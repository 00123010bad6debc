"""How much the side-by-side benchmark measures: --tiny, --quick or the full run."""

from __future__ import annotations

from dataclasses import dataclass


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
    clients: int
    ng_calls: int
    ng_live: int
    warm_s: float = 0.5
    quiet_wait: float = 0.0
    retries: int = 0


PROFILES = {
    "tiny": Profile(
        flows=4,
        ladder=[400],
        bisect=0,
        step_s=0.5,
        cpu_pps=400,
        cpu_hi_pps=300,
        cpu_s=1.0,
        rtt_pps=200,
        rtt_s=1.0,
        live=[10, 20],
        cps_pairs=40,
        clients=2,
        ng_calls=20,
        ng_live=20,
    ),
    "quick": Profile(
        flows=1000,
        ladder=[20_000, 50_000, 100_000, 200_000, 400_000, 600_000],
        bisect=1,
        step_s=1.5,
        cpu_pps=50_000,
        cpu_hi_pps=300_000,
        cpu_s=3.0,
        rtt_pps=5_000,
        rtt_s=2.0,
        live=[1000, 10_000],
        cps_pairs=1000,
        clients=4,
        ng_calls=1000,
        ng_live=1000,
        quiet_wait=5.0,
        retries=1,
    ),
    "full": Profile(
        flows=1000,
        ladder=[
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
        ],
        bisect=3,
        step_s=3.0,
        cpu_pps=50_000,
        cpu_hi_pps=300_000,
        cpu_s=8.0,
        rtt_pps=5_000,
        rtt_s=5.0,
        live=[1000, 10_000, 50_000],
        cps_pairs=3000,
        clients=4,
        ng_calls=3000,
        ng_live=2000,
        quiet_wait=20.0,
        retries=2,
    ),
}
