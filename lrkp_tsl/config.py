"""The node's configuration: a TOML file, overridden by command-line flags.

Every problem is reported as a ConfigError naming the key, the value and what would be
accepted; unknown keys are errors too (a typo must not silently fall back to a default).
All problems of one configuration are found at once (ConfigErrors), so an operator fixes
them in one pass instead of one per restart. Pure: parsing and validation only; the daemon
reads the file.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, TypeVar

from lrkp_tsl.ctlsocket import DEFAULT_SOCKET as DEFAULT_CTL_SOCKET
from lrkp_tsl.defaults import DEFAULT_QUEUE_NUM, DEFAULT_RULES
from lrkp_tsl.errors import ConfigError, MediaError
from lrkp_tsl.latching import Policy
from lrkp_tsl.media import PortRange

DEFAULT_CONTROL_PORT = 22333  # the lrkproxy module's default (CPORT)
DEFAULT_NG_PORT = 2223  # rtpengine's ng port, what its modules' configs name
NG_DELETE_DELAY_RANGE = (0, 3600)
# The default relay range (rtpengine's default, and the example config's). It must not hold
# DEFAULT_CONTROL_PORT: the kernel drops every packet to a relay port on a relay IP that
# belongs to no call, so a control address on a relay IP with the default port (the usual
# `control = ["udp:INTERNAL_IP"]`) would be refused. Tested: every default fits every other.
DEFAULT_PORTS = PortRange(30000, 40000)
# Ranges of the numbers (seconds). The idle timeout is the conntrack timeout policy of every
# relayed stream: whole seconds, which the kernel turns into jiffies in 32 bits (a day is
# far inside; 1e12 wrapped to a timeout of a second, cutting live calls).
IDLE_TIMEOUT_RANGE = (1, 86_400)
MAX_LIFETIME_RANGE = (1, 30 * 86_400)
# Read when no --config is given and it exists (the packaged service names it explicitly).
DEFAULT_CONFIG = Path("/etc/lrkp-tsl/lrkp-tsl.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
BROADCAST = IPv4Address("255.255.255.255")
T = TypeVar("T")
LOG_FORMATS = ("text", "json")
# The management socket lrkp-ctl talks to: an abstract unix name, scoped by the kernel to
# the network namespace (mgmt.py).


class ConfigErrors(ConfigError):
    """Every problem found in one configuration, in the order found; `reason` has them
    one per line (a single problem reads exactly as a plain ConfigError)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ControlAddress:
    """Where the node listens for the controlling layer, in lrkproxy_sock's own syntax."""

    scheme: str  # "udp", "udp6" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str, *, key: str = "control") -> ControlAddress:
        """`control`'s syntax (lrkproxy_sock's); `key` "ng": UDP only, port 2223 by default
        (rtpengine's: no ng client speaks unix:)."""
        scheme, sep, rest = text.partition(":")
        schemes = ("udp", "udp6") if key == "ng" else ("udp", "udp6", "unix")
        if not sep or scheme not in schemes:
            raise ConfigError(
                f"{key} = {text!r}: expected udp:IP[:PORT] or udp6:[IP][:PORT] (rtpengine's "
                "modules speak ng over UDP only)"
                if key == "ng"
                else f"{key} = {text!r}: expected udp:IP[:PORT], udp6:[IP][:PORT] or unix:/path"
            )
        if scheme == "unix":
            if not rest.startswith("/"):
                raise ConfigError(f"{key} = {text!r}: a unix socket needs an absolute path")
            return cls("unix", path=rest)
        if scheme == "udp6":
            if not rest.startswith("["):
                raise ConfigError(f"{key} = {text!r}: write IPv6 as udp6:[ADDR]:PORT")
            host, _, tail = rest[1:].partition("]")
            port_text = tail.removeprefix(":")
        else:
            host, _, port_text = rest.partition(":")
        try:
            addr = ip_address(host)
        except ValueError:
            raise ConfigError(f"{key} = {text!r}: {host!r} is not an IP address") from None
        if (scheme == "udp6") != (addr.version == 6):
            raise ConfigError(f"{key} = {text!r}: udp: takes IPv4, udp6: takes IPv6")
        default = DEFAULT_NG_PORT if key == "ng" else DEFAULT_CONTROL_PORT
        port = _port(port_text or str(default), f"{key} = {text!r}")
        return cls(scheme, host=str(addr), port=port)

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        if self.scheme == "udp6":
            return f"udp6:[{self.host}]:{self.port}"
        return f"udp:{self.host}:{self.port}"


