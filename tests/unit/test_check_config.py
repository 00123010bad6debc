"""`lrkp-tsl check-config`: every problem at once, and a summary an operator can read."""

from __future__ import annotations

import argparse
from ipaddress import IPv4Address, ip_network
from pathlib import Path

import pytest

from lrkp_tsl import cli, config, hostcheck
from lrkp_tsl.config import KEYS, ConfigErrors, from_mapping
from lrkp_tsl.hostcheck import Findings, address_findings


@pytest.fixture(autouse=True)
def quiet_host(monkeypatch: pytest.MonkeyPatch) -> list[Findings]:
    """The host checks read the host (tests/netns/test_startup.py runs them for real): here
    they find what the test says, nothing by default."""
    found = [Findings()]
    monkeypatch.setattr(hostcheck, "check", lambda _config, *, at_start: found[0])
    return found


BAD = """\
internal_ip = "10.0.0.1"
ports = "200-100"
log_level = "loud"
[sessions]
idle_timeuot = 5
max_lifetime = -1
[metrics]
listen = "localhost:9733"
"""


def test_every_problem_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(BAD)
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    for expected in (
        "unknown key 'sessions.idle_timeuot'",
        "ports = '200-100'",
        "log_level = 'loud'",
        "sessions.max_lifetime = -1",
        "metrics.listen = 'localhost:9733'",
    ):
        assert expected in err, err
    assert "(6 problems)" in err  # the five, and one line listing the known keys
    assert err.count("\n  - ") == 6


def test_problems_are_a_list_and_one_reads_as_before() -> None:
    with pytest.raises(ConfigErrors) as caught:
        from_mapping({"internal_ip": "nope", "ports": "1", "kernel.queue_num": -1})
    assert len(caught.value.problems) == 3
    with pytest.raises(ConfigErrors) as single:
        from_mapping({"internal_ip": "10.0.0.1", "log_level": "loud"})
    assert single.value.problems == [single.value.reason]


def test_missing_internal_ip_and_half_a_pair_are_both_reported() -> None:
    with pytest.raises(ConfigErrors) as caught:
        from_mapping({"pair.redis": "redis://127.0.0.1:6379"})
    text = caught.value.reason
    assert "internal_ip is required" in text and "go together" in text


def test_no_clash_is_reported_against_a_default_the_file_did_not_mean() -> None:
    """A bad `ports` must not make a good `control` look inside the default range."""
    with pytest.raises(ConfigErrors) as caught:
        from_mapping({"internal_ip": "10.0.0.1", "ports": "200-100",
                      "control": ["udp:10.0.0.1:30000"]})  # fmt: skip
    assert caught.value.problems == ["ports = '200-100': port range 200-100 starts after it ends"]


