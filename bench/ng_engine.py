"""What an ng call costs the node's Python alone: offer + answer + delete through the ng
front-end and the engine, without sockets, with a kernel that accepts every change and
holds nothing (`NullKernel`), and the real SQLite store or none (`NullStore`).

The datagrams are bench/ngclient.py's (`cps`), on top of 1,000 live calls. Prints the CPU
per call (the minimum of --runs runs of --calls calls: other processes only ever add to
it) and the Python function calls per call (cProfile's count: the same on a busy machine
as on an idle one, so two trees compare exactly). What it leaves out, and the daemon pays
on top: the kernel's nf_tables and conntrack work, the event loop, the sockets
(docs/ng-integration.md, section 6).

    .venv/bin/python bench/ng_engine.py [--store none|sqlite] [--calls 2000] [--runs 4]
    PYTHONPATH=OTHER_TREE .venv/bin/python bench/ng_engine.py   # another tree's node
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # after PYTHONPATH: another tree's node comes first

from ngclient import bencode, sdp  # noqa: E402

import lrkp_tsl  # noqa: E402
from lrkp_tsl.admission import NodeLimits  # noqa: E402
from lrkp_tsl.engine import Engine, Settings  # noqa: E402
from lrkp_tsl.errors import KernelError  # noqa: E402
from lrkp_tsl.frontends.lrkproxy import LrkproxyFrontEnd  # noqa: E402
from lrkp_tsl.frontends.ng import NgFrontEnd  # noqa: E402
from lrkp_tsl.kernel import (  # noqa: E402
    Counters,
    KernelChange,
    KernelState,
    KernelView,
    Repair,
    StreamKey,
)
from lrkp_tsl.latching import Policy  # noqa: E402
from lrkp_tsl.media import Endpoint, InstalledFlow, PortRange  # noqa: E402
from lrkp_tsl.ng.callmodel import Interfaces  # noqa: E402
from lrkp_tsl.protocol import NodeConfig  # noqa: E402
from lrkp_tsl.records import Store, StoredCall  # noqa: E402
from lrkp_tsl.session import Call  # noqa: E402
from lrkp_tsl.store import SqliteStore  # noqa: E402

KAMAILIO = (("10.0.0.5", 5060), "10.0.0.5:5060")
LIVE = 1000
RELAY = IPv4Address("10.0.0.10")
PORTS = PortRange(10000, 59999)


class NullKernel:
    """Takes every change, holds nothing, finds no conntrack entry: the kernel's own time
    is measured elsewhere (docs/ng-integration.md, section 6)."""

    def change(
        self, call_id: str, before: KernelView, after: KernelView,
        displace: Iterable[StreamKey] = (),
    ) -> None:  # fmt: skip
        pass

    def change_many(self, changes: Sequence[KernelChange]) -> list[KernelError | None]:
        return [None] * len(changes)

    def repair(self, calls: Sequence[Repair]) -> list[KernelError | None]:
        return [None] * len(calls)

    def install(self, views: Iterable[tuple[str, KernelView]]) -> None:
        pass

    def remove(self, flows: Iterable[InstalledFlow], learning: Iterable[Endpoint]) -> None:
        pass

    def forget(self, keys: Iterable[StreamKey]) -> None:
        pass

    def alive(self, keys: Iterable[StreamKey]) -> Mapping[StreamKey, float]:
        return {}

    def counters(self, keys: Iterable[StreamKey]) -> Mapping[StreamKey, Counters]:
        return {}

    def streams(
        self, keys: Iterable[StreamKey]
    ) -> Mapping[StreamKey, tuple[StreamKey, Counters] | None]:
        return {}

    def is_seen(self, sender: Endpoint, relay: Endpoint) -> bool:
        return False

    def state(self) -> KernelState:
        return KernelState((), frozenset())


class NullStore:
    """Writes nothing: the Python of a command without the store's."""

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        yield

    def put(self, call: Call, quiet_since: float | None) -> None:
        pass

    def delete(self, call_id: str) -> None:
        pass

    def set_quiet(self, call_id: str, quiet_since: float | None) -> None:
        pass

    def load(self) -> list[StoredCall]:
        return []


def node(store: str, work: Path) -> NgFrontEnd:
    """Both front-ends on one engine, as the daemon builds them."""
    state: Store = SqliteStore(work / "state.db") if store == "sqlite" else NullStore()
    routed = (IPv4Network("10.98.0.0/16"),)  # the parties are reachable: no latching
    engine = Engine(Settings(3600.0, 3600.0, Policy.AUTO, routed, PORTS), NullKernel(), state)
    LrkproxyFrontEnd(
        engine,
        NodeConfig(PORTS.start, PORTS.end, PORTS.start, str(RELAY), str(RELAY)),
        NodeLimits(frozenset({RELAY}), PORTS),
    )
    return NgFrontEnd(engine, Interfaces({"internal": RELAY}))


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
    parser.add_argument("--store", choices=["none", "sqlite"], default="none")
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
