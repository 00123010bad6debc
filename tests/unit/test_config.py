from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from lrkp_tsl.config import Config, ControlAddress, from_mapping, load
from lrkp_tsl.errors import ConfigError


def test_defaults_need_only_the_internal_ip() -> None:
    config = from_mapping({"internal_ip": "192.0.2.10"})
    assert config.external_ip == IPv4Address("192.0.2.10")
    assert [str(c) for c in config.control] == ["udp:127.0.0.1:22333"]
    assert str(config.ports) == "20000-40000"
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
        ({"internal_ip": "10.0.0.1", "allow": ["nowhere"]}, "'nowhere' is not an IP"),
        ({"internal_ip": "10.0.0.1", "sessions.max_lifetime": 0}, "positive number"),
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
