"""The pair tests run examples/redis-pair.conf and examples/keepalived.conf as shipped:
what the lab fills in is addresses, interfaces and paths, and nothing else (shown here,
line by line)."""

from __future__ import annotations

import difflib
from pathlib import Path

from lrkp_lab.pairlab import KEEPALIVED_EXAMPLE
from lrkp_lab.pairlab import example_config as keepalived_config
from lrkp_lab.pairlab import example_substitutions as keepalived_substitutions
from lrkp_lab.redis import EXAMPLE as REDIS_EXAMPLE
from lrkp_lab.redis import example_config as redis_config
from lrkp_lab.redis import example_substitutions as redis_substitutions


def changed(shipped: str, used: str) -> list[tuple[str, str]]:
    """(shipped line, line used) for every line the lab changed."""
    pairs: list[tuple[str, str]] = []
    matcher = difflib.SequenceMatcher(a=shipped.splitlines(), b=used.splitlines())
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        assert tag in ("equal", "replace"), (tag, shipped.splitlines()[a0:a1])
        assert a1 - a0 == b1 - b0  # no line added or removed
        pairs += zip(shipped.splitlines()[a0:a1], used.splitlines()[b0:b1], strict=True)
    return [(a, b) for a, b in pairs if a != b]


def test_redis_pair_conf_is_used_as_shipped_but_for_address_and_paths(tmp_path: Path) -> None:
    substitutions = redis_substitutions("10.201.1.1", tmp_path)
    used = redis_config("10.201.1.1", tmp_path)
    lines = changed(REDIS_EXAMPLE.read_text(), used)
    for shipped, now in lines:
        print(f"- {shipped}\n+ {now}")
        old = next(old for old in substitutions if old in shipped)
        assert now == shipped.replace(old, substitutions[old])
    # the settings that matter, untouched
    for setting in ("protected-mode no", "port 6379", "repl-diskless-sync-delay 0", 'save ""'):
        assert setting in used.splitlines()
    # only the bind line, the socket, pid, log and dir (comments naming them aside)
    assert {now.split()[0] for _, now in lines if not now.startswith("#")} == {
        "bind", "unixsocket", "pidfile", "logfile", "dir",
    }  # fmt: skip


def test_keepalived_conf_is_used_as_shipped_but_for_its_placeholders() -> None:
    for host in ("relay", "relay2"):
        substitutions = keepalived_substitutions(host)
        for shipped, now in changed(KEEPALIVED_EXAMPLE.read_text(), keepalived_config(host)):
            print(f"- {shipped}\n+ {now}")
            expected = shipped
            for old, new in substitutions.items():
                expected = expected.replace(old, new)
            assert now == expected and any(old in shipped for old in substitutions)
