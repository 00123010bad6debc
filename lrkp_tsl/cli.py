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
from lrkp_tsl.errors import ConfigError, HostError, LrkpError

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _flag_number(text: str) -> int | float | str:
    """A flag's number as TOML would give it (int or float); text that is no number is kept
    as it is, so the config check names the key and lists it with every other problem."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# key -> (flag, argparse options, what it sets). Every help string ends with the key's real
# default, taken from Config (`config.default_texts`), never copied by hand.
FLAGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "internal_ip": ("--internal-ip", {"metavar": "IP"}, "relay IP on the internal network"),
    "external_ip": ("--external-ip", {"metavar": "IP"}, "relay IP on the external network"),
    "ports": ("--ports", {"metavar": "START-END"}, "relay port range"),
    "control": (
        "--control",
        {"action": "append", "metavar": "ADDR"},
        "udp:IP[:PORT], udp6:[IP][:PORT] or unix:/path (repeatable)",
    ),
    "allow": (
        "--allow",
        {"action": "append", "metavar": "NET"},
        "controller address or network allowed to send commands (repeatable)",
    ),
    "state_dir": ("--state-dir", {"metavar": "DIR"}, "directory of the node's state store"),
    "log_level": ("--log-level", {"metavar": "LEVEL"}, ", ".join(config.LOG_LEVELS)),
    "sessions.idle_timeout": (
        "--idle-timeout",
        {"type": _flag_number, "metavar": "SECONDS"},
        "no media on any stream of a call for this long ends it (whole seconds, {}-{})".format(
            *config.IDLE_TIMEOUT_RANGE
        ),
    ),
    "sessions.max_lifetime": (
        "--max-lifetime",
        {"type": _flag_number, "metavar": "SECONDS"},
        "every call ends after this long ({}-{} s)".format(*config.MAX_LIFETIME_RANGE),
    ),
    "kernel.rules": ("--rules", {"metavar": "FILE"}, "nftables base table file"),
    "kernel.flush_on_exit": (
        "--flush-on-exit",
        {"action": "store_true", "default": None},
        "remove all kernel state on exit (else live calls keep flowing)",
    ),
    "kernel.queue_num": (
        "--queue-num",
        {"type": _flag_number, "metavar": "N"},
        "NFQUEUE number for first packets (0-65535)",
    ),
    "latching.policy": ("--latching", {"metavar": "POLICY"}, "strict, ip, any or auto"),
    "pair.redis": ("--pair-redis", {"metavar": "URL"}, "pair mode: this node's Redis"),
    "pair.peer_redis": ("--pair-peer-redis", {"metavar": "URL"}, "pair mode: the peer's Redis"),
    "ctl_socket": (
        "--ctl-socket",
        {"metavar": "@NAME|/PATH"},
        "lrkp-ctl's management socket (@NAME: per network namespace)",
    ),
    "log_format": ("--log-format", {"metavar": "FORMAT"}, " or ".join(config.LOG_FORMATS)),
    "metrics.listen": (
        "--metrics-listen",
        {"metavar": "IP:PORT"},
        "serve Prometheus /metrics here (none: off)",
    ),
    "relay_ips_may_appear_later": (
        "--relay-ips-may-appear-later",
        {"action": "store_true", "default": None},
        "start even if a relay IP is not on this host yet (a VIP added later; a pair implies it)",
    ),
    "ng": (
        "--ng",
        {"action": "append", "metavar": "ADDR"},
        "serve rtpengine's ng protocol at udp:IP[:PORT] or udp6:[IP][:PORT] (port 2223 by "
        "default; repeatable; docs/ng.md)",
    ),
    "ng_delete_delay": (
        "--ng-delete-delay",
        {"type": _flag_number, "metavar": "SECONDS"},
        "an ng delete without its own delete-delay ends the call this long after it (0-3600)",
    ),
}


# The keys `flush` reads: the rest of the file is not checked (flush.py says why).
FLUSH_KEYS = ("state_dir", "kernel.queue_num")


def dest(key: str) -> str:
    return FLAGS[key][0].removeprefix("--").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrkp-tsl",
        description="Media relay node for Kamailio's lrkproxy module; the kernel relays.",
    )
    parser.add_argument("--version", action="version", version=f"lrkp-tsl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = config.default_texts()
    for name, text, keys in (
        ("run", "run the node in the foreground (logs to stderr)", tuple(FLAGS)),
        ("check-config", "validate the configuration and the host, and exit", tuple(FLAGS)),
        (
            "flush",
            "remove what a stopped node left in the kernel of this network namespace (its "
            "table, queue rule, calls' conntrack entries, reserved ports) and its stored "
            "calls; refused while a node runs here",
            FLUSH_KEYS,
        ),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "--config",
            type=Path,
            help=f"TOML config file (default: {config.DEFAULT_CONFIG} if it exists; "
            "--config /dev/null: flags only)",
        )
        for key in keys:
            flag, options, what = FLAGS[key]
            shown = defaults[key].replace("%", "%%")
            cmd.add_argument(flag, dest=dest(key), help=f"{what} (default: {shown})", **options)
    return parser


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, dest(key)) for key in FLAGS}


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


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"lrkp-tsl: warning: {warning}", file=sys.stderr)


def check_config(path: Path | None, node_config: config.Config, given: set[str]) -> int:
    """The file is valid: now what the host offers it (addresses, the rules file in the
    kernel's dry run). Problems exit 2, as `run` would; warnings are printed, exit 0."""
    from lrkp_tsl import hostcheck

    found = hostcheck.check(node_config, at_start=False)
    warnings = config.warnings(node_config) + found.warnings
    if found.problems:
        print_problems(config.ConfigErrors(found.problems))
        print_warnings(warnings)
        return EXIT_CONFIG
    print_summary(path, node_config, given)
    print_warnings(warnings)
    return 0


def flush(path: Path | None, args: argparse.Namespace) -> int:
    """`lrkp-tsl flush`: what it removed on stdout; exit 0 (also when nothing was left), 2
    when refused (a node runs here, a bad key), 1 when something could not be removed."""
    try:
        values = config.read(path, {key: getattr(args, dest(key)) for key in FLUSH_KEYS})
        fields = config.some(values, FLUSH_KEYS)
    except ConfigError as error:
        print_problems(error)
        return EXIT_CONFIG
    from lrkp_tsl import hostdeps

    try:
        hostdeps.check()
    except hostdeps.MissingDependency as error:
        print(f"lrkp-tsl flush: {error.reason}", file=sys.stderr)
        return EXIT_CONFIG
    from lrkp_tsl.flush import flush as flush_kernel
    from lrkp_tsl.lock import LockedError
    from lrkp_tsl.logfmt import setup_logging

    setup_logging("warning", "text")
    try:
        flushed = flush_kernel(fields["state_dir"], fields["queue_num"])
    except LockedError as error:
        print(
            f"lrkp-tsl flush: refused: a node, {error.holder}, runs in this network namespace "
            f"(it holds {error.path}), and its calls are live in the kernel. Stop it first "
            "(systemctl stop lrkp-tsl), then flush; or have it flush as it stops "
            "(kernel.flush_on_exit = true).",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except LrkpError as error:
        print(f"lrkp-tsl flush: {error.reason}", file=sys.stderr)
        return EXIT_RUNTIME
    for removed in flushed.removed:
        print(f"lrkp-tsl flush: removed {removed}")
    for failed in flushed.failed:
        print(f"lrkp-tsl flush: could not remove {failed}", file=sys.stderr)
    if not flushed.removed and not flushed.failed:
        print(
            "lrkp-tsl flush: nothing to remove in this network namespace (no table ip lrkp, "
            "no queue rule, no reserved ports on record, no stored calls)"
        )
    return EXIT_RUNTIME if flushed.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = config_path(args)
    if args.command == "flush":
        return flush(path, args)
    try:
        values = config.read(path, overrides(args))
        node_config = config.from_mapping(values, source=str(path) if path else "flags")
    except ConfigError as error:
        print_problems(error)
        return EXIT_CONFIG
    if args.command == "check-config":
        return check_config(path, node_config, set(values))
    from lrkp_tsl.logfmt import setup_logging

    setup_logging(node_config.log_level, node_config.log_format)
    log = logging.getLogger("lrkp_tsl")
    if os.geteuid() != 0:
        log.warning("not root: the node needs CAP_NET_ADMIN (nftables, conntrack, sysctls)")
    from lrkp_tsl import hostcheck, hostdeps

    try:
        binding = hostdeps.check()
    except hostdeps.MissingDependency as error:
        log.error("not started: %s", error.reason)
        return EXIT_CONFIG
    if binding.origin == "debian":
        log.info("nftables binding: Debian's python3-nftables, loaded from %s", binding.path)
    found = hostcheck.check(node_config, at_start=True)
    for warning in config.warnings(node_config) + found.warnings:
        log.warning("%s", warning)
    if found.problems:
        for problem in found.problems:
            log.error("not started: %s", problem)
        return EXIT_CONFIG
    from lrkp_tsl.daemon import serve
    from lrkp_tsl.lock import LockedError

    try:
        asyncio.run(serve(node_config, config_file=path))
    except LockedError as error:
        log.error("not started: %s", error.reason)
        return EXIT_CONFIG
    except ConfigError as error:
        log.error("bad configuration: %s", error.reason)
        return EXIT_CONFIG
    except HostError as error:
        log.error("not started: %s", error.reason)
        return EXIT_CONFIG
    except LrkpError as error:
        log.error("%s", error)
        return EXIT_RUNTIME
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
