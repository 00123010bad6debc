"""The node needs no capability beyond what packaging/lrkp-tsl.service leaves it.

The unit runs the node as root with CapabilityBoundingSet= limited; here the node runs in
the lab under the same bounding set (setpriv, which limits it exactly as systemd does on
exec) and must start (sysctls, table, NFQUEUE rule through iptables-nft, conntrack events),
latch a caller behind NAT from its first packet, relay both ways and delete the call. In a
pair, the drop-in packaging/lrkp-tsl.service.d/pair.conf adds what reaching Debian's Redis
socket needs, and no more.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lrkp_lab import node as daemon
from lrkp_lab.calls import KAMAILIO_IP, NODE_ARGS, Call, burst, running_node
from lrkp_lab.lab import INTERNAL_IP, Lab
from lrkp_lab.node import Controller
from lrkp_lab.parties import Peers
from lrkp_lab.redis import RedisServer
from lrkp_tsl.dataplane.sysctl import REQUIRED
from tests.unit.test_systemd_unit import drop_in, unit

# Capability numbers (linux/capability.h) of those a unit might name.
CAP_NUMBERS = {"net_bind_service": 10, "net_admin": 12, "net_raw": 13, "sys_admin": 21}


def bounding_set() -> list[str]:
    caps = unit()["Service"]["CapabilityBoundingSet"].split()
    assert caps and all(cap.startswith("CAP_") for cap in caps), caps
    return [cap.removeprefix("CAP_").lower() for cap in caps]


@pytest.fixture
def limited(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    caps = bounding_set()
    monkeypatch.setattr(
        daemon,
        "LRKP_TSL",
        [
            "setpriv",
            "--bounding-set=-all," + ",".join(f"+{c}" for c in caps),
            "--no-new-privs",
            sys.executable,
            "-m",
            "lrkp_tsl.cli",
        ],
    )
    yield caps


def test_the_node_works_with_only_the_units_capabilities(
    lab: Lab, limited: list[str], peers: Peers
) -> None:
    # The node must write each sysctl it needs itself (the namespace outlives other tests).
    for name, (wanted, _why) in REQUIRED.items():
        assert wanted == "1", name
        lab.run("relay", "sysctl", "-qw", f"{name}=0")
    lab.run("relay", "sh", "-c", "echo > /proc/sys/net/ipv4/ip_local_reserved_ports")
    with running_node(lab, *NODE_ARGS) as node:
        status = lab.run("relay", "cat", f"/proc/{node.proc.pid}/status").stdout
        bounding = next(line for line in status.splitlines() if line.startswith("CapBnd:"))
        assert int(bounding.split()[1], 16) == sum(1 << CAP_NUMBERS[c] for c in limited)
        kamailio = Controller(lab, "sip", KAMAILIO_IP)
        try:
            caller, callee = peers("c", 4960), peers("b", 6960)  # the caller is behind NAT
            call = Call(kamailio, caller, callee, 21200, "caps@lab")
            burst(caller, call.caller_relay, callee, call.callee_relay, 5, b"A")
            burst(callee, call.callee_relay, caller, call.caller_relay, 5, b"B")
            call.delete(kamailio)
            caller.send(call.caller_relay, b"after")
            callee.expect_nothing()
        finally:
            kamailio.close()
        log = node.output()
        for name, (wanted, _why) in REQUIRED.items():
            assert f"sysctl {name}={wanted} (was" in log
        assert "[caps@lab] learned" in log
        assert "reserved ports 20000-21999 from automatic port allocation" in log
        assert "Operation not permitted" not in log and "Traceback" not in log


def test_the_pair_drop_in_gives_the_node_debians_redis_socket(lab: Lab) -> None:
    """Debian's redis-server socket is redis:redis, mode 770 (examples/redis-pair.conf). Under
    the unit's bounding set root has no CAP_DAC_OVERRIDE: connecting is refused unless the
    process holds the group the pair drop-in adds (SupplementaryGroups=)."""
    groups = drop_in()["Service"]["SupplementaryGroups"].split()
    assert groups == ["redis"]
    try:
        redis_user = pwd.getpwnam("redis")
    except KeyError:
        pytest.fail("no user redis: Debian's redis-server package creates it (install-system-deps)")
    config = {"unixsocketperm": "770"}
    with RedisServer(lab, "relay", str(INTERNAL_IP), config=config) as server:
        os.chown(server.socket, redis_user.pw_uid, redis_user.pw_gid)
        assert stat.S_IMODE(server.socket.stat().st_mode) == 0o770
        ping = (
            "import redis; "
            f"redis.Redis(unix_socket_path={str(server.socket)!r}, socket_timeout=2).ping()"
        )
        caps = ",".join(f"+{c}" for c in bounding_set())
        unit_like = ["setpriv", f"--bounding-set=-all,{caps}", "--no-new-privs"]
        refused = subprocess.run(
            [*unit_like, sys.executable, "-c", ping], capture_output=True, text=True, timeout=30
        )
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
        with_group = [*unit_like, f"--groups={grp.getgrnam(groups[0]).gr_gid}"]
        allowed = subprocess.run(
            [*with_group, sys.executable, "-c", ping], capture_output=True, text=True, timeout=30
        )
        assert allowed.returncode == 0, allowed.stderr
