"""An active/standby pair in the lab: keepalived (VRRPv3) on `relay` and `relay2`.

The two nodes share two virtual IPs, one per network, which move together (one VRRP sync
group): whoever holds them is the active relay. Reused by the tests and the benchmarks.

    internal network: relay 10.201.1.1, relay2 10.201.1.2, VIP 10.201.1.100 (int0, VRID 51)
    external network: relay 10.201.2.1, relay2 10.201.2.2, VIP 10.201.2.100 (ext0, VRID 52)

Both nodes start as BACKUP with `nopreempt` (a returning node never takes the VIPs back by
itself), so whoever comes up first becomes master after its down timer (3 x advert_int +
skew, ~0.36 s). `Pair.start` therefore starts `relay` first and waits until it holds the
VIPs before starting `relay2`. VRRP adverts are multicast (224.0.0.18) across the lab's
bridges; parties find the VIPs by ARP, and keepalived's gratuitous ARP on takeover moves
their neighbour entries to the new master.

The failure scenario (issue 12) is `Pair.crash`: SIGKILL the node's keepalived (and any
other process given, e.g. its relay daemon), then take its links down. `Pair.recover` brings
it back: stale VIPs removed (a SIGKILLed keepalived leaves them assigned), links up,
keepalived started again; with nopreempt it stays BACKUP.

    python -m lrkp_lab.pairlab takeover --runs 5     # measure takeover times (root)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from lrkp_lab.lab import EXTERNAL_IP, INTERNAL_IP, Lab

INTERNAL_VIP = IPv4Address("10.201.1.100")
EXTERNAL_VIP = IPv4Address("10.201.2.100")
VIPS = (INTERNAL_VIP, EXTERNAL_VIP)
VIP_PREFIX = 24

NODES = ("relay", "relay2")
PRIORITIES = {"relay": 150, "relay2": 100}
NODE_LINKS = ("int0", "ext0")
ADVERT_INT = 0.1  # seconds; VRRPv3 allows centiseconds


@dataclass(frozen=True)
class VrrpInstance:
    name: str
    interface: str
    router_id: int  # virtual_router_id, unique per network
    vip: IPv4Address


INSTANCES = (
    VrrpInstance("VI_INT", "int0", 51, INTERNAL_VIP),
    VrrpInstance("VI_EXT", "ext0", 52, EXTERNAL_VIP),
)
SYNC_GROUP = "LRKP"

# How long SIGTERM may take: keepalived 2.2.7 needs ~1.0 s to exit (it sends a priority-0
# advert, drops the VIPs, then waits for its VRRP child); the peer takes over meanwhile.
TERM_WAIT = 5.0
START_WAIT = 5.0  # first master: the down timer (~0.36 s) plus process start-up


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def _check_script(path: Path | None) -> None:
    if path is not None and any(c.isspace() or c == '"' for c in str(path)):
        raise ValueError(f"notify script path must not contain spaces or quotes: {path}")


def keepalived_config(
    host: str,
    *,
    notify_master: Path | None = None,
    notify_backup: Path | None = None,
    advert_int: float = ADVERT_INT,
) -> str:
    """The keepalived.conf of `host` (relay or relay2) in the pair.

    Notify scripts are run as `<script> <host> master` / `<script> <host> backup`, once per
    transition of the whole sync group, after the VIPs are added (resp. removed); backup
    also runs at start-up. With `enable_script_security`, keepalived refuses a script that
    it or any directory above it is writable by anyone but root (pytest's tmp_path is fine).

    The gratuitous ARP settings are examples/keepalived.conf's, including the two that make
    a healed split brain move the neighbours back to the winner whichever node hears the
    other first (`vrrp_higher_prio_send_advert`, `vrrp_garp_lower_prio_repeat`; without
    them the lab measured 7 of 12 heals leaving the neighbours on the loser).
    """
    if host not in PRIORITIES:
        raise KeyError(f"pair has no node {host!r} (one of {', '.join(NODES)})")
    _check_script(notify_master)
    _check_script(notify_backup)
    notify = ""
    if notify_master is not None:
        notify += f'\tnotify_master "{notify_master} {host} master"\n'
    if notify_backup is not None:
        notify += f'\tnotify_backup "{notify_backup} {host} backup"\n'
    instances = "".join(
        f"""
vrrp_instance {instance.name} {{
	state BACKUP
	nopreempt
	interface {instance.interface}
	virtual_router_id {instance.router_id}
	priority {PRIORITIES[host]}
	advert_int {advert_int}
	virtual_ipaddress {{
		{instance.vip}/{VIP_PREFIX} dev {instance.interface}
	}}
}}
"""
        for instance in INSTANCES
    )
    return f"""# lrkp-tsl pair lab: {host}
global_defs {{
	router_id {host}
	script_user root
	enable_script_security
	vrrp_version 3
	vrrp_garp_master_delay 1
	vrrp_garp_master_repeat 3
	vrrp_higher_prio_send_advert true
	vrrp_garp_lower_prio_repeat 3
	vrrp_garp_lower_prio_delay 1
}}

vrrp_sync_group {SYNC_GROUP} {{
	group {{
		{" ".join(instance.name for instance in INSTANCES)}
	}}
{notify}}}
{instances}"""


KEEPALIVED_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "keepalived.conf"


def example_substitutions(host: str) -> dict[str, str]:
    """What the lab fills into examples/keepalived.conf's placeholders, and nothing else:
    the node's name and priority (the file's "per node" values), interfaces and VIPs."""
    return {
        "NODE_NAME": host,
        "NODE_PRIORITY": str(PRIORITIES[host]),
        "INT_IF": INSTANCES[0].interface,
        "EXT_IF": INSTANCES[1].interface,
        "INT_VIP": f"{INTERNAL_VIP}/{VIP_PREFIX}",
        "EXT_VIP": f"{EXTERNAL_VIP}/{VIP_PREFIX}",
    }


def example_config(host: str) -> str:
    """examples/keepalived.conf as shipped, its placeholders (whole words) filled in."""
    text = KEEPALIVED_EXAMPLE.read_text()
    for placeholder, value in example_substitutions(host).items():
        text, count = re.subn(rf"\b{placeholder}\b", value, text)
        if count == 0:
            raise ValueError(f"{KEEPALIVED_EXAMPLE} has no {placeholder}: update the lab")
    return text


def _alive(pid: int) -> bool:
    """Running (a zombie whose parent has not reaped it is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Keepalived:
    """keepalived (VRRP only) for one node of the pair, in that node's namespace.

    Config, pid files and the log (`log_path`) live in `directory` (a temp dir by default,
    removed by `cleanup`). `start` may be called again after `stop`: the log is appended.
    """

    def __init__(
        self,
        lab: Lab,
        host: str,
        *,
        notify_master: Path | None = None,
        notify_backup: Path | None = None,
        advert_int: float = ADVERT_INT,
        directory: Path | None = None,
        config: str | None = None,
    ) -> None:
        """`config`: this text instead of the lab's own (`example_config`, for instance)."""
        self.lab = lab
        self.host = host
        self.config = config or keepalived_config(
            host, notify_master=notify_master, notify_backup=notify_backup, advert_int=advert_int
        )
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix=f"lrkp-ka-{host}-"))
        self.config_path = self.directory / f"keepalived-{host}.conf"
        self.pid_path = self.directory / f"keepalived-{host}.pid"
        self.vrrp_pid_path = self.directory / f"keepalived-{host}-vrrp.pid"
        self.log_path = self.directory / f"keepalived-{host}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # where the current run's output begins in the log

    def start(self) -> Keepalived:
        if self.running:
            raise RuntimeError(f"keepalived on {self.host} is already running")
        self.config_path.write_text(self.config)
        for stale in (self.pid_path, self.vrrp_pid_path):
            stale.unlink(missing_ok=True)
        argv = [
            "ip", "netns", "exec", self.lab.ns(self.host),
            "keepalived", "-n", "-l", "-D", "--vrrp",
            "-f", str(self.config_path), "-p", str(self.pid_path), "-r", str(self.vrrp_pid_path),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()
            log.write(f"=== start {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            # Its own process group (`ip netns exec` execs keepalived, so the group leader is
            # keepalived's parent process), so that stop(kill=True) reaches its VRRP child too.
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _pids(self) -> list[int]:
        """The parent and, if its pid file names one, the VRRP child."""
        pids = []
        if self.process is not None:
            pids.append(self.process.pid)
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(self.vrrp_pid_path.read_text().split()[0]))
        return pids

    def stop(self, kill: bool = False, timeout: float = TERM_WAIT) -> float:
        """Stop keepalived; returns the seconds until every one of its processes was gone.

        kill: SIGKILL the whole process group at once (a crash: the VIPs stay assigned, no
        priority-0 advert is sent). Otherwise SIGTERM and wait up to `timeout`, then SIGKILL.
        """
        process = self.process
        if process is None:
            return 0.0
        pids = self._pids()
        started = time.monotonic()
        if process.poll() is None or any(_alive(pid) for pid in pids[1:]):
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                for pid in pids[1:]:  # in case it left the group
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            else:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            deadline = started + (timeout if not kill else TERM_WAIT)
            while time.monotonic() < deadline:
                process.poll()
                if process.returncode is not None and not any(_alive(pid) for pid in pids[1:]):
                    break
                time.sleep(0.005)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                for pid in pids[1:]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                process.wait(TERM_WAIT)
        elapsed = time.monotonic() - started
        self.process = None
        return elapsed

    def log(self, current: bool = False) -> str:
        """The log (only the output of the latest `start`, if `current`)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start if current else 0)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Kill it if running; remove the directory if it was ours."""
        self.stop(kill=True)
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def addresses(lab: Lab, host: str) -> set[IPv4Address]:
    """The IPv4 addresses of `host` on interfaces that are up (`ip -n NS -4 addr show up`)."""
    out = _ip("-n", lab.ns(host), "-4", "-o", "addr", "show", "up").stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            found.add(IPv4Address(fields[fields.index("inet") + 1].split("/")[0]))
    return found


def vip_holders(lab: Lab, vip: IPv4Address = INTERNAL_VIP) -> list[str]:
    """The pair nodes that have `vip` on an interface that is up (more than one: split brain)."""
    return [host for host in NODES if vip in addresses(lab, host)]


def vip_holder(lab: Lab, vip: IPv4Address = INTERNAL_VIP) -> str | None:
    """The node that holds `vip` (the internal VIP by default), None if neither does.

    Raises if both do: two nodes answering ARP for one address is a failure, not an answer.
    """
    holders = vip_holders(lab, vip)
    if len(holders) > 1:
        raise RuntimeError(f"split brain: {', '.join(holders)} all hold {vip}")
    return holders[0] if holders else None


def holds_all(lab: Lab, host: str, vips: Iterable[IPv4Address] = VIPS) -> bool:
    return set(vips) <= addresses(lab, host)


def links_down(lab: Lab, host: str) -> None:
    for ifname in NODE_LINKS:
        _ip("-n", lab.ns(host), "link", "set", ifname, "down")


def links_up(lab: Lab, host: str) -> None:
    for ifname in NODE_LINKS:
        _ip("-n", lab.ns(host), "link", "set", ifname, "up")


SPLIT_TABLE = "lrkp_test_split"
RELAY_ADDRESSES = f"{INTERNAL_IP}, {EXTERNAL_IP}"  # relay's own, as relay2 sees them


def split(lab: Lab, vrrp_only: bool = False) -> None:
    """Split brain: in relay2, drop everything between it and relay (VRRP adverts both ways,
    Redis, ...), or only VRRP. Gratuitous ARPs still reach the networks (they are not IP).
    `heal_split` undoes it."""
    what = "ip protocol vrrp" if vrrp_only else ""
    lab.run("relay2", "nft", f"table inet {SPLIT_TABLE} {{ chain i {{ type filter hook input "
            f"priority -400; ip saddr {{ {RELAY_ADDRESSES} }} {what} drop; }}; chain o {{ type "
            f"filter hook output priority -400; ip daddr {{ {RELAY_ADDRESSES} }} {what} drop; "
            f"ip protocol vrrp drop; }}; }}")  # fmt: skip


def heal_split(lab: Lab) -> None:
    """Both directions, as when a link comes back: which node hears the other first is then
    a race (the reason for `vrrp_higher_prio_send_advert`, keepalived_config).

    The output chain goes first, in the same transaction: the kernel unregisters the two
    hooks one after the other, and with the input hook first relay2 could hear relay and
    answer while its sends were still dropped (seen under load: EPERM on that very advert),
    a one-way window no returning link has."""
    lab.run("relay2", "nft", f"delete chain inet {SPLIT_TABLE} o; delete table inet "
            f"{SPLIT_TABLE}", check=False)  # fmt: skip


def remove_vips(lab: Lab, host: str) -> None:
    """Delete the VIPs from `host` if assigned (a SIGKILLed keepalived leaves them)."""
    for instance in INSTANCES:
        _ip(
            "-n", lab.ns(host), "addr", "del", f"{instance.vip}/{VIP_PREFIX}",
            "dev", instance.interface, check=False,
        )  # fmt: skip


def mac(lab: Lab, host: str, ifname: str) -> str:
    out = _ip("-n", lab.ns(host), "-j", "link", "show", ifname).stdout
    return str(json.loads(out)[0]["address"])


def neighbour_mac(lab: Lab, host: str, ip: IPv4Address) -> str | None:
    """The link-layer address `host` has for `ip` in its neighbour table, if any."""
    out = _ip("-n", lab.ns(host), "-j", "-4", "neigh", "show", str(ip)).stdout
    for entry in json.loads(out or "[]"):
        if "lladdr" in entry:
            return str(entry["lladdr"])
    return None


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    words: tuple[int, ...] = struct.unpack(f"!{len(data) // 2}H", data)
    total = sum(words)
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(lab: Lab, host: str, ip: IPv4Address, timeout: float = 1.0) -> float | None:
    """One ICMP echo from `host` to `ip` (a raw socket in its namespace, no ping(8) needed);
    the round-trip time in seconds, or None if no reply came within `timeout`."""
    with lab.inside(host):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with sock:
        ident = int.from_bytes(os.urandom(2), "big")
        payload = os.urandom(16)
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        packet = struct.pack("!BBHHH", 8, 0, _icmp_checksum(header + payload), ident, 1)
        sent = time.monotonic()
        sock.sendto(packet + payload, (str(ip), 0))
        deadline = sent + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, (source, _) = sock.recvfrom(2048)
            body = data[(data[0] & 0x0F) * 4 :]
            if len(body) < 8 or source != str(ip):
                continue
            kind, _, _, got_ident, seq = struct.unpack_from("!BBHHH", body)
            if kind == 0 and got_ident == ident and seq == 1 and body[8:] == payload:
                return time.monotonic() - sent
    return None


class Pair:
    """keepalived on both nodes, `relay` master at start; cleans up everything on close.

    `close` (also on exceptions, as a context manager) kills keepalived on both nodes, brings
    their links up and deletes the VIPs, so the shared lab is as it was.
    """

    def __init__(
        self,
        lab: Lab,
        *,
        notify_master: Path | None = None,
        notify_backup: Path | None = None,
        advert_int: float = ADVERT_INT,
        example: bool = False,
    ) -> None:
        """`example`: run examples/keepalived.conf as shipped (`example_config`)."""
        self.lab = lab
        self.advert_int = advert_int
        self.keepalived = {
            host: Keepalived(
                lab,
                host,
                notify_master=notify_master,
                notify_backup=notify_backup,
                advert_int=advert_int,
                config=example_config(host) if example else None,
            )
            for host in NODES
        }

    def start(self, first: str = "relay", timeout: float = START_WAIT) -> Pair:
        """Start `first`, wait until it holds both VIPs, then start the other one as backup."""
        for host in NODES:
            remove_vips(self.lab, host)
        self.keepalived[first].start()
        self.wait_holder(first, timeout)
        (second,) = (host for host in NODES if host != first)
        self.keepalived[second].start()
        self.wait_log(second, "Entering BACKUP STATE", timeout)
        return self

    def wait_holder(self, host: str, timeout: float, poll: float = 0.01) -> float:
        """Wait until `host` holds both VIPs; returns time.monotonic() when first seen."""
        deadline = time.monotonic() + timeout
        while True:
            if holds_all(self.lab, host):
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{host} did not take both VIPs within {timeout} s; holders: "
                    f"{ {str(vip): vip_holders(self.lab, vip) for vip in VIPS} }\n" + self.logs()
                )
            time.sleep(poll)

    def wait_log(self, host: str, text: str, timeout: float) -> None:
        """Wait until `host`'s keepalived logs `text` (since its latest start)."""
        deadline = time.monotonic() + timeout
        while text not in self.keepalived[host].log(current=True):
            if time.monotonic() > deadline:
                raise TimeoutError(f"keepalived on {host} never logged {text!r}\n" + self.logs())
            time.sleep(0.01)

    def crash(self, host: str, pids: Sequence[int] = ()) -> float:
        """SIGKILL `host`'s keepalived (and `pids`), then take its links down.

        Returns time.monotonic() just before the first kill: the start of the outage.
        """
        started = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.keepalived[host].stop(kill=True)
        links_down(self.lab, host)
        return started

    def recover(self, host: str) -> None:
        """Bring a crashed node back as a rebooted one would be: no VIPs, links up, keepalived
        started (it stays BACKUP: nopreempt)."""
        remove_vips(self.lab, host)
        links_up(self.lab, host)
        self.keepalived[host].start()

    def logs(self) -> str:
        return "".join(
            f"--- keepalived {host} ({ka.log_path})\n{ka.log()[-4000:]}"
            for host, ka in self.keepalived.items()
        )

    def close(self) -> None:
        for host, ka in self.keepalived.items():
            ka.stop(kill=True)
            with contextlib.suppress(RuntimeError):
                links_up(self.lab, host)
            remove_vips(self.lab, host)
        for ka in self.keepalived.values():
            ka.cleanup()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Takeover:
    seconds: float  # crash -> relay2 holds both VIPs
    garp_seconds: float | None  # crash -> `a`'s neighbour entry for the VIP is relay2's MAC


