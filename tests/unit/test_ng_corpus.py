"""The ng corpus played to lrkp_tsl.ng alone (no root): every reply is sane, and every
rewritten SDP is its input with only what a relay must change changed, line for line."""

from __future__ import annotations

import re
from ipaddress import IPv4Address

import pytest

from lrkp_lab import ngcorpus
from lrkp_lab.ngpeer import FrontEndPeer
from lrkp_tsl.media import PortRange
from lrkp_tsl.ng.sdp import ICE_ATTRIBUTES, parse

INTERNAL, EXTERNAL = IPv4Address("10.201.1.1"), IPv4Address("10.201.2.1")
CASES = ngcorpus.cases()


def invariant(sdp: str) -> list[str]:
    """The SDP without what the relay may change: addresses of o=/c=, m= ports, a=rtcp,
    ICE attributes and a=group:BUNDLE."""
    kept = []
    for line in sdp.split("\r\n"):
        name = line[2:].partition(":")[0] if line.startswith("a=") else ""
        if line.startswith("c=") or name == "rtcp" or name in ICE_ATTRIBUTES:
            continue
        if line.startswith("a=group:BUNDLE"):
            continue
        if line.startswith("o="):
            line = " ".join(line.split()[:4])
        elif line.startswith("m=") and line.split()[1] != "0":
            kind, _port, rest = line.split(" ", 2)
            line = f"{kind} PORT {rest}"
        kept.append(line)
    return kept


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_replies_keep_everything_else(case: ngcorpus.Case) -> None:
    replies = ngcorpus.play(case, FrontEndPeer(INTERNAL, EXTERNAL, PortRange(30000, 30999)))
    for step, reply in zip(case.steps, replies, strict=True):
        if step["command"] in ("offer", "answer"):
            assert reply["result"] == "ok", reply
            given = "".join(line + "\r\n" for line in step["sdp"])
            assert invariant(reply["sdp"]) == invariant(given)
            parsed = parse(reply["sdp"].encode("latin-1"))
            for media in parsed.media:
                if not media.rejected:
                    assert str(parsed.address(media)) in (str(INTERNAL), str(EXTERNAL), "0.0.0.0")
        elif step["command"] == "delete":
            assert reply["result"] == "ok", reply


def test_expected_differences_say_why() -> None:
    for case in CASES:
        assert case.about
        for text, why in case.differences.items():
            assert re.match(r"step \d+ \S+: ", text), (case.name, text)
            assert len(why) > 10, (case.name, text)
