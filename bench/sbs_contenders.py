"""The side-by-side benchmark's contenders: what relays A's streams to B, set up fresh per window.

Route and Nat are kernel state only; Lrkp, LrkpNat and Rtpengine are daemons on the relay core
(a Daemon: started, driven through a control client script, stopped), so they share that code.
LrkpNg is lrkp-tsl serving rtpengine's ng protocol (`--ng`), driven by the very client and
calls rtpengine gets, for the call-rate phase (`ngcps`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from sbs_lab import (
    A_IP,
    A_PORT,
    B_IP,
    B_PORT,
    GEN_CPU,
    HERE,
    NAT_SDP_IP,
    RELAY_CPU,
    RELAY_IP,
    RELAY_IP2,
    REPO,
    Topo,
    sh,
)

# After sbs_lab, which puts the repository on sys.path (bench/ scripts run from anywhere).
from lrkp_lab.ngrelay import node_serves_ng
from lrkp_lab.processes import terminate


class Contender:
    name = "?"

    def __init__(self, topo: Topo, n: int, work: Path) -> None:
        self.topo, self.n, self.work = topo, n, work
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def up(self) -> None:
        """Fresh state, calls set up."""

    def down(self) -> None:
        """Everything this contender left, gone."""

    def target(self) -> tuple[str, dict[str, Any]]:
        """Where A sends, and how destination ports go per stream."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc)
        self.proc = None


class Route(Contender):
    name = "route"

    def target(self) -> tuple[str, dict[str, Any]]:
        return B_IP, {"dport": B_PORT, "dstep": 2}


def natmap(n: int) -> str:
    """The kernel relay design by hand (research/stack.md §6): call i, both legs."""
    dn, sn = [], []
    for i in range(n):
        pa, pb = 20000 + 4 * i, 20002 + 4 * i
        dn += [f"{pa} : {B_IP} . {B_PORT + 2 * i}", f"{pb} : {A_IP} . {A_PORT + 2 * i}"]
        sn += [f"{pa} : {RELAY_IP} . {pb}", f"{pb} : {RELAY_IP} . {pa}"]
    return f"""table ip bench_relay {{
  map dnat_s {{ type inet_service : ipv4_addr . inet_service; elements = {{ {", ".join(dn)} }} }}
  map snat_s {{ type inet_service : ipv4_addr . inet_service; elements = {{ {", ".join(sn)} }} }}
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr {RELAY_IP} dnat ip to udp dport map @dnat_s
  }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    ct status dnat meta l4proto udp snat ip to ct original proto-dst map @snat_s
  }}
}}
"""


class Nat(Contender):
    name = "nat"

    def up(self) -> None:
        self.topo.conntrack_flush()
        self.topo.nft(self.topo.r, natmap(self.n))

    def down(self) -> None:
        self.topo.nft(self.topo.r, args=["delete", "table", "ip", "bench_relay"], check=False)
        self.topo.conntrack_flush()

    def target(self) -> tuple[str, dict[str, Any]]:
        return RELAY_IP, {"dport": 20000, "dstep": 4}


class Daemon(Contender):
    """A relay process pinned to the relay core, its calls set up by a client script run in
    the relay namespace on the generator's core (one JSON line out)."""

    client_script = "?"
    log: IO[str]

    def argv(self) -> list[str]:
        """The daemon's command line (it runs under taskset on the relay core)."""
        raise NotImplementedError

    def log_name(self) -> str:
        raise NotImplementedError

    def ready(self) -> None:
        """Return once the daemon serves its control port."""

    def calls_args(self) -> list[str]:
        """The client's arguments after `calls N` that set up this contender's n calls."""
        raise NotImplementedError

    def spawn(self, cwd: Path | None = None) -> None:
        self.log = (self.work / self.log_name()).open("a")
        argv = self.topo.x(self.topo.r, "taskset", "-c", str(RELAY_CPU), *self.argv())
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd)
        self.ready()

    def start(self) -> None:
        self.spawn()

    def client(self, *args: str, timeout: float = 600) -> dict[str, Any]:
        script = str(HERE / self.client_script)
        argv = self.topo.x(self.topo.r, "taskset", "-c", str(GEN_CPU), sys.executable, script)
        result: dict[str, Any] = json.loads(sh([*argv, *args], timeout=timeout))
        return result

    def up(self) -> None:
        self.start()
        if self.n:
            self.client("calls", str(self.n), *self.calls_args())

    def down(self) -> None:
        self.stop()
        self.log.close()


