"""A stub lrkproxy node (LRKP_TSL) for the e2e harness self-tests: control protocol only.

It speaks the UDP wire protocol of Kamailio's `lrkproxy` module (see
/work/shared/research/lrkp-protocol.md §1-§2) and relays no media:

    <cookie> P            ->  <cookie> P PONG
    <cookie> G            ->  <cookie> G  + struct "@iii20s20s" (start, end, current,
                                             internal_ip, external_ip): 52 bytes
    <cookie> S|D fields   ->  the request bytes + b"OK"

Every datagram it gets is recorded (with the sender) for the test to inspect. It runs in a
daemon thread with a bounded lifetime, on a socket that may belong to any lab namespace
(`Lab.udp_socket`). It can also run on its own: `python -m tests.e2e.stub_node IP PORT`.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

CONFIG_FORMAT = "@iii20s20s"
CONFIG_SIZE = struct.calcsize(CONFIG_FORMAT)
assert CONFIG_SIZE == 52

# Names of the ten fields of an S/D command, in wire order (tokens 2..11).
SESSION_FIELDS = (
    "src_ip",
    "dst_ip",
    "snat_ip",
    "dnat_ip",
    "src_port",
    "dst_port",
    "snat_port",
    "dnat_port",
    "timeout",
    "call_id",
)


@dataclass(frozen=True)
class Request:
    """One datagram the stub received."""

    data: bytes
    sender: tuple[str, int]
    at: float

    @property
    def cookie(self) -> bytes:
        return self.data.split(b" ", 1)[0]

    @property
    def command(self) -> str:
        """The command letter ('P', 'G', 'S', 'D', ...), or '' for a malformed datagram."""
        parts = self.data.split(b" ", 1)
        return parts[1][:1].decode("ascii", "replace") if len(parts) == 2 else ""

    @property
    def fields(self) -> dict[str, str]:
        """The ten session fields of an S/D command, by name (empty strings where empty).

        The module separates fields by exactly one space and ends with a trailing space, so
        splitting on single spaces keeps empty fields in place.
        """
        tokens = self.data.decode("ascii", "replace").split(" ")
        values = tokens[2 : 2 + len(SESSION_FIELDS)]
        values += [""] * (len(SESSION_FIELDS) - len(values))
        return dict(zip(SESSION_FIELDS, values, strict=True))


@dataclass
class NodeConfig:
    internal_ip: str
    external_ip: str
    start_port: int = 20000
    end_port: int = 40000
    current_port: int = 20000

    def pack(self) -> bytes:
        return struct.pack(
            CONFIG_FORMAT,
            self.start_port,
            self.end_port,
            self.current_port,
            self.internal_ip.encode("ascii"),
            self.external_ip.encode("ascii"),
        )


def reply_to(data: bytes, config: NodeConfig) -> bytes | None:
    """The stub's reply to one datagram, or None (unknown command: no reply, like pylrkproxy)."""
    parts = data.split(b" ", 1)
    if len(parts) != 2 or not parts[1]:
        return None
    cookie, command = parts[0], parts[1][:1]
    if command == b"P":
        return cookie + b" P PONG"
    if command == b"G":
        return cookie + b" G " + config.pack()
    if command in (b"S", b"D"):
        return data + b"OK"
    return None


@dataclass
class StubNode:
    """Answers lrkproxy commands on `sock` in a thread until stopped or `max_seconds` pass."""

    sock: socket.socket
    config: NodeConfig
    max_seconds: float = 600.0
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stub-lrkp-node", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        ip, port = self.sock.getsockname()[:2]
        return str(ip), int(port)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> StubNode:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> StubNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            try:
                data, sender = self.sock.recvfrom(65535)
            except OSError:
                continue
            with self._lock:
                self.requests.append(Request(data, (sender[0], sender[1]), time.monotonic()))
            answer = reply_to(data, self.config)
            if answer is not None:
                with contextlib.suppress(OSError):
                    self.sock.sendto(answer, sender)

    # ----- inspection -----

    def received(self, command: str | None = None) -> list[Request]:
        """A snapshot of the requests received so far (only `command` ones, if given)."""
        with self._lock:
            got = list(self.requests)
        return [r for r in got if command is None or r.command == command]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def wait_for(self, command: str, count: int = 1, timeout: float = 5.0) -> list[Request]:
        """Wait until at least `count` `command` requests arrived; return them (maybe fewer)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received(command)
            if len(got) >= count or time.monotonic() >= deadline:
                return got
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.e2e.stub_node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ip")
    parser.add_argument("port", type=int)
    parser.add_argument("--internal-ip", default=None, help="default: the bound IP")
    parser.add_argument("--external-ip", default=None, help="default: the bound IP")
    parser.add_argument("--seconds", type=float, default=600.0, help="run time bound")
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.ip, args.port))
    config = NodeConfig(args.internal_ip or args.ip, args.external_ip or args.ip)
    node = StubNode(sock, config, max_seconds=args.seconds).start()
    seen = 0
    try:
        while node.alive:
            time.sleep(0.1)
            got = node.received()
            for request in got[seen:]:
                print(f"{request.sender[0]}:{request.sender[1]} {request.data!r}", flush=True)
            seen = len(got)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
