"""An active/standby pair: takeover gap and loss, and replication lag under load.

Runs as root in a lab: relay and relay2 share the VIPs with keepalived (VRRPv3, advert
0.1 s), each with its own redis-server and node in pair mode (tests/netns/test_pair.py has
the same set-up). Measured:

- takeover, RUNS times, alternating direction: a call with a NAT'd caller streaming 50
  packets/s each way, and --quiet-calls calls without media (set up, no packet yet, as
  while they ring); the active's daemon and keepalived are SIGKILLed and its links taken
  down; the gap (last packet before, first after), packets lost per direction, and the
  calls the new active still holds 12 s later (their idle timeout is 60 s: all of them);
  then they are ended (D) and the failed node comes back as standby for the next run;
- replication lag: `S` and `D` at --rate commands/s for --seconds against the active; for
  each `S`, from its `OK` to the standby's log line saying the call is in its kernel
  (`replicated from the active node`, logged after the kernel commit; ms resolution).

    PYTHONPATH=. .venv/bin/python bench/pair.py [--runs 5] [--rate 500] [--seconds 10]
        [--quiet-calls 300]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path

from lrkp_lab.calls import Stream, burst
from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, Node, set_command
from lrkp_lab.pairlab import INTERNAL_VIP
from lrkp_lab.pairnodes import CONTROL, RATE, Members, running_pair
from lrkp_lab.parties import Peers
from lrkp_tsl.media import Endpoint

OTHER = {"relay": "relay2", "relay2": "relay"}


def s_body(index: int, verb: str = "S") -> bytes:
    port = 20000 + 2 * (index % 900)
    return set_command(verb, "10.201.1.10", str(INTERNAL_VIP), str(INTERNAL_VIP),
                       "10.201.1.11", 4000, port, port, 6000, f"lag-{index}@bench")  # fmt: skip


KEPT_AFTER = 12.0  # seconds after the takeover at which the new active's calls are counted


def quiet_body(index: int, verb: str = "S") -> bytes:
    port = 20000 + 2 * index  # one relay endpoint per call (Kamailio's gt=1)
    return set_command(verb, "10.201.1.10", str(INTERNAL_VIP), str(INTERNAL_VIP),
                       "10.201.1.11", 4000 + 2 * index, port, port, 6000 + 2 * index,
                       f"quiet-{index}@bench")  # fmt: skip


def calls_on(lab: Lab, host: str) -> int:
    done = lab.run(host, sys.executable, "-m", "lrkp_tsl.ctl", "--json", "ping")
    return int(json.loads(done.stdout)["calls"])


def takeover_run(lab: Lab, members: Members, active: str, run: int, quiet: int) -> dict[str, float]:
    standby = OTHER[active]
    pair, nodes = members.keepalived, members.nodes
    with Peers(lab) as peers:
        client = Controller(lab, "sip", "10.201.1.5")
        for index in range(quiet):
            body = quiet_body(index)
            assert client.command(body, CONTROL) == body + b"OK"
        caller, callee = peers("c", 4000 + run), peers("b", 6000 + run)
        port = 21000 + 4 * run
        body = set_command("S", "10.201.3.10", str(INTERNAL_VIP), str(INTERNAL_VIP),
                           "10.201.1.11", caller.endpoint.port, port, port + 2,
                           callee.endpoint.port, f"takeover-{run}@bench")  # fmt: skip
        assert client.command(body, CONTROL) == body + b"OK"
        to_a, to_b = Endpoint(INTERNAL_VIP, port + 2), Endpoint(INTERNAL_VIP, port)
        burst(caller, to_a, callee, to_b, 1, b"hello")
        time.sleep(0.5)  # replicated (sub-millisecond; the margin costs nothing)
        streams = [Stream(caller, to_a, callee, b"A", RATE).start(),
                   Stream(callee, to_b, caller, b"B", RATE).start()]  # fmt: skip
        time.sleep(1.0)
        nodes[active].proc.send_signal(signal.SIGKILL)
        crashed = time.monotonic()
        pair.crash(active)
        vips = pair.wait_holder(standby, 2.0) - crashed
        time.sleep(1.5)
        for stream in streams:
            stream.stop()
        time.sleep(max(0.0, crashed + KEPT_AFTER - time.monotonic()))
        kept = calls_on(lab, standby)
        for index in range(quiet):  # end them, for the next run's
            body = quiet_body(index, "D")
            assert client.command(body, CONTROL) == body + b"OK"
        body = set_command("D", "10.201.3.10", str(INTERNAL_VIP), str(INTERNAL_VIP),
                           "10.201.1.11", caller.endpoint.port, port, port + 2,
                           callee.endpoint.port, f"takeover-{run}@bench")  # fmt: skip
        assert client.command(body, CONTROL) == body + b"OK"
        client.close()
    nodes[active].stop(signal.SIGKILL)
    pair.recover(active)
    returning = members.start_node(active, state=nodes[active].state)
    returning.wait_log("following: the active node's table loaded", 10)
    return {
        "vips_moved_s": vips,
        "gap_ab_s": streams[0].longest_gap(),
        "gap_ba_s": streams[1].longest_gap(),
        "lost_ab": len(streams[0].lost()),
        "lost_ba": len(streams[1].lost()),
        "calls": quiet + 1,
        "kept_after_12_s": kept,
    }


LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG lrkp_tsl.calls: \[(lag-\d+@bench)\] "
    r"replicated from the active node"
)


def log_times(text: str) -> dict[str, float]:
    times: dict[str, float] = {}
    for line in text.splitlines():
        found = LOG_LINE.match(line)
        if found:
            stamp = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times.setdefault(found.group(2), stamp.timestamp())
    return times


def replication_lag(lab: Lab, standby: Node, rate: float, seconds: float) -> dict[str, float]:
    client = Controller(lab, "sip", "10.201.1.5")
    ok_at: dict[str, float] = {}
    interval = 2.0 / rate  # one S and one D per interval
    try:
        next_at = time.monotonic()
        index = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            body = s_body(index)
            assert client.command(body, CONTROL) == body + b"OK"
            ok_at[f"lag-{index}@bench"] = time.time()
            if index >= 100:  # keep ~100 calls up: D the one from 100 commands ago
                old = s_body(index - 100, "D")
                assert client.command(old, CONTROL) == old + b"OK"
            index += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        client.close()
    time.sleep(1.0)
    seen = log_times(standby.output())
    lags = sorted(1000 * (seen[call] - at) for call, at in ok_at.items() if call in seen)
    return {
        "commands_per_s": 2 * len(ok_at) / seconds,
        "replicated": len(lags),
        "set": len(ok_at),
        # The log has ms resolution (both clocks are this host's): a lag under 1 ms reads
        # as anything from -1 to 1.
        "lag_p50_ms": statistics.median(lags),
        "lag_p99_ms": lags[int(0.99 * (len(lags) - 1))],
        "lag_max_ms": lags[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/pair.json"))
    parser.add_argument("--quiet-calls", type=int, default=300)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    with Lab() as lab, running_pair(lab, idle=60) as members:
        runs = []
        active = "relay"
        for run in range(args.runs):
            result = takeover_run(lab, members, active, run, args.quiet_calls)
            runs.append(result)
            print(f"takeover {run + 1}: {active} -> {OTHER[active]}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in result.items()))  # fmt: skip
            active = OTHER[active]
        lag = replication_lag(lab, members.nodes[OTHER[active]], args.rate, args.seconds)
    gaps = sorted(max(r["gap_ab_s"], r["gap_ba_s"]) for r in runs)
    lost = sorted(max(r["lost_ab"], r["lost_ba"]) for r in runs)
    summary = {
        "runs": runs,
        "gap_p50_s": statistics.median(gaps),
        "gap_max_s": gaps[-1],
        "lost_p50": statistics.median(lost),
        "lost_max": lost[-1],
        "calls_kept": f"{min(r['kept_after_12_s'] for r in runs)}-"
        f"{max(r['kept_after_12_s'] for r in runs)} of {runs[0]['calls']}",
        "replication": lag,
    }
    print(
        f"takeover over {len(runs)} runs: gap p50 {summary['gap_p50_s']:.3f} s, max "
        f"{summary['gap_max_s']:.3f} s; lost per direction p50 {summary['lost_p50']}, max "
        f"{summary['lost_max']} (at {RATE} packets/s); calls held 12 s after: "
        f"{summary['calls_kept']}\n"
        f"replication at {lag['commands_per_s']:.0f} S+D/s: lag OK -> standby kernel p50 "
        f"{lag['lag_p50_ms']:.1f} ms, p99 {lag['lag_p99_ms']:.1f} ms, max "
        f"{lag['lag_max_ms']:.1f} ms ({lag['replicated']}/{lag['set']} calls seen)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
