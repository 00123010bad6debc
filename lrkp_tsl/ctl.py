"""`lrkp-ctl`: ask a running node what it is, over its own control protocol.

It reads the node's config file (or --control) to find the control socket, like
rtpengine-ctl, and speaks the same P/G commands Kamailio does, so it also proves that a
controller on this host can reach the node.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

from lrkp_tsl import config
from lrkp_tsl.config import ControlAddress
from lrkp_tsl.errors import ConfigError
from lrkp_tsl.protocol import NodeConfig


def exchange(address: ControlAddress, command: bytes, timeout: float) -> bytes:
    cookie = f"{os.getpid()}_{secrets.randbelow(1 << 30)}".encode()
    if address.scheme == "unix":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address.path)
            sock.sendall(command)
            return sock.recv(4096)
    family = socket.AF_INET6 if address.scheme == "udp6" else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(cookie + b" " + command, (address.host, address.port))
        while True:
            reply = sock.recv(4096)
            if reply.startswith(cookie + b" "):
                return reply[len(cookie) + 1 :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lrkp-ctl", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="the node's TOML config file")
    parser.add_argument(
        "--control", help="control address (default: the config's first, or udp:127.0.0.1:22333)"
    )
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("command", choices=["ping", "config"])
    args = parser.parse_args(argv)
    try:
        if args.control:
            address = ControlAddress.parse(args.control, key="--control")
        elif args.config:
            address = config.load(args.config, {}).control[0]
        else:
            address = ControlAddress("udp", "127.0.0.1", config.DEFAULT_CONTROL_PORT)
    except ConfigError as error:
        print(f"lrkp-ctl: {error.reason}", file=sys.stderr)
        return 2
    command = b"P" if args.command == "ping" else b"G"
    try:
        reply = exchange(address, command, args.timeout)
    except (TimeoutError, OSError) as exc:
        print(f"lrkp-ctl: no answer from {address}: {exc}", file=sys.stderr)
        return 1
    if args.command == "ping":
        print(f"{address}: {reply.decode(errors='replace')}")
        return 0 if reply == b"P PONG" else 1
    try:
        node = NodeConfig.unpack(reply.removeprefix(b"G "))
    except ConfigError:
        print(f"lrkp-ctl: unexpected G reply from {address}: {reply!r}", file=sys.stderr)
        return 1
    print(
        f"{address}: ports {node.start_port}-{node.end_port} (current {node.current_port}), "
        f"internal {node.internal_ip}, external {node.external_ip}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
