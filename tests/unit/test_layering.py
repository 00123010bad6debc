"""The pure core imports no I/O: it is tested without root, sockets or a kernel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PURE = [
    "media",
    "protocol",
    "retransmit",
    "session",
    "latching",
    "activity",
    "config",
    "errors",
    "defaults",
    "engine",
    "kernel",
    "records",
    "schedule",
    "admission",
    "ports",
    "ratelog",
    "traffic",
]
FORBIDDEN = {
    "socket",
    "asyncio",
    "subprocess",
    "select",
    "nftables",
    "netfilterqueue",
    "pyroute2",
    "lrkp_tsl.dataplane",
    "lrkp_tsl.server",
    "lrkp_tsl.daemon",
    "lrkp_tsl.store",
    "sqlite3",
    "time",
}
PACKAGE = Path(__file__).resolve().parents[2] / "lrkp_tsl"


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    bad = {
        name
        for name in imports(module)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"lrkp_tsl/{module}.py imports {sorted(bad)}"