Network = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class Config:
    internal_ip: IPv4Address
    external_ip: IPv4Address
    ports: PortRange = field(default=DEFAULT_PORTS)
    control: tuple[ControlAddress, ...] = (
        ControlAddress("udp", "127.0.0.1", DEFAULT_CONTROL_PORT),
    )
    allow: tuple[Network, ...] = field(default=(IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")))
    state_dir: Path = Path("/var/lib/lrkp-tsl")
    log_level: str = "info"
    max_lifetime: float = 3600.0  # the module's hash_table_tout
    # One idle timeout for every call: it is the conntrack timeout policy of every relayed
    # stream (lrkp_tsl/rules/lrkp.nft). The S command's timeout field (always 60 from Kamailio) is
    # not used.
    idle_timeout: float = 60.0
    rules: Path = DEFAULT_RULES
    flush_on_exit: bool = False
    policy: Policy = Policy.AUTO
    queue_num: int = DEFAULT_QUEUE_NUM
    # An active/standby pair (both or neither): this node's Redis, and its peer's, from
    # which this node's Redis replicates while this node is the standby.
    pair_redis: str | None = None
    pair_peer_redis: str | None = None
    # Operator surface: lrkp-ctl's socket (`@abstract` or `/path`), and the log format.
    ctl_socket: str = DEFAULT_CTL_SOCKET
    log_format: str = "text"
    # Where Prometheus scrapes /metrics (host, port); None: no metrics endpoint (default).
    metrics_listen: tuple[str, int] | None = None
    # The relay IPs need not be on the host at start (a VIP added later, by keepalived or a
    # script): the node starts anyway, binding its control sockets with IP_FREEBIND. A pair
    # implies it (its standby never holds the VIPs).
    relay_ips_may_appear_later: bool = False
    # rtpengine's ng protocol (docs/ng.md): where it is served (none: off), and how long a
    # delete without its own delete-delay waits (0: at once, as lrkproxy's D).
    ng: tuple[ControlAddress, ...] = ()
    ng_delete_delay: int = 0

    @property
    def paired(self) -> bool:
        return self.pair_redis is not None

    @property
    def relay_addrs(self) -> tuple[IPv4Address, ...]:
        return tuple(dict.fromkeys((self.internal_ip, self.external_ip)))


# key -> (type description, converter). Converters raise ValueError/ConfigError with why.
def _port(text: str, where: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{where}: port {text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {port} is outside 1-65535")
    return port


def _ipv4(key: str, value: Any) -> IPv4Address:
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {value!r}: expected an IPv4 address as a string")
    try:
        address = IPv4Address(value)
    except ValueError:
        raise ConfigError(
            f"{key} = {value!r}: not an IPv4 address (the lrkproxy G reply carries "
            "at most 19 characters per IP and the kernel path is IPv4)"
        ) from None
    if address.is_unspecified or address.is_multicast or address == BROADCAST:
        raise ConfigError(
            f"{key} = {value!r}: not a unicast address: parties send media to it, so it must "
            "be one address of this host (in a pair: a VIP)"
        )
    return address


def _ports(key: str, value: Any) -> PortRange:
    start_text, sep, end_text = str(value).partition("-")
    if not isinstance(value, str) or not sep:
        raise ConfigError(f'{key} = {value!r}: expected "START-END", e.g. "20000-40000"')
    start, end = _port(start_text, f"{key} = {value!r}"), _port(end_text, f"{key} = {value!r}")
    try:
        ports = PortRange(start, end)
    except MediaError as exc:
        raise ConfigError(f"{key} = {value!r}: {exc.reason}") from None
    if end - start < 3:
        raise ConfigError(f"{key} = {value!r}: a call needs 4 ports (RTP+RTCP per side)")
    if start < 1024:
        raise ConfigError(f"{key} = {value!r}: starts below 1024, among system services")
    return ports


def _entries(key: str, value: Any, parse: Callable[[str, str], T]) -> tuple[T, ...]:
    """Each entry of a list key parsed on its own: every bad entry is one problem, named by
    its position when the list has several (a single string is a list of one)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} = {value!r}: expected a non-empty list of strings")
    parsed: list[T] = []
    problems: list[str] = []
    for index, item in enumerate(value, 1):
        where = f" (entry {index} of {len(value)})" if len(value) > 1 else ""
        if not isinstance(item, str):
            problems.append(f"{key} = {item!r}{where}: expected a string")
            continue
        try:
            parsed.append(parse(key, item))
        except ConfigError as error:
            if where:  # "key = 'value': why" -> "key = 'value' (entry 2 of 3): why"
                head, sep, why = error.reason.partition(": ")
                problems.append(f"{head}{where}{sep}{why}")
            else:
                problems.append(error.reason)
    if problems:
        raise ConfigErrors(problems)
    return tuple(parsed)


def _network(key: str, item: str) -> Network:
    try:
        return ip_network(item, strict=False)
    except ValueError:
        raise ConfigError(f"{key} = {item!r}: not an IP address or network") from None


def _number(key: str, value: Any, what: str) -> float:
    """A finite TOML number (a flag's text that parses as one arrives as a number)."""
    if isinstance(value, str) and _parses_as_number(value):
        raise ConfigError(f"{key} = {value!r}: a string; write the number without quotes ({what})")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} = {value!r}: expected {what}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: not a finite number; expected {what}")
    return value


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _idle_timeout(key: str, value: Any) -> float:
    low, high = IDLE_TIMEOUT_RANGE
    what = f"a whole number of seconds from {low} to {high}"
    seconds = _number(key, value, what)
    if not low <= seconds <= high or seconds != int(seconds):
        raise ConfigError(
            f"{key} = {value!r}: expected {what} (it is the kernel's conntrack timeout of "
            "every relayed stream, which holds whole seconds)"
        )
    return float(seconds)


def _max_lifetime(key: str, value: Any) -> float:
    low, high = MAX_LIFETIME_RANGE
    what = f"a number of seconds from {low} to {high} ({high // 86_400} days)"
    seconds = _number(key, value, what)
    if not low <= seconds <= high:
        raise ConfigError(f"{key} = {value!r}: expected {what}")
    return float(seconds)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    return value


def _path(key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} = {value!r}: expected a path")
    return Path(value)


def _log_level(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _log_format(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_FORMATS:
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(LOG_FORMATS)}")
    return value.lower()


def _ctl_socket(key: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) < 2 or value[0] not in "@/":
        raise ConfigError(
            f"{key} = {value!r}: expected @NAME (an abstract socket, per network "
            "namespace) or an absolute /path"
        )
    if len(value.encode()) > 107:
        raise ConfigError(f"{key} = {value!r}: longer than a unix socket address allows")
    return value


def _policy(key: str, value: Any) -> Policy:
    try:
        return Policy(value)
    except ValueError:
        names = ", ".join(p.value for p in Policy)
        raise ConfigError(f"{key} = {value!r}: expected one of {names}") from None


def _redis_url(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} = {value!r}: expected redis://[:PASSWORD@]HOST:PORT[/DB]")
    if value.startswith("unix:///") and key == "pair.redis":
        return value  # the local Redis's socket
    scheme, sep, rest = value.partition("://")
    host, _, port_db = rest.rpartition("@")[2].partition(":")  # after [[USER]:PASSWORD@]
    port_text = port_db.partition("/")[0]
    if scheme != "redis" or not sep or not host or not port_text:
        raise ConfigError(
            f"{key} = {value!r}: expected redis://[:PASSWORD@]HOST:PORT[/DB]"
            + (" or unix:///PATH[?password=PASSWORD]" if key == "pair.redis" else "")
        )
    _port(port_text, f"{key} = {value!r}")
    return value


def _queue_num(key: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        raise ConfigError(f"{key} = {value!r}: a string; write the number without quotes")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{key} = {value!r}: expected an NFQUEUE number, a whole number 0-65535")
    return value


def _ng(key: str, value: Any) -> tuple[ControlAddress, ...]:
    """ng sockets: a list like `control`'s, which may be empty (ng off, the default)."""
    if value == []:
        return ()
    return _entries(key, value, lambda k, item: ControlAddress.parse(item, key="ng"))


def _ng_delete_delay(key: str, value: Any) -> int:
    low, high = NG_DELETE_DELAY_RANGE
    what = f"a whole number of seconds from {low} to {high}"
    seconds = _number(key, value, what)
    if not low <= seconds <= high or seconds != int(seconds):
        raise ConfigError(f"{key} = {value!r}: expected {what}")
    return int(seconds)


def _listen(key: str, value: Any) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT, HOST an IP address (no name lookups at startup)."""
    if not isinstance(value, str):
        raise ConfigError(f'{key} = {value!r}: expected IP:PORT, e.g. "127.0.0.1:9733"')
    if value.startswith("["):
        host, _, tail = value[1:].partition("]")
        port_text = tail.removeprefix(":") if tail.startswith(":") else ""
    else:
        host, _, port_text = value.rpartition(":")
    try:
        address = ip_address(host)
    except ValueError:
        raise ConfigError(
            f'{key} = {value!r}: expected IP:PORT or [IPv6]:PORT, e.g. "127.0.0.1:9733"'
        ) from None
    return str(address), _port(port_text, f"{key} = {value!r}")


# TOML layout: dotted key -> (Config field, converter)
KEYS: dict[str, tuple[str, Any]] = {
    "internal_ip": ("internal_ip", _ipv4),
    "external_ip": ("external_ip", _ipv4),
    "ports": ("ports", _ports),
    "control": (
        "control",
        lambda k, v: _entries(k, v, lambda key, item: ControlAddress.parse(item, key=key)),
    ),
    "allow": ("allow", lambda k, v: _entries(k, v, _network)),
    "state_dir": ("state_dir", _path),
    "log_level": ("log_level", _log_level),
    "sessions.max_lifetime": ("max_lifetime", _max_lifetime),
    "sessions.idle_timeout": ("idle_timeout", _idle_timeout),
    "kernel.rules": ("rules", _path),
    "kernel.flush_on_exit": ("flush_on_exit", _bool),
    "kernel.queue_num": ("queue_num", _queue_num),
    "latching.policy": ("policy", _policy),
    "pair.redis": ("pair_redis", _redis_url),
    "pair.peer_redis": ("pair_peer_redis", _redis_url),
    "ctl_socket": ("ctl_socket", _ctl_socket),
    "log_format": ("log_format", _log_format),
    "metrics.listen": ("metrics_listen", _listen),
    "relay_ips_may_appear_later": ("relay_ips_may_appear_later", _bool),
    "ng": ("ng", _ng),
    "ng_delete_delay": ("ng_delete_delay", _ng_delete_delay),
}


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def from_mapping(values: dict[str, Any], *, source: str = "config") -> Config:
    """Build a Config from dotted keys (TOML tables flattened, or flags).

    Raises ConfigErrors with every problem found: each key is checked on its own, then the
    checks across keys run on the keys that were valid."""
    problems: list[str] = []
    fields: dict[str, Any] = {}
    failed: set[str] = set()
    unknown = [key for key in values if key not in KEYS]
    for key in unknown:
        problems.append(f"{source}: unknown key {key!r}")
    if unknown:
        problems.append(f"{source}: known keys: {', '.join(sorted(KEYS))}")
    for key, value in values.items():
        if key in KEYS:
            name, convert = KEYS[key]
            try:
                fields[name] = convert(key, value)
            except ConfigError as error:
                problems += getattr(error, "problems", [error.reason])
                failed.add(key)
    if "internal_ip" not in values:
        problems.append(
            f"{source}: internal_ip is required: the relay IP Kamailio writes into SDP "
            "(an address of this host); set it in the file or with --internal-ip"
        )
    if ("pair.redis" in values) != ("pair.peer_redis" in values):
        problems.append(
            f"{source}: pair.redis and pair.peer_redis go together: a node of an "
            "active/standby pair needs its own Redis and its peer's (see the README, "
            "'An active/standby pair'); set both, or neither for a single node"
        )
    if "internal_ip" in fields:
        fields.setdefault("external_ip", fields["internal_ip"])
        if not failed & CROSS_CHECKED:  # a clash with a default the file did not mean
            problems += _clashes(Config(**fields))
    if problems:
        raise ConfigErrors(problems)
    return Config(**fields)


def some(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The Config fields of `keys` (by field name), each checked as `from_mapping` checks
    it, or its default when unset; the other keys of `values` are not looked at. For a
    command that needs a few keys of a configuration that may not run a node: `lrkp-tsl
    flush` with the packaged file before internal_ip is set, or a file being removed."""
    problems: list[str] = []
    fields: dict[str, Any] = {}
    for key in keys:
        name, convert = KEYS[key]
        if key not in values:
            fields[name] = Config.__dataclass_fields__[name].default
            continue
        try:
            fields[name] = convert(key, values[key])
        except ConfigError as error:
            problems += getattr(error, "problems", [error.reason])
    if problems:
        raise ConfigErrors(problems)
    return fields


CROSS_CHECKED = {"internal_ip", "external_ip", "ports", "control", "metrics.listen", "ng"}


def _clashes(config: Config) -> list[str]:
    """Checks across keys, on a Config whose keys are each valid."""
    problems = []
    for key, addresses in (("control", config.control), ("ng", config.ng)):
        for address in addresses:
            on_relay_ip = address.host in ("0.0.0.0", *map(str, config.relay_addrs))
            if address.scheme == "udp" and on_relay_ip and address.port in config.ports:
                problems.append(
                    f"{key} = {str(address)!r}: port {address.port} is inside the relay port "
                    f"range ports = {str(config.ports)!r} on a relay address: calls are put on "
                    "that port too, and their packets and the commands would be taken for "
                    "each other; move one of them"
                )
    for address in config.ng:
        if address in config.control:
            problems.append(
                f"ng = {str(address)!r}: control has the same address; one socket serves one "
                "protocol: give ng its own port (rtpengine's is 2223)"
            )
    if config.metrics_listen is not None:
        host, port = config.metrics_listen
        if host in ("0.0.0.0", *map(str, config.relay_addrs)) and port in config.ports:
            problems.append(
                f"metrics.listen = '{host}:{port}': port {port} is inside the relay port "
                f"range ports = {str(config.ports)!r} on a relay address; move one of them"
            )
    return problems


PRIVILEGED_PORTS = 1024


def warnings(config: Config) -> list[str]:
    """What is valid but will likely go wrong (check-config prints these, run logs them)."""
    found = []
    listening = [(f"control = {str(a)!r}", a.port) for a in config.control if a.scheme != "unix"]
    listening += [(f"ng = {str(a)!r}", a.port) for a in config.ng]
    if config.metrics_listen is not None:
        listening.append(
            (f"metrics.listen = '{_shown(config.metrics_listen)}'", config.metrics_listen[1])
        )
    for what, port in listening:
        if port < PRIVILEGED_PORTS:
            found.append(
                f"{what}: port {port} is below {PRIVILEGED_PORTS}: binding it needs "
                "CAP_NET_BIND_SERVICE, which root has but the packaged systemd unit does not "
                "grant (docs/systemd.md); choose a port from 1024 up, or add the capability"
            )
    return found


def load(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Read `path` (if any), apply `overrides` (dotted keys, from flags), validate."""
    return from_mapping(read(path, overrides), source=str(path) if path else "flags")


def read(path: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys `path` (if any) and `overrides` set, unchecked; flags win."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = _flatten(tomllib.loads(path.read_text()))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def _shown(value: Any) -> str:
    """A value as an operator writes it in the file (not a Python repr)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Policy):
        return value.value
    if isinstance(value, float):
        return f"{value:g} s"
    if value == ():
        return "none"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        host, port = value
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return str(value)


def describe(config: Config, given: set[str] | None = None) -> list[tuple[str, str]]:
    """(key, value as text) for every key, in the documented order; a key not in `given`
    (the keys the file or flags set) is marked as the default."""
    rows = []
    for key, (name, _convert) in KEYS.items():
        text = _shown(getattr(config, name))
        if given is not None and key not in given:
            text += "  (default)"
        rows.append((key, text))
    return rows


def default_texts() -> dict[str, str]:
    """Each key's default as an operator reads it (`run --help`; docs/config.md's column)."""
    placeholder = IPv4Address("192.0.2.1")
    shown = dict(describe(Config(internal_ip=placeholder, external_ip=placeholder)))
    return shown | {"internal_ip": "none, required", "external_ip": "internal_ip"}
