"""What an ng call costs the node's Python alone: offer + answer + delete through the ng
front-end and the engine, without sockets, with the in-memory kernel (tests/fakes.py) and
the in-memory or the real SQLite store.

The datagrams are bench/ngclient.py's (`cps`), on top of 1,000 live calls. Prints the CPU
per call (the minimum of --runs runs of --calls calls: other processes only ever add to
it) and the Python function calls per call (cProfile's count: the same on a busy machine
as on an idle one, so two trees compare exactly). What it leaves out, and the daemon pays
on top: the kernel's nf_tables and conntrack work, the event loop, the sockets
(docs/ng-integration.md, section 6).

    .venv/bin/python bench/ng_engine.py [--store memory|sqlite] [--calls 2000] [--runs 4]
    PYTHONPATH=OTHER_TREE .venv/bin/python bench/ng_engine.py   # another tree's node
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # after PYTHONPATH: another tree's node comes first

from ngclient import bencode, sdp  # noqa: E402

import lrkp_tsl  # noqa: E402
from lrkp_tsl.engine import Engine, Settings  # noqa: E402
from lrkp_tsl.frontends.lrkproxy import LrkproxyFrontEnd  # noqa: E402
from lrkp_tsl.frontends.ng import NgFrontEnd  # noqa: E402
from lrkp_tsl.latching import Policy  # noqa: E402
from lrkp_tsl.media import PortRange  # noqa: E402
from lrkp_tsl.ng.callmodel import Interfaces  # noqa: E402
from lrkp_tsl.records import Store  # noqa: E402
from lrkp_tsl.store import SqliteStore  # noqa: E402
from tests.fakes import FakeKernel, MemoryStore  # noqa: E402
from tests.unit.test_engine import IDLE, LIFETIME, LIMITS, NODE, ROUTED  # noqa: E402

KAMAILIO = (("10.0.0.5", 5060), "10.0.0.5:5060")
LIVE = 1000


def node(store: str, work: Path) -> NgFrontEnd:
    """Both front-ends on one engine, as the daemon builds them."""
    state: Store = SqliteStore(work / "state.db") if store == "sqlite" else MemoryStore()
    settings = Settings(LIFETIME, IDLE, Policy.AUTO, ROUTED, PortRange(10000, 59999))
    engine = Engine(settings, FakeKernel(), state)
    LrkproxyFrontEnd(engine, NODE, LIMITS)
    return NgFrontEnd(engine, Interfaces({"internal": IPv4Address("10.0.0.10")}))


def datagrams(tag: str, count: int, live: bool = False) -> list[bytes]:
    """ngclient.py's requests: offer, answer (and delete) per call."""
    out = []
    for i in range(count):
        call_id = f"{tag}-{i}"
        messages = [
            {"command": "offer", "call-id": call_id, "from-tag": "a",
             "sdp": sdp("10.98.1.2", 40000)},
            {"command": "answer", "call-id": call_id, "from-tag": "a", "to-tag": "b",
             "sdp": sdp("10.98.2.2", 30000)},
        ]  # fmt: skip
        if not live:
            messages.append({"command": "delete", "call-id": call_id, "from-tag": "a"})
        out += [f"{tag}_{i}_{n} ".encode() + bencode(m) for n, m in enumerate(messages)]
    return out


def serve(ng: NgFrontEnd, batch: list[bytes], now: float) -> None:
    for data in batch:
        reply = ng.on_datagrams([(data, *KAMAILIO, True)], now)[0]
        if reply is None or b"6:result2:ok" not in reply:
            raise RuntimeError(f"not ok: {data[:60]!r} -> {reply!r}")


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        ng = node(args.store, Path(work))
        serve(ng, datagrams("live", LIVE, live=True), 1.0)
        runs = []
        for run in range(args.runs + 1):  # the last one under cProfile
            batch = datagrams(f"r{run}", args.calls)
            if run == args.runs:
                profile = cProfile.Profile()
                profile.enable()
                serve(ng, batch, 2.0 + run)
                profile.disable()
                break
            started = time.process_time()
            serve(ng, batch, 2.0 + run)
            runs.append((time.process_time() - started) / args.calls * 1e6)
    calls: int = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
    return {
        "node": str(Path(lrkp_tsl.__file__).parents[1]),
        "store": args.store,
        "live": LIVE,
        "calls": args.calls,
        "cpu_us_per_call": round(min(runs), 1),
        "cpu_us_runs": [round(r, 1) for r in runs],
        "python_calls_per_call": round(calls / args.calls),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
