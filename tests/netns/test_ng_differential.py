"""lrkp-tsl's ng against Debian's rtpengine 10.5, exchange by exchange (tests/ng_corpus).

rtpengine runs in userspace in the lab's relay namespace (`--table=-1 --config-file=none
--delete-delay=0`, interfaces `internal` and `external` on the relay's two addresses), and
every exchange of the corpus is played to it and to lrkp-tsl, as Kamailio's default config
sends it. Each rewritten SDP is compared by meaning (lrkp_lab/sdpdiff.py: addresses and
port numbers may differ, nothing else); results and warnings must agree. The differences
that remain are listed in each case with why; a new one, or one that went away, fails.

Until the node serves ng, lrkp-tsl's side is its pure front-end (lrkp_tsl.ng) with an
in-memory port pool: `FrontEndPeer`. Once it serves `--ng`, `ours` becomes a `UdpNgPeer`
on the node's ng socket, and nothing else changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrkp_lab import ngcorpus, rtpengine
from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab
from lrkp_lab.ngpeer import FrontEndPeer, NgPeer, UdpNgPeer
from lrkp_lab.sdpdiff import unexpected
from lrkp_tsl.media import PortRange

CASES = ngcorpus.cases()


@pytest.fixture(scope="module")
def theirs(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UdpNgPeer]:
    if not rtpengine.available():
        if os.environ.get("CI"):
            pytest.fail("rtpengine is missing: scripts/install-bench-deps.sh installs it")
        pytest.skip("rtpengine is not installed (scripts/install-bench-deps.sh)")
    log = Path(tmp_path_factory.mktemp("rtpengine")) / "rtpengine.log"
    with rtpengine.Rtpengine(lab, "relay", INTERNAL_IP, EXTERNAL_IP, log) as running:
        peer = running.peer()
        yield peer
        peer.close()


def ours() -> NgPeer:
    return FrontEndPeer(INTERNAL_IP, EXTERNAL_IP, PortRange(30000, 30999))


def test_corpus_is_not_empty() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_same_meaning_as_rtpengine(case: ngcorpus.Case, theirs: UdpNgPeer) -> None:
    mine, other = ngcorpus.play(case, ours()), ngcorpus.play(case, theirs)
    found = ngcorpus.differences(mine, other)
    extra, gone = unexpected(found, case.differences)
    assert not extra and not gone, (
        f"{case.name}: differences from rtpengine not in the case: {extra}; "
        f"expected ones that did not happen: {gone}"
    )