def test_summary_lists_every_key_readably(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "node.toml"
    path.write_text('internal_ip = "10.0.0.1"\n[metrics]\nlisten = "[::1]:9733"\n')
    assert cli.main(["check-config", "--config", str(path), "--ports", "30000-30999"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"lrkp-tsl: configuration OK ({path})"
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert set(rows) == set(KEYS)
    assert rows["internal_ip"] == "10.0.0.1"
    assert rows["ports"] == "30000-30999"
    assert rows["metrics.listen"] == "[::1]:9733"
    assert rows["allow"] == "127.0.0.0/8, ::1/128  (default)"
    assert rows["sessions.idle_timeout"] == "60 s  (default)"
    for python in ("Config(", "IPv4Address(", "PosixPath(", "Policy.", "PortRange("):
        assert python not in out


def test_default_file_is_read_when_no_config_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = tmp_path / "lrkp-tsl.toml"
    monkeypatch.setattr(config, "DEFAULT_CONFIG", default)
    assert cli.main(["check-config", "--internal-ip", "10.0.0.1"]) == 0
    assert "flags only" in capsys.readouterr().out  # absent: flags only
    default.write_text('internal_ip = "10.0.0.2"\n')
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert str(default) in out and "10.0.0.2" in out
    # --config /dev/null: flags only, whatever the default file holds
    assert cli.main(["check-config", "--config", "/dev/null", "--internal-ip", "10.0.0.3"]) == 0
    assert "10.0.0.3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9733", ("127.0.0.1", 9733)),
        ("[::1]:9733", ("::1", 9733)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_metrics_listen(text: str, expected: tuple[str, int]) -> None:
    assert from_mapping({"internal_ip": "10.0.0.1", "metrics.listen": text}).metrics_listen == (
        expected
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9733", "expected IP:PORT"),
        ("127.0.0.1:", "port '' is not a number"),
        ("10.0.0.1:30000", "inside the relay port range"),
        ("[::1]", "not a number"),
    ],
)
def test_bad_metrics_listen(text: str, message: str) -> None:
    with pytest.raises(ConfigErrors, match=message.replace("[", r"\[")):
        from_mapping({"internal_ip": "10.0.0.1", "metrics.listen": text, "ports": "30000-30999"})


LOCAL = [ip_network("127.0.0.0/8"), ip_network("10.0.0.1/32"), ip_network("::1/128")]


def test_a_relay_ip_on_no_interface_warns_at_check_and_refuses_at_run() -> None:
    node = from_mapping({"internal_ip": "10.0.0.1", "external_ip": "198.51.100.7"})
    checked = address_findings(node, LOCAL, at_start=False)
    assert checked.problems == []
    (warning,) = checked.warnings
    assert warning.startswith("external_ip = '198.51.100.7': no interface of this host")
    assert "relay_ips_may_appear_later = true" in warning and "`run` refuses" in warning
    started = address_findings(node, LOCAL, at_start=True)
    assert started.warnings == [] and len(started.problems) == 1
    assert started.problems[0].startswith("external_ip = '198.51.100.7'")


def test_a_vip_that_comes_later_or_a_pair_is_not_refused() -> None:
    later = from_mapping({"internal_ip": "192.0.2.50", "relay_ips_may_appear_later": True,
                          "control": ["udp:192.0.2.50:22333"]})  # fmt: skip
    assert address_findings(later, LOCAL, at_start=True) == Findings()
    pair = from_mapping({"internal_ip": "192.0.2.50", "pair.redis": "redis://127.0.0.1:6379",
                         "pair.peer_redis": "redis://10.0.0.2:6379",
                         "control": ["udp:192.0.2.50"]})  # fmt: skip
    assert address_findings(pair, LOCAL, at_start=True) == Findings()


def test_listening_addresses_not_on_this_host_are_warned_of() -> None:
    node = from_mapping({"internal_ip": "10.0.0.1", "control": ["udp:10.0.0.9:22333",
                         "udp:0.0.0.0:5000", "udp6:[::]:5000", "unix:/run/x.sock",
                         "udp:127.0.0.2:5000"], "metrics.listen": "10.0.0.8:9733"})  # fmt: skip
    found = address_findings(node, LOCAL, at_start=True)
    assert found.problems == []
    assert [w.split(" ", 1)[0] for w in found.warnings] == ["control", "metrics.listen"]
    assert "10.0.0.9 is no address of this host" in found.warnings[0]


def test_check_config_lists_host_problems_and_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet_host: list[Findings]
) -> None:
    quiet_host[0] = Findings(["kernel.rules = '/x': the kernel refuses it: nope"], ["mind this"])
    args = ["check-config", "--config", "/dev/null", "--internal-ip", "10.0.0.1"]
    assert cli.main(args) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "bad configuration (1 problem):\n  - kernel.rules = '/x': the kernel refuses it" in err
    assert "lrkp-tsl: warning: mind this" in err
    quiet_host[0] = Findings([], ["mind this"])
    assert cli.main([*args, "--control", "udp:127.0.0.1:53"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("lrkp-tsl: configuration OK")
    assert "lrkp-tsl: warning: control = 'udp:127.0.0.1:53': port 53 is below 1024" in captured.err
    assert "lrkp-tsl: warning: mind this" in captured.err


def test_run_help_shows_every_default_from_the_code() -> None:
    """Each flag's help ends with its key's default as Config holds it: never copied."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = subparsers.choices["run"]
    helps = {flag: action.help for action in run._actions for flag in action.option_strings}
    defaults = config.default_texts()
    assert set(cli.FLAGS) == set(KEYS)
    for key, (flag, _options, _what) in cli.FLAGS.items():
        help_text = str(helps[flag])
        assert help_text.endswith(f"(default: {defaults[key]})"), (flag, help_text)
    ip = IPv4Address("192.0.2.1")
    code = dict(config.describe(config.Config(internal_ip=ip, external_ip=ip)))
    assert defaults["ports"] == code["ports"] == str(config.DEFAULT_PORTS)
    assert defaults["sessions.idle_timeout"] == "60 s"
    text = run.format_help()
    assert "(default: 30000-40000)" in text and "(default: udp:127.0.0.1:22333)" in text


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--idle-timeout", "nan", "sessions.idle_timeout = nan: not a finite number"),
        ("--idle-timeout", "inf", "sessions.idle_timeout = inf: not a finite number"),
        ("--idle-timeout", "1e12", "sessions.idle_timeout = 1000000000000.0: expected a whole"),
        ("--idle-timeout", "soon", "sessions.idle_timeout = 'soon': expected a whole number"),
        ("--max-lifetime", "nan", "sessions.max_lifetime = nan: not a finite number"),
        ("--max-lifetime", "inf", "sessions.max_lifetime = inf: not a finite number"),
        ("--queue-num", "70000", "kernel.queue_num = 70000: expected an NFQUEUE number"),
        ("--queue-num", "1.5", "kernel.queue_num = 1.5: expected an NFQUEUE number"),
    ],
)
def test_bad_numbers_in_flags_exit_2_naming_the_key(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("check-config", "run"):
        argv = [command, "--config", "/dev/null", "--internal-ip", "10.0.0.1", flag, value]
        assert cli.main(argv) == cli.EXIT_CONFIG
        assert message in capsys.readouterr().err


def test_all_bad_numbers_are_listed_together(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check-config", "--config", "/dev/null", "--internal-ip", "10.0.0.1",
            "--idle-timeout", "nan", "--max-lifetime", "inf", "--queue-num", "-1"]  # fmt: skip
    assert cli.main(argv) == cli.EXIT_CONFIG
    assert "(3 problems)" in capsys.readouterr().err


def test_the_start_banner_says_when_no_config_file_was_found() -> None:
    from lrkp_tsl.daemon import banner

    node = from_mapping({"internal_ip": "10.0.0.1", "metrics.listen": "127.0.0.1:9733"})
    text = banner(node, None)
    assert "starting: no config file (/etc/lrkp-tsl/lrkp-tsl.toml not found: flags only)" in text
    assert "ports 30000-40000" in text and "control udp:127.0.0.1:22333" in text
    assert "metrics 127.0.0.1:9733" in text
    assert f"config {Path('/etc/x.toml')};" in banner(node, Path("/etc/x.toml"))
