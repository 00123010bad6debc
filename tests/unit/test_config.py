from __future__ import annotations

import math
import re
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from lrkp_tsl import cli
from lrkp_tsl.config import (
    DEFAULT_CONTROL_PORT,
    DEFAULT_PORTS,
    Config,
    ConfigErrors,
    ControlAddress,
    from_mapping,
    load,
    warnings,
)
from lrkp_tsl.errors import ConfigError


def test_defaults_need_only_the_internal_ip() -> None:
    config = from_mapping({"internal_ip": "192.0.2.10"})
    assert config.external_ip == IPv4Address("192.0.2.10")
    assert [str(c) for c in config.control] == ["udp:127.0.0.1:22333"]
    assert str(config.ports) == "30000-40000"
    assert config.max_lifetime == 3600 and config.idle_timeout == 60
    assert config.relay_addrs == (IPv4Address("192.0.2.10"),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("udp:10.0.0.1:5000", ControlAddress("udp", "10.0.0.1", 5000)),
        ("udp:10.0.0.1", ControlAddress("udp", "10.0.0.1", 22333)),
        ("udp6:[::1]:5000", ControlAddress("udp6", "::1", 5000)),
        ("unix:/run/lrkp.sock", ControlAddress("unix", path="/run/lrkp.sock")),
    ],
)
def test_control_addresses_in_lrkproxy_sock_syntax(text: str, expected: ControlAddress) -> None:
    assert ControlAddress.parse(text) == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "internal_ip is required"),
        ({"internal_ip": "fe80::1"}, "internal_ip = 'fe80::1': not an IPv4 address"),
        ({"internal_ip": "10.0.0.1", "ports": "20000"}, 'expected "START-END"'),
        ({"internal_ip": "10.0.0.1", "ports": "200-4000"}, "below 1024"),
        ({"internal_ip": "10.0.0.1", "ports": "20000-20001"}, "needs 4 ports"),
        ({"internal_ip": "10.0.0.1", "control": ["tcp:1.2.3.4"]}, "control = 'tcp:1.2.3.4'"),
        ({"internal_ip": "10.0.0.1", "control": ["udp6:::1"]}, "udp6:[ADDR]:PORT"),
        ({"internal_ip": "10.0.0.1", "control": ["udp:::1"]}, "not an IP address"),
        ({"internal_ip": "10.0.0.1", "control": ["udp:10.0.0.1:99999"]}, "outside 1-65535"),
        ({"internal_ip": "10.0.0.1", "control": ["udp:0.0.0.0:30000"]}, "inside the relay"),
        ({"internal_ip": "10.0.0.1", "allow": ["nowhere"]}, "allow = 'nowhere': not an IP"),
        ({"internal_ip": "10.0.0.1", "sessions.max_lifetime": 0}, "from 1 to 2592000"),
        ({"internal_ip": "10.0.0.1", "kernel.flush_on_exit": "yes"}, "true or false"),
        ({"internal_ip": "10.0.0.1", "log_level": "loud"}, "one of debug"),
        ({"internal_ip": "10.0.0.1", "port": "1"}, "unknown key 'port'"),
    ],
)
def test_bad_values_name_key_value_and_why(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_mapping(values)


def test_toml_file_with_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        'internal_ip = "10.0.0.1"\nexternal_ip = "203.0.113.1"\nports = "30000-30999"\n'
        'control = ["udp:10.0.0.1:22333"]\nallow = ["10.0.0.0/24"]\n'
        "[sessions]\nidle_timeout = 30\nmax_lifetime = 7200\n[kernel]\nflush_on_exit = true\n"
    )
    config = load(path, {"ports": "31000-31999", "log_level": None})
    assert isinstance(config, Config)
    assert str(config.ports) == "31000-31999"  # the flag wins
    assert config.idle_timeout == 30 and config.max_lifetime == 7200 and config.flush_on_exit


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "missing.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("internal_ip = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad, {})


