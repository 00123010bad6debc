"""lrkproxy control client for the side-by-side benchmark: commands as Kamailio sends them.

Run inside the relay namespace by bench/sidebyside.py:

    ctlclient.py ping 0
        exit 0 once the node answers `P` (waits up to 20 s).
    ctlclient.py calls N --a IP:PORT --b IP:PORT --relay IP [--caller-sdp IP]
        N media calls. Call i: caller A:(PORT+2i) sends to RELAY:(20002+4i); callee
        B:(PORT+2i) receives from RELAY:(20000+4i). --caller-sdp puts another address in the
        caller's SDP field (a NAT'd caller: the node learns it from its first packet).
    ctlclient.py fill FROM TO --relays IP,IP
        live calls FROM..TO-1 in shared-port geometry (one relay port pair per call, relay IPs
        alternating: up to 64,512 calls), pipelined (WINDOW commands in flight).
    ctlclient.py cps COUNT --clients K --base I --relays IP,IP
        K processes, each COUNT `S`+`D` pairs back to back with one command in flight, on call
        slots from I up (never the filled ones): pairs/s and `S` -> `OK` latency.

Every command must be answered `OK` within 5 s, or the run aborts. One JSON line out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import time
from typing import Any

from clientkit import closed_loop, endpoint, run

CONTROL = ("127.0.0.1", 22333)
PORTS = (1024, 65535)
SLOTS_PER_IP = (PORTS[1] - PORTS[0] + 1) // 2
WINDOW = 64
CALLER = ("10.98.1.2", 4000)
CALLEE = ("10.98.2.2", 6000)


def body(verb: str, fields: tuple[str, str, str, str, int, int, int, int], call_id: str) -> bytes:
    src, dst, snat, dnat, sport, dport, snatport, dnatport = fields
    return (
        f"{verb} {src} {dst} {snat} {dnat} {sport} {dport} {snatport} {dnatport} 3600 {call_id} "
    ).encode()


def slot(index: int, relays: list[str], tag: str, verb: str = "S") -> bytes:
    """Call `index` in shared-port geometry (as bench/event_loop.py)."""
    ip = relays[index % len(relays)]
    port = PORTS[0] + 2 * (index // len(relays))
    if port + 1 > PORTS[1]:
        raise RuntimeError(f"call {index}: only {SLOTS_PER_IP * len(relays)} calls fit")
    fields = (CALLER[0], ip, ip, CALLEE[0], CALLER[1], port, port, CALLEE[1])
    return body(verb, fields, f"{tag}-{index}")


class Client:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.connect(CONTROL)
        self.seq = 0
        self.prefix = b"%d" % os.getpid()

    def cookie(self) -> bytes:
        self.seq += 1
        return self.prefix + b"_%d" % self.seq

    def one(self, command: bytes) -> float:
        """Send, wait for its `OK`: the round trip in seconds."""
        cookie = self.cookie()
        started = time.perf_counter()
        self.sock.send(cookie + b" " + command)
        while True:
            ready, _, _ = select.select([self.sock], [], [], 5.0)
            if not ready:
                raise RuntimeError(f"no reply to {command!r}")
            reply = self.sock.recv(4096)
            if reply.startswith(cookie + b" "):
                break
        if reply != cookie + b" " + command + b"OK":
            raise RuntimeError(f"{command!r} -> {reply!r}")
        return time.perf_counter() - started

    def pipelined(self, commands: list[bytes]) -> None:
        """All commands, WINDOW in flight; every one must be answered `OK`."""
        pending: dict[bytes, bytes] = {}
        it = iter(commands)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < WINDOW:
                command = next(it, None)
                if command is None:
                    exhausted = True
                    break
                cookie = self.cookie()
                pending[cookie] = command
                self.sock.send(cookie + b" " + command)
            if not pending:
                break
            ready, _, _ = select.select([self.sock], [], [], 5.0)
            if not ready:
                raise RuntimeError(f"{len(pending)} commands unanswered")
            reply = self.sock.recv(4096)
            cookie, _, rest = reply.partition(b" ")
            command = pending.pop(cookie, b"")
            if command and rest != command + b"OK":
                raise RuntimeError(f"{command!r} -> {rest!r}")


def ping(wait: float) -> bool:
    """True once the node answers `P` (it is up and serving)."""
    client = Client()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        cookie = client.cookie()
        client.sock.send(cookie + b" P")
        ready, _, _ = select.select([client.sock], [], [], 0.2)
        if ready:
            with contextlib.suppress(ConnectionRefusedError):
                if client.sock.recv(4096) == cookie + b" P PONG":
                    return True
        else:
            continue
        time.sleep(0.1)
    raise RuntimeError("the node did not answer P")


def media_calls(n: int, a: tuple[str, int], b: tuple[str, int], relay: str, sdp_ip: str) -> None:
    commands = []
    for i in range(n):
        fields = (
            sdp_ip,
            relay,
            relay,
            b[0],
            a[1] + 2 * i,
            20000 + 4 * i,
            20002 + 4 * i,
            b[1] + 2 * i,
        )
        commands.append(body("S", fields, f"media-{i}"))
    Client().pipelined(commands)


def cps_worker(job: tuple[int, int, list[str], str]) -> dict[str, Any]:
    """COUNT `S`+`D` pairs on this client's 500 slots, cycling."""
    count, base, relays, tag = job
    client = Client()
    s_ms = []
    started = time.monotonic()
    for i in range(count):
        index = base + i % 500
        s_ms.append(client.one(slot(index, relays, f"{tag}-{i}")) * 1e3)
        client.one(slot(index, relays, f"{tag}-{i}", "D"))
    return {"pairs": count, "s": time.monotonic() - started, "s_ms": s_ms}


def cps(count: int, clients: int, base: int, relays: list[str], tag: str) -> dict[str, Any]:
    jobs = [(count, base + 500 * k, relays, f"{tag}-c{k}") for k in range(clients)]
    return closed_loop(cps_worker, jobs, "pairs", ["s_ms"])


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["ping", "calls", "fill", "cps"])
    parser.add_argument("n", type=int)
    parser.add_argument("to", type=int, nargs="?")
    parser.add_argument("--a", default="10.98.1.2:40000")
    parser.add_argument("--b", default="10.98.2.2:30000")
    parser.add_argument("--relay", default="10.98.0.1")
    parser.add_argument("--relays", default="10.98.0.1,10.98.0.2")
    parser.add_argument("--caller-sdp")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--base", type=int, default=0)
    parser.add_argument("--tag", default="bench")
    args = parser.parse_args()
    relays = args.relays.split(",")
    started = time.monotonic()
    result: dict[str, Any]
    if args.command == "ping":
        result = {"ready": ping(20.0)}
    elif args.command == "calls":
        a = endpoint(args.a)
        media_calls(args.n, a, endpoint(args.b), args.relay, args.caller_sdp or a[0])
        result = {"calls": args.n}
    elif args.command == "fill":
        to = args.to if args.to is not None else args.n
        Client().pipelined([slot(i, relays, args.tag) for i in range(args.n, to)])
        result = {"filled": to - args.n}
    else:
        result = cps(args.n, args.clients, args.base, relays, args.tag)
    result["s"] = round(time.monotonic() - started, 3)
    return result


if __name__ == "__main__":
    run("ctlclient", main)
