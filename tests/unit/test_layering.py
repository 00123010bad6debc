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
    "pairhealth",
    "ng/__init__",
    "ng/bencode",
    "ng/flags",
    "ng/sdp",
    "ng/codec",
    "ng/allocator",
    "ng/callmodel",
    "ng/adapter",
    "operations",
    "frontends/__init__",
    "frontends/lrkproxy",
    "frontends/ng",
    "ng/record",
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
    "redis",
    "lrkp_tsl.replication",
    "lrkp_tsl.publishing",
    "lrkp_tsl.pair",
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


# The engine takes protocol-neutral operations (operations.py); each control protocol is
# an adapter in lrkp_tsl/frontends/ over it. What is a protocol's stays out of the engine,
# the call table, the records and the store.
NEUTRAL = ["engine", "session", "records", "store", "operations", "traffic", "activity", "kernel"]
PROTOCOL_SPECIFIC = (
    "lrkp_tsl.protocol",
    "lrkp_tsl.admission",
    "lrkp_tsl.retransmit",
    "lrkp_tsl.ng",
    "lrkp_tsl.frontends",
)


@pytest.mark.parametrize("module", NEUTRAL)
def test_the_engine_side_imports_no_protocol(module: str) -> None:
    bad = {
        name
        for name in imports(module)
        if any(name == p or name.startswith(p + ".") for p in PROTOCOL_SPECIFIC)
    }
    assert not bad, f"lrkp_tsl/{module}.py imports {sorted(bad)}: protocols are front-ends"


ROOT = PACKAGE.parent
# What only the lab and the tests may use: the shipped node never imports them.
NOT_SHIPPED = ("lrkp_lab", "tests", "rich", "scapy", "hypothesis", "pytest")


def _imported_names(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_the_node_imports_nothing_of_the_lab_or_the_tests(path: Path) -> None:
    bad = sorted(n for n in _imported_names(path) if _under(n, NOT_SHIPPED))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_no_test_module(path: Path) -> None:
    bad = sorted(n for n in _imported_names(path) if _under(n, ("tests",)))
    assert not bad, f"bench/{path.name} imports {bad}"


def test_lrkp_ctl_loads_none_of_the_daemons_machinery() -> None:
    """Run in a fresh interpreter: what `import lrkp_tsl.ctl` really loads, transitively."""
    import subprocess
    import sys

    probe = "import sys, lrkp_tsl.ctl; print('\\n'.join(sorted(m for m in sys.modules)))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT
        ).stdout.split()
    )
    machinery = (
        "nftables",
        "netfilterqueue",
        "pyroute2",
        "sqlite3",
        "asyncio",
        "redis",
        "prometheus_client",
        "lrkp_tsl.engine",
        "lrkp_tsl.daemon",
        "lrkp_tsl.mgmt",
        "lrkp_tsl.server",
        "lrkp_tsl.store",
        "lrkp_tsl.dataplane",
    )
    bad = sorted(m for m in loaded if _under(m, machinery))
    assert not bad, f"import lrkp_tsl.ctl loads {bad}"