def test_a_pair_needs_both_redis_urls_and_checks_them() -> None:
    config = from_mapping({"internal_ip": "10.0.0.1", "pair.redis": "redis://127.0.0.1:6379",
                           "pair.peer_redis": "redis://10.0.0.2:6379/0"})  # fmt: skip
    assert config.paired and config.pair_peer_redis == "redis://10.0.0.2:6379/0"
    with pytest.raises(ConfigError, match="go together"):
        from_mapping({"internal_ip": "10.0.0.1", "pair.redis": "redis://127.0.0.1:6379"})
    with pytest.raises(ConfigError, match=r"expected redis://\[:PASSWORD@\]HOST:PORT"):
        from_mapping({"internal_ip": "10.0.0.1", "pair.redis": "http://x",
                      "pair.peer_redis": "redis://h:1"})  # fmt: skip
    # With a password (requirepass): examples/redis-pair.conf says how.
    config = from_mapping({"internal_ip": "10.0.0.1",
                           "pair.redis": "unix:///run/redis/redis-server.sock?password=s3",
                           "pair.peer_redis": "redis://:s3@10.0.0.2:6379"})  # fmt: skip
    assert config.pair_peer_redis == "redis://:s3@10.0.0.2:6379"


@pytest.mark.parametrize("internal_ip", ["192.0.2.10", "127.0.0.1", "10.0.0.1", "203.0.113.7"])
def test_the_defaults_never_conflict(internal_ip: str) -> None:
    """Every default fits every other, whatever the relay IP, with the control address on
    the relay IP at the default port (the usual `control = ["udp:INTERNAL_IP"]`)."""
    assert DEFAULT_CONTROL_PORT not in DEFAULT_PORTS
    from_mapping({"internal_ip": internal_ip})
    from_mapping({"internal_ip": internal_ip, "control": [f"udp:{internal_ip}"]})
    from_mapping({"internal_ip": internal_ip, "control": ["udp:0.0.0.0"]})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sessions.idle_timeout", math.nan, "nan: not a finite number"),
        ("sessions.idle_timeout", math.inf, "inf: not a finite number"),
        ("sessions.idle_timeout", -math.inf, "-inf: not a finite number"),
        # The kernel wrapped this to a timeout of a second: a live call ended at once.
        ("sessions.idle_timeout", 1e12, "from 1 to 86400"),
        ("sessions.idle_timeout", 86401, "from 1 to 86400"),
        ("sessions.idle_timeout", 0, "from 1 to 86400"),
        ("sessions.idle_timeout", 0.5, "from 1 to 86400"),
        ("sessions.idle_timeout", 2.5, "whole seconds"),
        ("sessions.idle_timeout", "60", "a string; write the number without quotes"),
        ("sessions.idle_timeout", "soon", "expected a whole number of seconds"),
        ("sessions.idle_timeout", True, "expected a whole number of seconds"),
        ("sessions.max_lifetime", math.nan, "nan: not a finite number"),
        ("sessions.max_lifetime", math.inf, "inf: not a finite number"),
        ("sessions.max_lifetime", 1e12, "from 1 to 2592000"),
        ("sessions.max_lifetime", -1, "from 1 to 2592000"),
        ("sessions.max_lifetime", "3600", "a string; write the number without quotes"),
        ("sessions.max_lifetime", False, "expected a number of seconds"),
        ("kernel.queue_num", 65536, "0-65535"),
        ("kernel.queue_num", -1, "0-65535"),
        ("kernel.queue_num", 5.0, "0-65535"),
        ("kernel.queue_num", math.nan, "0-65535"),
        ("kernel.queue_num", "5", "a string; write the number without quotes"),
        ("kernel.queue_num", True, "0-65535"),
        ("kernel.flush_on_exit", "true", "expected true or false"),
        ("kernel.flush_on_exit", 1, "expected true or false"),
        ("relay_ips_may_appear_later", "yes", "expected true or false"),
        ("ports", 30000, 'expected "START-END"'),
        ("ports", "0-40000", "outside 1-65535"),
        ("ports", "30000-65536", "outside 1-65535"),
        ("ports", "30000-inf", "is not a number"),
        ("metrics.listen", "127.0.0.1:0", "outside 1-65535"),
        ("metrics.listen", "127.0.0.1:70000", "outside 1-65535"),
        ("control", ["udp:10.0.0.1:0"], "outside 1-65535"),
        ("internal_ip", "0.0.0.0", "not a unicast address"),
        ("external_ip", "224.0.0.1", "not a unicast address"),
        ("external_ip", "255.255.255.255", "not a unicast address"),
    ],
)
def test_every_number_and_flag_has_a_checked_range(key: str, value: object, message: str) -> None:
    values = {"internal_ip": "10.0.0.1", key: value}
    with pytest.raises(ConfigErrors) as caught:
        from_mapping(values)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{key} = "), problem
    assert message in problem, problem


