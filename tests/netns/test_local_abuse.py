"""Local abuse against the real node: unprivileged processes on the management socket, slow
clients on /metrics, and a clean stop after `lrkp-ctl sessions`.

The unprivileged processes run the system's Python as `nobody` (setpriv), with the standard
library only: nothing from the checkout, which `nobody` may not be able to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from lrkp_lab.calls import CONTROL, KAMAILIO_IP, NODE_ARGS, running_node
from lrkp_lab.lab import Lab
from lrkp_lab.node import Controller, Node
from lrkp_tsl.mgmt import MAX_PER_UID
from lrkp_tsl.scrape import MAX_CONNECTIONS as MAX_SCRAPES

CTL = (sys.executable, "-m", "lrkp_tsl.ctl")
SYSTEM_PYTHON = os.path.realpath(sys.executable)  # outside the checkout (the venv links it)
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")

# Holds up to HOLD connections to the abstract socket NAME, idle, for SECONDS; opens a new
# one for each the node closes. Prints what it managed as JSON.
HOLDER = r"""
import json, select, socket, sys, time
name, hold, seconds = "\0" + sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
poller, open_, connects, failed, closed = select.poll(), {}, 0, 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    while len(open_) < hold and time.monotonic() < end:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(name)
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            sock.close()
            break
        connects += 1
        open_[sock.fileno()] = sock
        poller.register(sock, select.POLLIN | select.POLLHUP)
    for fd, _event in poller.poll(10):
        poller.unregister(fd)
        open_.pop(fd).close()
        closed += 1
print(json.dumps({"connects": connects, "failed": failed, "closed_by_node": closed,
                  "held_at_end": len(open_)}))
"""


def ctl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.run("relay", *CTL, *args, check=False)


def node_pid(node: Node) -> int:
    return node.proc.pid  # `ip netns exec` executes the node in its own process


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class Sampler:
    """The node's descriptors and threads, and the round trip of `P`, every 20 ms."""

    def __init__(self, lab: Lab, node: Node) -> None:
        self.pid = node_pid(node)
        self.client = Controller(lab, "sip", KAMAILIO_IP)
        self.fds: list[int] = []
        self.threads: list[int] = []
        self.round_trips: list[float] = []
        self.unanswered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.fds.append(descriptors(self.pid))
            self.threads.append(threads(self.pid))
            started = time.monotonic()
            if self.client.command(b"P", CONTROL, wait=5.0) is not None:
                self.round_trips.append(time.monotonic() - started)
            else:
                self.unanswered += 1
            self._stop.wait(0.02)

    def summary(self) -> str:
        trips = sorted(self.round_trips) or [float("nan")]
        return (
            f"fds max {max(self.fds)}, threads max {max(self.threads)}, P round trip "
            f"p50 {trips[len(trips) // 2] * 1000:.2f} ms max {trips[-1] * 1000:.1f} ms "
            f"({len(trips)} answered, {self.unanswered} unanswered)"
        )


@pytest.fixture
def node(lab: Lab) -> Iterator[Node]:
    with running_node(lab, *NODE_ARGS) as running:
        yield running


# -- item 4: a clean stop logs no error -----------------------------------------------------


def test_a_stop_after_sessions_logs_no_error(lab: Lab) -> None:
    kamailio = Controller(lab, "sip", KAMAILIO_IP)
    node = Node(lab, "relay", *NODE_ARGS)
    try:
        for _round in range(2):
            node.wait_ready(CONTROL, kamailio)
            for command in ("sessions", "kernel", "ruleset", "sessions"):
                result = ctl(lab, command)
                assert result.returncode == 0, result.stderr
            assert node.stop(signal.SIGTERM) == 0
            log = node.output()
            assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
            node = node.restart()
    finally:
        kamailio.close()
        node.close()


# -- item 5: the management socket against unprivileged users -------------------------------


def start_holders(lab: Lab, count: int, hold: int, seconds: float) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                lab.ns("relay"),
                *AS_NOBODY,
                SYSTEM_PYTHON,
                "-c",
                HOLDER,
                "lrkp-tsl",
                str(hold),
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]


