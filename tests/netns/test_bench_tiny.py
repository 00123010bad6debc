"""The side-by-side benchmark (`make bench`) in miniature, so it cannot rot.

A few streams for a fraction of a second per window: the whole pipeline runs (lab, generator
built from source, every contender set up through its own control protocol, every phase, the
summary, the table and the plot) and every figure must come out for every contender (the ng
call rate: rtpengine's, and lrkp-tsl's once it serves `--ng`). Nothing here asserts on a rate
or a duration: the machine may be busy; only that each figure exists and is sane (packets
were delivered, calls were set up).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrkp_lab.ngrelay import node_serves_ng

REPO = Path(__file__).resolve().parents[2]
NG_SERVERS = ("rtpengine", "rtpengine_redis", "lrkp_ng")  # the `ngcps` phase's servers
FIGURES = (
    "max_pps",
    "us_per_packet",
    "us_per_packet_direct",
    "rtt_p50",
    "rtt_p99",
    "over_loss",
    "recovered",
)


@pytest.mark.timeout(900)  # a hang guard only: a busy machine makes it slow, never failing
def test_tiny_benchmark_gives_every_figure_for_every_contender(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the benchmark needs root, and CI must run it")
        pytest.skip("the benchmark needs root (network namespaces, nftables)")
    with_rtpengine = shutil.which("rtpengine") is not None
    contenders = ["route", "nat", "lrkp", "lrkp_nat"] + (["rtpengine"] if with_rtpengine else [])
    phases = "gen,steps,cpu,rtt,overload,control" + (",ngcps" if with_rtpengine else "")
    bench = subprocess.Popen(
        [sys.executable, str(REPO / "bench/sidebyside.py"), "--tiny", "--out", str(tmp_path),
         "--contenders", ",".join(contenders), "--phases", phases],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        out, err = bench.communicate(timeout=850)
    finally:
        bench.kill()
    assert bench.returncode == 0, out[-3000:] + err[-3000:]
    assert not list(Path("/run/netns").glob(f"*-{bench.pid}-*")), "namespaces left behind"

    summary = json.loads((tmp_path / "sidebyside-tiny.json").read_text())
    assert summary["errors"] == []
    assert summary["gen"]["gen_pps"] > 0
    by = summary["contenders"]
    assert sorted(by) == sorted(contenders)
    for name in contenders:
        row = by[name]
        for figure in FIGURES:
            assert row.get(figure) is not None, (name, figure, row)
        assert row["max_pps"] > 0, (name, row)
        if name.startswith("lrkp"):  # every stream of the node delivers after the overload
            assert row["recovered"] == 4, (name, row)
        assert row["max_pps_vs_route"] is not None
        if with_rtpengine:
            assert row["max_pps_vs_rtpengine"] is not None
            assert row["us_per_packet_vs_rtpengine"] is not None
    assert by["route"]["added_p50"] == 0
    control = summary["control"]
    assert {(r["live"], r["clients"]) for r in control} == {(10, 1), (10, 2), (20, 1), (20, 2)}
    for r in control:
        assert r["pairs"] > 0 and r["pairs_per_s"] > 0 and r["s_ms"]["p50"] > 0
        assert r["kib_per_call"] is not None
    table = (tmp_path / "sidebyside-tiny.md").read_text()
    for label in ("plain routing", "bare nft NAT", "lrkp-tsl, NAT'd callers", "live calls"):
        assert label in table
    assert (tmp_path / "sidebyside-tiny.png").stat().st_size > 1000
    if not with_rtpengine:
        pytest.skip("rtpengine is not installed (scripts/install-bench-deps.sh): its part not run")
    ngcps = {who: [r for r in summary["ngcps"] if r["who"] == who] for who in NG_SERVERS}
    assert {r["clients"] for r in ngcps["rtpengine"]} == {1, 2}
    # rtpengine keeping its calls in Redis: the baseline with lrkp-tsl's guarantee
    # (redis-server is a system dependency: install-system-deps.sh)
    assert {r["clients"] for r in ngcps["rtpengine_redis"]} == {1, 2}
    assert "| rtpengine + Redis |" in table
    for r in summary["ngcps"]:
        assert r["calls_per_s"] > 0 and r["kib_per_call"] is not None
        assert r["offer_ms"]["p50"] > 0 and r["vs_rtpengine"] is not None
    assert all(r["vs_rtpengine"] is not None for r in control)
    # lrkp-tsl's own ng socket, driven like rtpengine, once the node has `--ng`; until then
    # the report says why it did not run (and the run is not an error).
    if node_serves_ng():
        assert {r["clients"] for r in ngcps["lrkp_ng"]} == {1, 2}
        assert all(r["vs_rtpengine_redis"] is not None for r in ngcps["lrkp_ng"])
        assert summary["ngcps_skipped"] == []
        assert "| lrkp-tsl (ng) |" in table
    else:
        assert ngcps["lrkp_ng"] == []
        assert [r["who"] for r in summary["ngcps_skipped"]] == ["lrkp_ng"]
        assert "**Not run:** lrkp-tsl (ng): `lrkp-tsl run` has no --ng yet" in table