def measure_takeover(lab: Lab, garp_wait: float = 1.0) -> Takeover:
    """One run: relay active, `a` has talked to the VIP, crash relay, time relay2's takeover."""
    with Pair(lab) as pair:
        pair.start()
        if ping(lab, "a", INTERNAL_VIP) is None:
            raise RuntimeError(f"a cannot ping {INTERNAL_VIP} before the takeover")
        crashed = pair.crash("relay")
        held = pair.wait_holder("relay2", 5.0)
        new_mac = mac(lab, "relay2", "int0")
        garp = None
        deadline = time.monotonic() + garp_wait
        while time.monotonic() < deadline:
            if neighbour_mac(lab, "a", INTERNAL_VIP) == new_mac:
                garp = time.monotonic() - crashed
                break
            time.sleep(0.01)
        return Takeover(held - crashed, garp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrkp_lab.pairlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    takeover = sub.add_parser("takeover", help="crash the active node N times, time takeovers")
    takeover.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("pairlab: network namespaces need root", file=sys.stderr)
        return 1
    if shutil.which("keepalived") is None:
        print("pairlab: keepalived is not installed", file=sys.stderr)
        return 1
    times, garps = [], []
    with Lab() as lab:
        for run in range(1, args.runs + 1):
            result = measure_takeover(lab)
            times.append(result.seconds)
            garp = "-" if result.garp_seconds is None else f"{result.garp_seconds * 1000:.0f} ms"
            if result.garp_seconds is not None:
                garps.append(result.garp_seconds)
            print(f"run {run}: takeover {result.seconds * 1000:.0f} ms, a's ARP moved {garp}")
    print(
        f"takeover p50 {statistics.median(times) * 1000:.0f} ms, "
        f"max {max(times) * 1000:.0f} ms over {len(times)} runs"
    )
    if garps:
        print(f"ARP moved  p50 {statistics.median(garps) * 1000:.0f} ms, max "
              f"{max(garps) * 1000:.0f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