def test_unprivileged_users_cannot_exhaust_the_management_socket(lab: Lab, node: Node) -> None:
    pid = node_pid(node)
    baseline = descriptors(pid)
    logged = len(node.output())
    with Sampler(lab, node) as sampler:
        holders = start_holders(lab, count=4, hold=500, seconds=8.0)
        time.sleep(2.0)
        pings = [ctl(lab, "ping") for _ in range(3)]  # root, meanwhile
        results = [json.loads(h.communicate(timeout=60)[0] or "{}") for h in holders]
    print(f"4 nobody processes holding up to 500 connections each for 8 s: {results}")
    print(f"node during the abuse: {sampler.summary()}, baseline fds {baseline}; "
          f"log grew {len(node.output()) - logged} bytes")  # fmt: skip
    assert all(p.returncode == 0 for p in pings), [p.stderr for p in pings]
    assert sum(r["connects"] for r in results) > 1000  # the abuse happened
    assert sum(r["closed_by_node"] for r in results) > 1000  # answered and closed at once
    assert max(sampler.fds) <= baseline + 10
    assert sampler.unanswered == 0
    log = node.output()[logged:]
    assert "Traceback" not in log
    assert log.count("refused: only root") <= 5  # the rest are counted, not logged
    assert len(log) < 10_000
    assert "uid 65534" in log


def test_allowed_connections_are_capped_and_idle_ones_time_out(lab: Lab, node: Node) -> None:
    with lab.inside("relay"):
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
    try:
        for sock in idle:
            sock.settimeout(15.0)
            sock.connect("\0lrkp-tsl")
        # Over the cap of one user: answered `busy` at once and closed.
        busy = [json.loads(sock.recv(4096)) for sock in idle[MAX_PER_UID:]]
        assert all(reply["error"] == "busy" for reply in busy), busy
        # The idle ones are closed by the node after its read timeout.
        started = time.monotonic()
        closed = [sock.recv(4096) for sock in idle[:MAX_PER_UID]]
        assert closed == [b""] * MAX_PER_UID, closed
        waited = time.monotonic() - started
        print(f"{MAX_PER_UID} idle allowed connections closed by the node after {waited:.1f} s")
    finally:
        for sock in idle:
            sock.close()
    assert ctl(lab, "ping").returncode == 0
    assert f"refused: {MAX_PER_UID} open" in node.output()


def test_a_strangers_connection_is_closed_at_once_without_a_request(lab: Lab, node: Node) -> None:
    pid = node_pid(node)
    baseline = descriptors(pid)
    result = lab.run("relay", *AS_NOBODY, SYSTEM_PYTHON, "-c", HOLDER, "lrkp-tsl", "20", "2",
                     check=False)  # fmt: skip
    stats = json.loads(result.stdout)
    # Each one closed as soon as it was accepted, so the holder kept opening new ones.
    assert stats["connects"] > 200 and stats["closed_by_node"] >= stats["connects"] - 20, stats
    assert descriptors(pid) <= baseline + 1


# -- item 6: slow /metrics clients ------------------------------------------------------------

METRICS_PORT = 9734


def scrape_status(lab: Lab) -> bytes:
    with lab.inside("relay"):
        sock = socket.create_connection(("127.0.0.1", METRICS_PORT), timeout=10)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"lrkp_sessions" in body, data[:500]
    return head.split(b"\r\n")[0]


def test_half_sent_metrics_requests_time_out_and_hold_no_thread(lab: Lab) -> None:
    with running_node(lab, *NODE_ARGS, "--metrics-listen", f"127.0.0.1:{METRICS_PORT}") as node:
        pid = node_pid(node)
        assert scrape_status(lab).endswith(b" 200 OK")
        base_fds, base_threads = descriptors(pid), threads(pid)
        held = []
        try:
            with lab.inside("relay"):
                for _ in range(300):
                    sock = socket.create_connection(("127.0.0.1", METRICS_PORT), timeout=20)
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: lo")  # never finished
                    held.append(sock)
            time.sleep(0.5)
            fds, threads_now = descriptors(pid), threads(pid)
            answered = scrape_status(lab)  # meanwhile
            started = time.monotonic()
            for sock in held:
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(4096) == b""  # closed by the node
            released = time.monotonic() - started
        finally:
            for sock in held:
                sock.close()
        after = descriptors(pid)
        print(f"300 half-sent /metrics requests: node fds {base_fds} -> {fds} -> {after}, "
              f"threads {base_threads} -> {threads_now}; all closed {released:.1f} s after "
              f"the last was opened")  # fmt: skip
        assert answered.endswith(b" 200 OK")
        assert threads_now <= base_threads + 1
        assert fds <= base_fds + MAX_SCRAPES + 2
        assert after <= base_fds + 1
