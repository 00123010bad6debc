"""`lrkp-tsl check-config`: every problem at once, and a summary an operator can read."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrkp_tsl import cli, config
from lrkp_tsl.config import KEYS, ConfigErrors, from_mapping

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
