"""`lrkp-tsl`: the node daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lrkp_tsl import __version__, config
from lrkp_tsl.errors import ConfigError, LrkpError

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrkp-tsl",
        description="Media relay node for Kamailio's lrkproxy module; the kernel relays.",
    )
    parser.add_argument("--version", action="version", version=f"lrkp-tsl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the node in the foreground (logs to stderr)"),
        ("check-config", "validate the configuration and exit"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "--config",
            type=Path,
            help=f"TOML config file (default {config.DEFAULT_CONFIG} if it exists; "
            "--config /dev/null: flags only)",
        )
        cmd.add_argument(
            "--control",
            action="append",
            metavar="ADDR",
            help="udp:IP:PORT, udp6:[IP]:PORT or unix:/path (repeatable; "
            "default udp:127.0.0.1:22333)",
        )
        cmd.add_argument(
            "--allow",
            action="append",
            metavar="NET",
            help="controller address or network allowed to send commands "
            "(repeatable; default loopback)",
        )
        cmd.add_argument("--internal-ip", help="relay IP on the internal network")
        cmd.add_argument("--external-ip", help="relay IP on the external network")
        cmd.add_argument("--ports", metavar="START-END", help="relay port range")
        cmd.add_argument("--state-dir", help="directory for the node's state")
        cmd.add_argument("--log-level", help="debug, info, warning or error")
        cmd.add_argument(
            "--idle-timeout",
            type=float,
            help="media idle timeout in seconds (default 60)",
        )
        cmd.add_argument("--max-lifetime", type=float, help="maximum call lifetime, seconds")
        cmd.add_argument("--rules", help="nftables base table file")
        cmd.add_argument("--latching", help="strict, ip, any or auto (default auto)")
        cmd.add_argument("--queue-num", type=int, help="NFQUEUE number (default 22333)")
        cmd.add_argument("--pair-redis", metavar="URL", help="pair mode: this node's Redis")
        cmd.add_argument(
            "--pair-peer-redis", metavar="URL", help="pair mode: the peer node's Redis"
        )
        cmd.add_argument(
            "--ctl-socket",
            metavar="@NAME|/PATH",
            help="lrkp-ctl's management socket (default @lrkp-tsl, per network namespace)",
        )
        cmd.add_argument("--log-format", help="text (default) or json")
        cmd.add_argument(
            "--metrics-listen",
            metavar="IP:PORT",
            help="serve Prometheus /metrics here (default: off)",
        )
        cmd.add_argument(
            "--flush-on-exit",
            action="store_true",
            default=None,
            help="remove all kernel state on exit (default: keep calls flowing)",
        )
    return parser


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "control": args.control,
        "allow": args.allow,
        "internal_ip": args.internal_ip,
        "external_ip": args.external_ip,
        "ports": args.ports,
        "state_dir": args.state_dir,
        "log_level": args.log_level,
        "sessions.idle_timeout": args.idle_timeout,
        "sessions.max_lifetime": args.max_lifetime,
        "kernel.rules": args.rules,
        "kernel.flush_on_exit": args.flush_on_exit,
        "kernel.queue_num": args.queue_num,
        "latching.policy": args.latching,
        "pair.redis": args.pair_redis,
        "pair.peer_redis": args.pair_peer_redis,
        "ctl_socket": args.ctl_socket,
        "log_format": args.log_format,
        "metrics.listen": args.metrics_listen,
    }


def config_path(args: argparse.Namespace) -> Path | None:
    """--config, else the default file if it exists, else none (flags only)."""
    if args.config is not None:
        return Path(args.config)
    return config.DEFAULT_CONFIG if config.DEFAULT_CONFIG.is_file() else None


def print_problems(error: ConfigError) -> None:
    """Every problem, one per line, on stderr."""
    problems = getattr(error, "problems", None) or [error.reason]
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    print(f"lrkp-tsl: bad configuration ({count}):", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def print_summary(path: Path | None, node_config: config.Config, given: set[str]) -> None:
    """What the node would run with: every key and its value, defaults marked."""
    print(f"lrkp-tsl: configuration OK ({path if path else 'flags only, no file'})")
    rows = config.describe(node_config, given)
    width = max(len(key) for key, _value in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = config_path(args)
    try:
        values = config.read(path, overrides(args))
        node_config = config.from_mapping(values, source=str(path) if path else "flags")
    except ConfigError as error:
        print_problems(error)
        return EXIT_CONFIG
    if args.command == "check-config":
        print_summary(path, node_config, set(values))
        return 0
    from lrkp_tsl.logfmt import setup_logging

    setup_logging(node_config.log_level, node_config.log_format)
    if os.geteuid() != 0:
        logging.getLogger("lrkp_tsl").warning(
            "not root: the node needs CAP_NET_ADMIN (nftables, conntrack, sysctls)"
        )
    from lrkp_tsl import hostdeps

    try:
        binding = hostdeps.check()
    except hostdeps.MissingDependency as error:
        logging.getLogger("lrkp_tsl").error("not started: %s", error.reason)
        return EXIT_CONFIG
    if binding.origin == "debian":
        logging.getLogger("lrkp_tsl").info(
            "nftables binding: Debian's python3-nftables, loaded from %s", binding.path
        )
    from lrkp_tsl.daemon import serve
    from lrkp_tsl.lock import LockedError

    try:
        asyncio.run(serve(node_config))
    except LockedError as error:
        logging.getLogger("lrkp_tsl").error("not started: %s", error.reason)
        return EXIT_CONFIG
    except ConfigError as error:
        logging.getLogger("lrkp_tsl").error("bad configuration: %s", error.reason)
        return EXIT_CONFIG
    except LrkpError as error:
        logging.getLogger("lrkp_tsl").error("%s", error)
        return EXIT_RUNTIME
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
