"""Run the real `lrkp-tsl` daemon in a lab namespace and talk to it like Kamailio does."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lrkp_lab.lab import Lab
from lrkp_lab.processes import terminate
from lrkp_tsl.dataplane.nft import TABLE

LRKP_TSL = [sys.executable, "-m", "lrkp_tsl.cli"]


class Node:
    """`lrkp-tsl run` in a lab host's namespace, stopped (and its output kept) at exit."""

    def __init__(self, lab: Lab, host: str, *args: str, state: Path | None = None) -> None:
        """`state`: the state directory of an earlier node, to restart it."""
        self.lab = lab
        self.host = host
        self.args = args
        self.state = state or Path(tempfile.mkdtemp(prefix="lrkp-state-"))
        self.log = self.state / f"node-{time.monotonic_ns()}.log"
        argv = [
            "ip",
            "netns",
            "exec",
            lab.ns(host),
            *LRKP_TSL,
            "run",
            "--state-dir",
            str(self.state),
            *args,
        ]
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, control: tuple[str, int], client: Controller, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited {self.proc.returncode}:\n{self.output()}")
            if client.command(b"P", control, wait=0.3) is not None:
                return
        raise AssertionError(f"node not answering P on {control}:\n{self.output()}")

    def wait_log(self, text: str, timeout: float, step: float = 0.01) -> float:
        """Seconds until `text` is in the node's log; fails at once, with the log, when the
        node exits without having logged it."""
        started = time.monotonic()
        while True:
            exited = self.proc.poll() is not None  # before the read: it sees the last lines
            output = self.output()
            if text in output:
                return time.monotonic() - started
            assert not exited, f"node exited {self.proc.returncode}, {text!r} not logged:\n{output}"
            assert time.monotonic() - started < timeout, f"{text!r} not logged:\n{output}"
            time.sleep(step)

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        terminate(self.proc, sig, timeout, reap=None)
        self._log_file.close()
        return self.proc.returncode

    def restart(self, sig: int = signal.SIGTERM) -> Node:
        """Stop this node with `sig` and start a new one with the same arguments and state."""
        self.stop(sig)
        return Node(self.lab, self.host, *self.args, state=self.state)

    def close(self) -> None:
        """Stop the node and clear what it left in its namespace, for the next test."""
        self.stop()
        self.lab.run(self.host, "nft", "delete", "table", "ip", TABLE, check=False)
        self.lab.run(self.host, "conntrack", "-F", check=False)


def clear_host(lab: Lab, host: str) -> None:
    """Remove what nodes left in `host`'s namespace when they stopped without flushing (a
    SIGKILL, a test of a restart): the node's nft table, the raw table's rules, and every
    conntrack entry; for the next test."""
    lab.run(host, "nft", "delete", "table", "ip", TABLE, check=False)
    lab.run(host, "iptables-nft", "-t", "raw", "-F", check=False)
    lab.run(host, "conntrack", "-F", check=False)


class Controller:
    """A controlling-layer stand-in: cookies, datagrams and replies as lrkproxy sends them."""

    def __init__(self, lab: Lab, host: str, ip: str) -> None:
        self.sock = lab.udp_socket(host, ip, 0)
        self.seq = 1000

    def cookie(self) -> bytes:
        self.seq += 1
        return b"%d_%d" % (os.getpid(), self.seq)

    def send(self, datagram: bytes, to: tuple[str, int]) -> None:
        self.sock.sendto(datagram, to)

    def receive(self, wait: float = 2.0) -> bytes | None:
        ready, _, _ = select.select([self.sock], [], [], wait)
        return self.sock.recv(4096) if ready else None

    def command(self, body: bytes, to: tuple[str, int], wait: float = 2.0) -> bytes | None:
        """Send `<cookie> body`; return the reply with the cookie stripped, or None."""
        cookie = self.cookie()
        self.send(cookie + b" " + body, to)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            reply = self.receive(left)
            if reply is None:
                return None
            if reply.startswith(cookie + b" "):
                return reply[len(cookie) + 1 :]
        return None

    def close(self) -> None:
        self.sock.close()


def set_command(
    verb: str,
    src: str,
    dst: str,
    snat: str,
    dnat: str,
    sport: int,
    dport: int,
    snatport: int,
    dnatport: int,
    call_id: str,
    timeout: int = 60,
) -> bytes:
    """An `S`/`D` body exactly as lrkproxy formats it (fields, single spaces, trailing space)."""
    return (
        f"{verb} {src} {dst} {snat} {dnat} {sport} {dport} {snatport} {dnatport} "
        f"{timeout} {call_id} "
    ).encode()