def test_numbers_in_range_are_taken() -> None:
    config = from_mapping({"internal_ip": "10.0.0.1", "sessions.idle_timeout": 86400.0,
                           "sessions.max_lifetime": 0.5 + 1, "kernel.queue_num": 0})  # fmt: skip
    assert config.idle_timeout == 86400 and config.max_lifetime == 1.5 and config.queue_num == 0


def test_each_bad_entry_of_a_list_key_is_its_own_problem() -> None:
    with pytest.raises(ConfigErrors) as caught:
        from_mapping({
            "internal_ip": "10.0.0.1",
            "control": ["udp:127.0.0.1:5000", "tcp:1.2.3.4", 7, "udp:127.0.0.1:99999"],
            "allow": ["10.0.0.0/8", "nowhere", "::1", "10.0.0.300"],
        })  # fmt: skip
    assert caught.value.problems == [
        "control = 'tcp:1.2.3.4' (entry 2 of 4): expected udp:IP[:PORT], udp6:[IP][:PORT] "
        "or unix:/path",
        "control = 7 (entry 3 of 4): expected a string",
        "control = 'udp:127.0.0.1:99999' (entry 4 of 4): port 99999 is outside 1-65535",
        "allow = 'nowhere' (entry 2 of 4): not an IP address or network",
        "allow = '10.0.0.300' (entry 4 of 4): not an IP address or network",
    ]


def test_ports_below_1024_are_a_warning() -> None:
    control = ["udp:127.0.0.1:53", "unix:/run/x.sock", "udp:127.0.0.1:5000"]
    config = from_mapping(
        {"internal_ip": "10.0.0.1", "control": control, "metrics.listen": "[::1]:80"}
    )
    found = warnings(config)
    assert len(found) == 2
    assert found[0].startswith("control = 'udp:127.0.0.1:53': port 53 is below 1024")
    assert found[1].startswith("metrics.listen = '[::1]:80': port 80 is below 1024")
    assert "CAP_NET_BIND_SERVICE" in found[0]
    assert warnings(from_mapping({"internal_ip": "10.0.0.1"})) == []


def test_ng_sockets_are_off_by_default_and_take_udp_addresses_on_port_2223() -> None:
    assert from_mapping({"internal_ip": "10.0.0.1"}).ng == ()
    assert from_mapping({"internal_ip": "10.0.0.1", "ng": []}).ng == ()
    got = from_mapping({"internal_ip": "10.0.0.1", "ng": ["udp:10.0.0.1", "udp6:[::1]:2224"]}).ng
    assert got == (ControlAddress("udp", "10.0.0.1", 2223), ControlAddress("udp6", "::1", 2224))
    assert from_mapping({"internal_ip": "10.0.0.1", "ng": "udp:10.0.0.1:9"}).ng[0].port == 9


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ng": ["unix:/run/ng.sock"]}, "ng = 'unix:/run/ng.sock': expected udp:IP[:PORT]"),
        ({"ng": ["udp:10.0.0.1:30002"]}, "ng = 'udp:10.0.0.1:30002': port 30002 is inside"),
        (
            {"ng": ["udp:127.0.0.1:22333"]},
            "ng = 'udp:127.0.0.1:22333': control has the same address",
        ),
        ({"ng_delete_delay": 3601}, "ng_delete_delay = 3601: expected a whole number"),
        ({"ng_delete_delay": 1.5}, "ng_delete_delay = 1.5: expected a whole number"),
    ],
)
def test_bad_ng_values_are_refused_with_why(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_mapping({"internal_ip": "10.0.0.1", **values})


def test_the_ng_flag_repeats_and_sets_the_ng_key() -> None:
    args = cli.build_parser().parse_args(
        ["run", "--internal-ip", "10.0.0.1", "--ng", "udp:10.0.0.1", "--ng", "udp:127.0.0.1",
         "--ng-delete-delay", "30"]
    )  # fmt: skip
    got = from_mapping({k: v for k, v in cli.overrides(args).items() if v is not None})
    assert [str(a) for a in got.ng] == ["udp:10.0.0.1:2223", "udp:127.0.0.1:2223"]
    assert got.ng_delete_delay == 30
    assert any("ng = 'udp:10.0.0.1:80'" in w for w in warnings(
        from_mapping({"internal_ip": "10.0.0.1", "ng": ["udp:10.0.0.1:80"]})
    ))  # fmt: skip
