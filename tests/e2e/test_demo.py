"""`make run` (no CONFIG): the demo places its calls through Kamailio and the real node, and
its summary must show every call's media relayed both ways, every packet delivered, the NAT'd
caller latched at its NAT's address, and nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys

from lrkp_lab.kamailio import ROOT
from lrkp_lab.lab import Lab, lab_namespaces

MEDIA = re.compile(
    r"^  (\w+) -> (\w+) +(\d+) RTP packets sent, (\d+) received \((-?\d+) lost\), from (.*)$",
    re.MULTILINE,
)


def test_demo_short_relays_every_call_both_ways(lab: Lab) -> None:
    del lab  # the demo builds its own lab; the fixture only checks root, kamailio and sipp
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrkp_lab.demo", "--short", "--plain"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    calls = re.findall(r"^call (\d+): (\w+) -> (\w+) ", out, re.MULTILINE)
    assert [number for number, _, _ in calls] == ["1", "2", "3", "4"], out
    media = MEDIA.findall(out)
    assert len(media) == 2 * len(calls), out
    for (_, caller, callee), forward, backward in zip(calls, media[::2], media[1::2], strict=True):
        assert forward[:2] == (caller, callee) and backward[:2] == (callee, caller), out
        for _, _, sent, received, _, sources in (forward, backward):
            assert int(sent) > 0 and received == sent, out
            assert re.fullmatch(r"10\.201\.[12]\.1:\d+", sources), out  # from the relay only
    assert out.count("verdict    media relayed both ways") == len(calls), out
    assert re.search(r"latched    c at 10\.201\.1\.20:\d+ sends to", out), out  # its NAT
    assert len(re.findall(r"the node removed it [\d.]+ s later", out)) == len(calls), out
    assert not [name for name in lab_namespaces() if name.startswith(f"lrkpt-{proc.pid}-")]
