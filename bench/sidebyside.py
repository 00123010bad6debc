"""Side by side: lrkp-tsl against Debian's rtpengine, bare nftables NAT and plain routing.

One lab, the same streams and offered load for every contender, one run; every figure also as
a ratio to plain routing and to rtpengine measured in the same run. Adapted from the reference
measurement made before the node existed (research/bench-reference: method in baseline.md).

    caller A (generator) -- relay R (one core) -- callee B (sink, echo)
    a0 10.98.1.2/24 ---veth--- r1 10.98.1.1/24 | r2 10.98.2.1/24 ---veth--- b0 10.98.2.2/24
                               relay addresses 10.98.0.1, 10.98.0.2 on lo, ip_forward=1

R's packet processing (RPS on r1, r2) and every relay process run on RELAY_CPU; the generator
and A's and B's packet processing on GEN_CPU: the relay "box" is one core. Contenders:
  route      A sends to B directly; R routes (no NAT, no conntrack): the limit
  nat        the kernel relay design by hand: nft maps for DNAT/SNAT + conntrack (natmap)
  lrkp       lrkp-tsl, calls set up with `S` over its control port; parties reachable
  lrkp_nat   the same with the caller's SDP address private: every stream latches via NFQUEUE
  rtpengine  Debian's rtpengine (userspace forwarding), calls set up with ng offer + answer
Traffic: rtpgen.c (compiled here): N streams of 172-byte RTP-shaped packets, AF_PACKET from A
for load (so it out-sends every contender: phase `gen` shows its rate), UDP sockets with an echo
at B for latency. Loss is counted at B's ingress in the kernel (a netdev drop rule).

Phases per contender, every window from a fresh contender (restarted, calls set up again,
conntrack flushed), then a warm-up that latches every stream:
  steps     rate ladder + bisection: the highest offered load relayed with < 0.1 % loss
  cpu       a SCHED_IDLE soaker on the relay core at a fixed load: relay-core CPU per packet
  rtt       round trip A -> relay -> B echo -> relay -> A at a low load: p50 / p99
  overload  2 x the contender's limit (or flat out), then at once 25 % of it with a per-stream
            counter at B: loss against the excess, and how many streams recover
and once: `gen` (the generator into a drop rule at R), `control` (lrkp-tsl `S`+`D` pairs/s and
`S` -> `OK` at 1k/10k/50k live calls, 1 and several clients, daemon RSS per call), `ngcps`
(rtpengine offer+answer+delete calls/s, 1 and several clients, RSS per call).

    make bench                                   # the full run (~20 min), as root
    .venv/bin/python bench/sidebyside.py --quick # ~5 min
    .venv/bin/python bench/sidebyside.py --tiny --out DIR   # the test suite's (seconds)
    .venv/bin/python bench/sidebyside.py --quick --phases ngcps --clients 1,4,8  # call rates

Writes DIR/sidebyside.{jsonl,json,md,png} (default bench/results; the JSONL of every window
goes to DIR/raw/). Other processes on the machine are measured during every window
(`foreign_cpu`, % of one core) and reported: numbers from a busy machine are noisy.

The parts, one job each: sbs_lab.py (namespaces, addresses, counters), sbs_accounting.py (CPU
and memory from /proc), sbs_profiles.py (--tiny, --quick, full), sbs_gen.py (rtpgen),
sbs_contenders.py (what relays), sbs_phases.py (windows and phases), sbs_report.py (summary and
table), sbs_names.py (labels, shared with plot_sidebyside.py); the control clients ctlclient.py
and ngclient.py share clientkit.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from sbs_lab import HERE, REPO, Topo
from sbs_names import CONTENDERS
from sbs_phases import Bench
from sbs_profiles import PROFILES
from sbs_report import markdown, summarize


def main() -> int:
    if sys.argv[1:2] == ["--render"]:  # the table again from a summary: --render JSON
        Path(sys.argv[2]).with_suffix(".md").write_text(
            markdown(json.loads(Path(sys.argv[2]).read_text()))
        )
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer and shorter windows (~5 min)")
    mode.add_argument("--tiny", action="store_true", help="a few streams, seconds (the tests')")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--phases", default="gen,steps,cpu,rtt,overload,control,ngcps")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    parser.add_argument("--name", help="file stem (default sidebyside, sidebyside-quick, …)")
    parser.add_argument(
        "--clients",
        help="client counts of `control` and `ngcps`, e.g. 1,4,8 (default: the profile's)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("sidebyside: needs root (namespaces, nftables)", file=sys.stderr)
        return 1
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    stem = args.name or ("sidebyside" if profile == "full" else f"sidebyside-{profile}")
    contenders = args.contenders.split(",")
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    if "rtpengine" in contenders and not shutil.which("rtpengine"):
        parser.error("rtpengine is not installed: scripts/install-bench-deps.sh")
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=raw))
    with (raw / f"{stem}.jsonl").open("w") as out:
        chosen = PROFILES[profile]
        if args.clients:
            chosen = replace(chosen, clients=tuple(int(n) for n in args.clients.split(",")))
        bench = Bench(Topo(), chosen, work, out)
        bench.run(contenders, args.phases.split(","))
    summary = summarize(bench.records, profile)
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(summary))
    plot = subprocess.run(
        [
            "/usr/bin/python3",
            str(HERE / "plot_sidebyside.py"),
            str(args.out / f"{stem}.json"),
            str(args.out / f"{stem}.png"),
        ],
        capture_output=True,
        text=True,
    )
    if plot.returncode:
        print(f"sidebyside: no plot: {plot.stderr.strip()}", file=sys.stderr)
    print(markdown(summary))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
