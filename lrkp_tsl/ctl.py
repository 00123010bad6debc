"""`lrkp-ctl`: look at and steer a running node (docs/lrkp-ctl.md).

Most commands talk to the node's management socket (mgmt.py): by default the abstract
socket `@lrkp-tsl` of the network namespace lrkp-ctl runs in, so with no options it finds
the node of that namespace (`ip netns exec NS lrkp-ctl sessions`). `--socket` or
LRKP_CTL_SOCKET point elsewhere. `config`, and `ping` with --control/--config, speak the
lrkproxy control protocol instead (P and G, as Kamailio does), which also proves that a
controller on this host can reach the node.

Exit codes: 0 done; 1 no node answered (not running here, wrong socket, timeout); 2 bad
usage or configuration; 3 no such call; 4 the node refused or failed the command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lrkp_tsl import __version__, config
from lrkp_tsl.config import ControlAddress
from lrkp_tsl.ctlsocket import DEFAULT_SOCKET, ENV_SOCKET, socket_name
from lrkp_tsl.errors import ConfigError
from lrkp_tsl.protocol import NodeConfig

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FAILED = 4


class Unreachable(Exception):
    """No node answered on the management socket; the message is the one line shown."""


class Refused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# -- the management socket ----------------------------------------------------------------


def request(address: str, message: dict[str, Any], timeout: float) -> Iterator[dict[str, Any]]:
    """Send one request; yield each streamed item's payload, then the final result (the
    last value yielded). Raises Unreachable or Refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    where = f"{address} in this network namespace" if address.startswith("@") else address
    try:
        try:
            _connect(sock, socket_name(address), timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise Unreachable(
                f"no node is listening on {where}: is lrkp-tsl running here? "
                f"(run lrkp-ctl in the node's network namespace, or use --socket / {ENV_SOCKET})"
            ) from None
        except PermissionError:
            raise Unreachable(f"not allowed to connect to {where}: run as root") from None
        # Refused before the request was read? Then its answer is waiting: read it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps(message).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for line in lines:
                reply = json.loads(line)
                if "item" in reply:
                    yield reply["item"]
                elif reply.get("ok"):
                    yield reply.get("result")
                    return
                else:
                    raise Refused(str(reply.get("error")), str(reply.get("reason")))
        raise Unreachable(f"the node on {where} closed the connection without an answer")
    except TimeoutError:
        raise Unreachable(f"no answer from the node on {where} within {timeout:g} s") from None
    except OSError as exc:
        raise Unreachable(f"talking to the node on {where} failed: {exc}") from None
    finally:
        sock.close()


def _connect(sock: socket.socket, name: str, timeout: float) -> None:
    """Connect, waiting while the node's backlog is full: anyone may connect to an abstract
    socket, and while others flood it (the node refuses and closes each at once) a connect
    can find no room (EAGAIN) for a moment. Raises TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            sock.connect(name)
            return
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise TimeoutError from None
            time.sleep(pause)
            pause = min(0.05, pause * 2)


def collect(address: str, message: dict[str, Any], timeout: float) -> tuple[list[Any], Any]:
    items = list(request(address, message, timeout))
    return items[:-1], items[-1]


# -- the control protocol (P, G) ------------------------------------------------------------


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
            if not reply:
                return b""  # a draining node's answer to P
            if reply.startswith(cookie + b" "):
                return reply[len(cookie) + 1 :]


# -- human output -----------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def show_pair(pair: dict[str, Any]) -> str:
    """A pair's health as `ping` and `stats` print it: one line, then one per problem."""
    role = pair.get("role", "starting")
    lag = pair.get("lag")
    lag_text = "unknown (never in sync)" if lag is None else f"{lag:.3f} s"
    since = _seconds(pair.get("state_since"))
    if role == "standby":
        verdict = (
            "in sync with the active"
            if pair.get("in_sync")
            else f"{str(pair.get('state', 'not following')).upper()} for {since}"
        )
        applied = pair.get("last_applied_ago")
        line = (
            f"pair: standby, {verdict} (peer {pair.get('peer')}): link {pair.get('link')}, "
            f"lag {lag_text}, last change applied "
            + ("never" if applied is None else f"{_seconds(applied)} ago")
            + f" ({pair.get('applied', 0)} applied), {pair.get('calls')} calls here, "
            + f"{_count(pair.get('active_calls'))} on the active"
        )
    elif role == "active":
        verdict = (
            "followed by a standby in sync"
            if pair.get("in_sync")
            else f"SPLIT BRAIN (the peer is active too) for {since}"
            if pair.get("split_brain")
            else f"NOT FOLLOWED by a standby in sync for {since}"
        )
        replica = pair.get("replica")
        redis = (
            "no standby's Redis replicates this node's"
            if not replica
            else f"standby's Redis {replica['address']} {replica['state']}, acknowledged "
            f"{replica['ack_ago']} s ago"
        )
        line = (
            f"pair: active, {verdict} (peer {pair.get('peer')}): {redis}; standby lag "
            f"{lag_text}, {_count(pair.get('standby_calls'))} calls there, "
            f"{pair.get('calls')} here; {pair.get('published', 0)} changes published, "
            f"{pair.get('queued', 0)} queued"
        )
    else:
        line = "pair: starting (the role is not known yet)"
    return "\n".join([line, *(f"  - {problem}" for problem in pair.get("problems", []))])


def _count(value: object) -> str:
    return "?" if value is None else str(value)


def _party(side: dict[str, Any] | None) -> str:
    if side is None:
        return "(no stream yet)"
    sdp = side["sdp"] or "(unknown)"
    if side["latching"] == "fixed":
        return f"{sdp} (fixed)"
    if side["latching"] == "trusted" and not side["learned"]:
        return f"{sdp} (trusted, not heard)"
    return f"{sdp} -> {side['learned'] or 'learning'}"


def _stream(state: str, learned: str | None) -> str:
    """One stream of a party in `show`: an address is shown only once the party was heard
    from it (a trusted SDP address it never sent from is not "learned")."""
    if state == "none":
        return "none (rtcp-mux, or not RTP)"
    if state == "learning":
        return "learning"
    return f"{state} {learned}" if learned else f"{state}, nothing heard yet"


def _about(row: dict[str, Any]) -> str:
    """`ng, tags a/b` for a call that is not lrkproxy's ("" for lrkproxy's)."""
    if row.get("protocol", "lrkproxy") == "lrkproxy":
        return ""
    parts = [row["protocol"]]
    for name, value in (row.get("about") or {}).items():
        shown = "/".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{name} {shown}")
    return ", ".join(parts)


def _session_lines(row: dict[str, Any]) -> list[list[str]]:
    """A call's rows in `sessions`: one per stream (its first has the call's figures)."""
    about = _about(row)
    first = [
        row["call_id"] + (f" [{about}]" if about else ""), _seconds(row["age"]),
        _seconds(row["idle"]), _party(row["caller"]), _party(row["callee"]),
        str(row["caller_to_callee_packets"]), str(row["caller_to_callee_bytes"]),
        str(row["callee_to_caller_packets"]), str(row["callee_to_caller_bytes"]),
    ]  # fmt: skip
    more = [
        [f"  stream {stream['stream']}", "", "", _party(stream["caller"]),
         _party(stream["callee"]), "", "", "", ""]
        for stream in row.get("media_streams", [])[1:]
    ]  # fmt: skip
    return [first, *more]


def show_sessions(rows: list[dict[str, Any]], result: dict[str, Any]) -> str:
    table = _table(
        ["CALL-ID", "AGE", "IDLE", "CALLER (SDP -> LEARNED)", "CALLEE (SDP -> LEARNED)",
         "A->B PKTS", "A->B BYTES", "B->A PKTS", "B->A BYTES"],
        [line for row in rows for line in _session_lines(row)],
    )  # fmt: skip
    return f"{table}\n{result['calls']} calls"


def _side_line(name: str, side: dict[str, Any]) -> str:
    return (
        f"{name}: SDP {side['sdp'] or '(unknown)'}, sends to relay {side['relay']}, "
        f"RTP {_stream(side['latching'], side['learned'])}, "
        f"RTCP {_stream(side['latching_rtcp'], side['learned_rtcp'])} (rule {side['rule']})"
    )


def show_call(row: dict[str, Any]) -> str:
    about = _about(row)
    lines = [
        f"call {row['call_id']}" + (f" ({about})" if about else ""),
        f"  age {_seconds(row['age'])}, idle {_seconds(row['idle'])} "
        f"(timeout {row['idle_timeout']:g}s), media {row['media']} ({row['streams']} streams)"
        + (f", ends in {_seconds(row['ends_in'])}" if row.get("ends_in") is not None else ""),
    ]
    streams = row.get("media_streams", [])
    if not streams:
        lines.append("  no stream relayed yet (an offer waiting for its answer)")
    for stream in streams:
        prefix = f"stream {stream['stream']} " if len(streams) > 1 else ""
        for name in ("caller", "callee"):
            lines.append(f"  {prefix}{_side_line(name, stream[name])}")
    lines.append(
        f"  caller->callee {row['caller_to_callee_packets']} packets "
        f"{row['caller_to_callee_bytes']} bytes; callee->caller "
        f"{row['callee_to_caller_packets']} packets {row['callee_to_caller_bytes']} bytes"
    )
    for flow in row["flows"]:
        lines.append(
            f"  flow {flow['stream']}: {flow['from']} -> {flow['to_relay']} "
            f"== {flow['out_relay']} -> {flow['target']}"
        )
    for endpoint in row["learning"]:
        lines.append(f"  learning at {endpoint}")
    return "\n".join(lines)


def show_kernel(result: dict[str, Any]) -> str:
    def yes(flag: object) -> str:
        return "yes" if flag else "NO"

    lines = [
        f"table {result['table']}: {'present' if result['table_present'] else 'MISSING'}",
        f"first-packet queue: {result['queue_path']} (queue {result['queue_num']}), "
        f"rule {'present' if result['queue_rule'] else 'MISSING'}",
        f"idle timeout policy relay_idle: {result['idle_policy']} s",
    ]
    probes = result["probes"]
    if probes:
        lines.append(
            f"probes: nft queue {yes(probes['native_queue'])}, xt NFQUEUE "
            f"{yes(probes['xt_nfqueue'])}, iptables-nft {probes['iptables_nft'] or 'missing'}, "
            f"flowtable {yes(probes['flowtable'])}, conntrack accounting "
            f"{yes(probes['conntrack_acct'])}, socket lookup {yes(probes.get('socket_lookup'))}"
        )
    for name, item in result["sysctls"].items():
        mark = "" if item["value"] == item["wanted"] else f"  (WANTED {item['wanted']})"
        lines.append(f"sysctl {name} = {item['value']}{mark}")
    ports = result.get("ports")
    if ports:
        reserved = "yes" if ports["relay_range_reserved"] else "no (see the node's start log)"
        lines.append(
            f"sysctl net.ipv4.ip_local_port_range = {ports['ephemeral']}; "
            f"net.ipv4.ip_local_reserved_ports = {ports['reserved'] or '(none)'}; "
            f"relay range reserved: {reserved}"
        )
    for name, packets in result["counters"].items():
        lines.append(f"counter {name}: {packets if packets is not None else '-'} packets")
    return "\n".join(lines)


def show_ruleset(items: list[dict[str, Any]]) -> str:
    lines = []
    for item in items:
        if item["kind"] == "rules":
            lines.append(item["text"].rstrip())
            lines.append("")
            lines.append("elements:")
        elif item["kind"] == "flow":
            lines.append(
                f"  {item['key']} -> dnat {item['dnat_to']}, snat {item['snat_to']}"
                f"  # {item['explained']}"
            )
        else:
            lines.append(f"  {item['kind']} {item['key']}  # {item['explained']}")
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------


def _control_address(args: argparse.Namespace, address: str) -> ControlAddress:
    """--control, else the config's first, else what the node reports, else the default."""
    if args.control:
        return ControlAddress.parse(args.control, key="--control")
    if args.config:
        return config.load(args.config, {}).control[0]
    try:
        _items, result = collect(address, {"cmd": "ping"}, args.timeout)
        return ControlAddress.parse(result["control"][0])
    except (Unreachable, Refused, KeyError, IndexError, ConfigError):
        return ControlAddress("udp", "127.0.0.1", config.DEFAULT_CONTROL_PORT)


def control_command(args: argparse.Namespace, address: str) -> int:
    try:
        target = _control_address(args, address)
    except ConfigError as error:
        print(f"lrkp-ctl: {error.reason}", file=sys.stderr)
        return EXIT_USAGE
    command = b"P" if args.command == "ping" else b"G"
    try:
        reply = exchange(target, command, args.timeout)
    except (TimeoutError, OSError) as exc:
        print(f"lrkp-ctl: no answer from {target}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.command == "ping":
        if args.json:
            print(json.dumps({"control": str(target), "reply": reply.decode(errors="replace")}))
        elif not reply:
            print(f"{target}: draining (P answered with an empty datagram)")
        else:
            print(f"{target}: {reply.decode(errors='replace')}")
        return EXIT_OK if reply == b"P PONG" else EXIT_UNREACHABLE
    try:
        node = NodeConfig.unpack(reply.removeprefix(b"G "))
    except ConfigError:
        print(f"lrkp-ctl: unexpected G reply from {target}: {reply!r}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"control": str(target), **dataclasses.asdict(node)}))
        return EXIT_OK
    print(
        f"{target}: ports {node.start_port}-{node.end_port} (current {node.current_port}), "
        f"internal {node.internal_ip}, external {node.external_ip}"
    )
    return EXIT_OK


def management_command(args: argparse.Namespace, address: str) -> int:
    message: dict[str, Any] = {"cmd": args.command}
    if args.command in ("show", "delete"):
        message["call_id"] = args.call_id
    if args.json and args.command in ("sessions", "ruleset"):
        # JSON Lines, streamed as they come (50k calls stay cheap): one object per call
        # (or element); the final summary is not printed.
        pending = None
        for payload in request(address, message, args.timeout):
            if pending is not None:
                print(json.dumps(pending))
            pending = payload
        return EXIT_OK
    items, result = collect(address, message, args.timeout)
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    if args.command == "sessions":
        print(show_sessions(items, result))
    elif args.command == "show":
        print(show_call(result))
    elif args.command == "delete":
        print(f"deleted {result['call_id']}: its kernel state is gone")
    elif args.command == "stats":
        if "pair" in result:
            print(show_pair(result["pair"]))
        for name, value in result["gauges"].items():
            print(f"{name} {value}")
        for name, value in result["counters"].items():
            print(f"{name} {value}")
    elif args.command == "kernel":
        print(show_kernel(result))
    elif args.command == "ruleset":
        print(show_ruleset(items))
    elif args.command == "drain":
        print(
            f"draining: P is answered with an empty datagram, so Kamailio disables this node "
            f"and sends new calls to other nodes of its set (a set of this node alone moves "
            f"no call: lrkproxy never tests a lone node it has enabled); {result['calls']} "
            "live calls continue and end normally; the node stays drained across a restart "
            "until `lrkp-ctl undrain`"
        )
    elif args.command == "undrain":
        print(f"not draining: P is answered with PONG again ({result['calls']} live calls)")
    else:
        print(
            f"node up {_seconds(result['uptime'])} (pid {result['pid']}, version "
            f"{result['version']}): {result['calls']} calls"
            + (", DRAINING (P answered with an empty datagram)" if result["draining"] else "")
            + ("" if result["active"] else ", standby")
        )
        if "pair" in result:
            print(show_pair(result["pair"]))
    if "warning" in result:
        print(f"warning: {result['warning']}", file=sys.stderr)
    return EXIT_OK


COMMANDS = {
    "sessions": "list live calls: addresses, latching, packets and bytes each way, age, idle",
    "show": "one call in detail (its conntrack counters read now)",
    "delete": "end a call now, as D does (reason: operator)",
    "stats": "every counter of the node",
    "kernel": "queue path, probes, sysctls, whether the node's table and queue rule are there",
    "ruleset": "the node's nft table, each element explained (which call and leg)",
    "drain": "stop taking new calls; live calls continue and end normally",
    "undrain": "take new calls again",
    "ping": "is the node up? (with --control/--config: P over the control protocol)",
    "config": "G over the control protocol: the port range and relay IPs Kamailio gets",
}


def _options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before or after the command's name (after it, a
    default must not override what was given before it: SUPPRESS)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--socket",
        default=default(None),
        help=f"management socket, @NAME or /PATH (default: ${ENV_SOCKET}, else {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="JSON instead of text"
    )
    parser.add_argument("--timeout", type=float, default=default(10.0), help="seconds (default 10)")
    parser.add_argument(
        "--config", type=Path, default=default(None), help="ping/config: the node's TOML file"
    )
    parser.add_argument(
        "--control", default=default(None), help="ping/config: e.g. udp:127.0.0.1:22333"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrkp-ctl",
        description="Look at and steer a running lrkp-tsl node.",
        epilog="Exit codes: 0 done, 1 no node answered, 2 bad usage, 3 no such call, "
        "4 the node refused or failed the command.",
    )
    parser.add_argument("--version", action="version", version=f"lrkp-ctl {__version__}")
    _options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        _options(cmd, suppress=True)
        if name in ("show", "delete"):
            cmd.add_argument("call_id", metavar="CALL-ID")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    address = args.socket or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET
    try:
        if args.command == "config" or (args.command == "ping" and (args.control or args.config)):
            return control_command(args, address)
        return management_command(args, address)
    except Unreachable as error:
        print(f"lrkp-ctl: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Refused as error:
        print(f"lrkp-ctl: {error.reason}", file=sys.stderr)
        return EXIT_NOT_FOUND if error.code == "not-found" else EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK  # the reader went away (| head)


if __name__ == "__main__":
    raise SystemExit(main())
