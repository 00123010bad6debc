"""docs/config.md documents exactly the keys the code knows, with their flags and defaults."""

from __future__ import annotations

import argparse
import re
from ipaddress import IPv4Address
from pathlib import Path

from lrkp_tsl import cli
from lrkp_tsl.config import KEYS, Config, describe

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
ROW = re.compile(r"^\| `([a-z_.]+)` \| `(--[a-z-]+)`[^|]* \| ([^|]+) \|")
# Defaults that depend on another key or on where the node is installed.
DERIVED = {
    "internal_ip": "required",
    "external_ip": "same as `internal_ip`",
    "kernel.rules": "`lrkp_tsl/rules/lrkp.nft` of the installed package",
}


def documented() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            key, flag, default = match.groups()
            assert key not in rows, f"{key} documented twice"
            rows[key] = (flag, default.strip())
    return rows


def test_documented_keys_are_the_codes_keys() -> None:
    assert set(documented()) == set(KEYS)


def test_documented_defaults_are_the_codes_defaults() -> None:
    ip = IPv4Address("192.0.2.1")
    defaults = dict(describe(Config(internal_ip=ip, external_ip=ip)))
    for key, (_flag, default) in documented().items():
        if key in DERIVED:
            assert default == DERIVED[key], key
        else:
            assert default == f"`{defaults[key]}`", key
    assert str(Config.__dataclass_fields__["rules"].default).endswith("rules/lrkp.nft")


def test_documented_flags_set_their_keys() -> None:
    """Each flag in the doc is an option of `lrkp-tsl run` and sets that key."""
    parser = cli.build_parser()
    run = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices["run"]
    by_flag = {flag: action.dest for action in run._actions for flag in action.option_strings}
    marked = argparse.Namespace(**{dest: f"<{dest}>" for dest in by_flag.values()})
    key_of_dest = {value: key for key, value in cli.overrides(marked).items()}
    for key, (flag, _default) in documented().items():
        assert flag in by_flag, f"{key}: {flag} is not a flag of lrkp-tsl run"
        assert key_of_dest.get(f"<{by_flag[flag]}>") == key, f"{flag} does not set {key}"