class Lrkp(Daemon):
    """lrkp-tsl, pinned to the relay core, calls set up over its control port."""

    name = "lrkp"
    client_script = "ctlclient.py"
    sdp_ip = A_IP
    ports = "20000-29999"

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "lrkp_tsl.cli", "run",
            "--state-dir", str(self.state),
            "--control", "udp:127.0.0.1:22333",
            "--internal-ip", RELAY_IP,
            "--external-ip", RELAY_IP2,
            "--ports", self.ports,
            "--idle-timeout", "3600",
            "--flush-on-exit",
            "--log-level", "warning",
        ]  # fmt: skip

    def log_name(self) -> str:
        return f"lrkp-{self.name}.log"

    def ready(self) -> None:
        self.client("ping", "0", timeout=30)

    def start(self) -> None:
        self.topo.conntrack_flush()
        self.state = Path(tempfile.mkdtemp(prefix="lrkp-bench-", dir=self.work))
        self.spawn(cwd=REPO)

    def calls_args(self) -> list[str]:
        return [
            "--a", f"{A_IP}:{A_PORT}",
            "--b", f"{B_IP}:{B_PORT}",
            "--relay", RELAY_IP,
            "--caller-sdp", self.sdp_ip,
        ]  # fmt: skip

    def down(self) -> None:
        super().down()
        self.topo.nft(self.topo.r, args=["delete", "table", "ip", "lrkp"], check=False)
        self.topo.conntrack_flush()
        shutil.rmtree(self.state, ignore_errors=True)

    def target(self) -> tuple[str, dict[str, Any]]:
        return RELAY_IP, {"dport": 20002, "dstep": 4}


class LrkpNat(Lrkp):
    name = "lrkp_nat"
    sdp_ip = NAT_SDP_IP


NG_LISTEN = "127.0.0.1:2223"  # rtpengine's ng socket in the benchmark, and lrkp-tsl's


class LrkpNg(Lrkp):
    """lrkp-tsl with its ng socket where rtpengine's is, driven by ngclient.py: the same
    offers, answers and deletes as rtpengine, from the same client."""

    name = "lrkp_ng"
    client_script = "ngclient.py"

    @staticmethod
    def missing() -> str | None:
        """Why this checkout's node cannot serve ng, or None when it can."""
        if node_serves_ng():
            return None
        return "`lrkp-tsl run` has no --ng yet (issue 20's engine wiring)"

    def argv(self) -> list[str]:
        return [*super().argv(), "--ng", f"udp:{NG_LISTEN}"]

    def log_name(self) -> str:
        return "lrkp-ng.log"

    def ready(self) -> None:
        self.client("ping", "0", timeout=30)


class Rtpengine(Daemon):
    name = "rtpengine"
    client_script = "ngclient.py"
    ports = (20000, 29999)

    def argv(self) -> list[str]:
        threads = os.environ.get("RTPENGINE_THREADS", str(os.cpu_count()))
        return [
            "rtpengine",
            "--config-file=none",
            "--foreground",
            "--log-stderr",
            "--log-level=4",
            "--table=-1",
            f"--interface={RELAY_IP}",
            f"--listen-ng={NG_LISTEN}",
            f"--port-min={self.ports[0]}",
            f"--port-max={self.ports[1]}",
            f"--num-threads={threads}",
            "--delete-delay=0",
            "--timeout=600",
        ]

    def log_name(self) -> str:
        return "rtpengine.log"

    def ready(self) -> None:
        assert self.proc is not None
        for _ in range(200):
            if NG_LISTEN in sh(self.topo.x(self.topo.r, "ss", "-uln"), check=False):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"rtpengine did not open its ng port: see {self.log.name}")

    def portfile(self) -> Path:
        return self.work / "rtpengine-ports.txt"

    def calls_args(self) -> list[str]:
        return [str(self.portfile()), "--a", f"{A_IP}:{A_PORT}", "--b", f"{B_IP}:{B_PORT}"]

    def target(self) -> tuple[str, dict[str, Any]]:
        return RELAY_IP, {"portfile": self.portfile()}


REDIS_PORT = 26380  # in the relay namespace's loopback; not a distribution's 6379


class RtpengineRedis(Rtpengine):
    """rtpengine writing each call to Redis (`--redis`), which is how it keeps calls over a
    restart: the guarantee lrkp-tsl gives by committing each command to SQLite before its
    reply. redis-server runs in the relay namespace, on the relay core, persistence off (a
    write reaches Redis's memory, as lrkp-tsl's reaches SQLite's WAL without fsync)."""

    name = "rtpengine_redis"
    redis: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [*super().argv(), f"--redis=127.0.0.1:{REDIS_PORT}/1"]

    def log_name(self) -> str:
        return "rtpengine-redis.log"

    def start(self) -> None:
        redis_dir = Path(tempfile.mkdtemp(prefix="redis-", dir=self.work))
        argv = self.topo.x(
            self.topo.r, "taskset", "-c", str(RELAY_CPU), "redis-server",
            "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--dir", str(redis_dir),
        )  # fmt: skip
        log = (self.work / "redis.log").open("a")
        self.redis = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        for _ in range(100):
            if f"127.0.0.1:{REDIS_PORT}" in sh(self.topo.x(self.topo.r, "ss", "-tln"), check=False):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not listen: see redis.log")
        super().start()

    def down(self) -> None:
        super().down()
        if self.redis is not None:
            terminate(self.redis)
            self.redis = None


KINDS: dict[str, type[Contender]] = {
    "route": Route,
    "nat": Nat,
    "lrkp": Lrkp,
    "lrkp_nat": LrkpNat,
    "rtpengine": Rtpengine,
}
