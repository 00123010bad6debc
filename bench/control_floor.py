"""The floor of a CPython control node: how many `S`+`D` pairs per second the node's shell
alone could answer, with nothing behind it.

A stand-in node reads the control socket in batches on an asyncio loop, as `udpbatch.py`
does, and answers every command `OK` at once (`--mode shell`), or after parsing it with the
real `protocol.parse_request` (`--mode parse`). The same closed-loop clients as the
side-by-side benchmark (`ctlclient.py cps`, one command in flight each) drive it. The node
is pinned to CPU 1 and the clients to CPU 0, in a lab namespace over loopback, as there.
What the real node does on top (decide, store, nf_tables, conntrack, reply) is what
separates its figures from these (docs/speed.md).

    .venv/bin/python bench/control_floor.py [--clients 1,4,8] [--pairs 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lrkp_lab.lab import Lab  # noqa: E402
from lrkp_tsl import protocol  # noqa: E402

CONTROL = ("127.0.0.1", 22333)  # where ctlclient.py sends
READ_MAX = 64


def serve(mode: str, seconds: float) -> None:
    """The stand-in node: answer each command `OK` (after parsing it, in mode `parse`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(CONTROL)
    sock.setblocking(False)
    loop = asyncio.new_event_loop()

    def readable() -> None:
        batch = []
        for _ in range(READ_MAX):
            try:
                batch.append(sock.recvfrom(65535))
            except BlockingIOError:
                break
        for data, addr in batch:
            if mode == "parse":
                protocol.parse_request(data, with_cookie=True)
            sock.sendto(data + b"OK", addr)

    loop.add_reader(sock.fileno(), readable)
    loop.call_later(seconds, loop.stop)
    loop.run_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--pairs", type=int, default=6000, help="per run, over all clients")
    parser.add_argument("--serve", choices=["shell", "parse"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.seconds)
        return 0
    if os.geteuid() != 0:
        print("control_floor: needs root (a lab namespace)", file=sys.stderr)
        return 1
    rows = []
    with Lab() as lab:
        ns = ["ip", "netns", "exec", lab.ns("relay")]
        for mode in ("shell", "parse"):
            node = subprocess.Popen(
                [*ns, "taskset", "-c", "1", sys.executable, __file__, "--serve", mode]
            )
            try:
                time.sleep(1.0)
                for clients in (int(c) for c in args.clients.split(",")):
                    out = subprocess.run(
                        [*ns, "taskset", "-c", "0", sys.executable, str(HERE / "ctlclient.py"),
                         "cps", str(args.pairs // clients), "--clients", str(clients),
                         "--tag", f"{mode}{clients}"],
                        capture_output=True, text=True, check=True, timeout=300,
                    ).stdout  # fmt: skip
                    result = json.loads(out)
                    row = {"mode": mode, "clients": clients, "pairs_per_s": result["pairs_per_s"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                node.terminate()
                node.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
