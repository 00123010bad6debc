"""The node's native dependencies, checked before anything touches the kernel.

The node drives nftables through libnftables' official Python binding, which is not on
PyPI: Debian ships it as `python3-nftables`, built against the installed `libnftables1`.
A node installed with pip into a virtualenv cannot see Debian's dist-packages, so a missing
`import nftables` is resolved here, once, by loading Debian's copy by its path (a pure
Python module over ctypes; it is what `python3-nftables` installs for /usr/bin/python3).
Whatever happens is said at start: which binding was loaded from where, or what is missing
and which Debian package provides it (exit 2 from the command line, like a bad config:
restarting will not fix it, installing will).

The result is a real module registered as `nftables`, so every adapter keeps a plain
`import nftables`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from lrkp_tsl.errors import LrkpError

# Where Debian's python3-nftables puts the binding (the same for every Python 3).
DEBIAN_NFTABLES = Path("/usr/lib/python3/dist-packages/nftables")


class MissingDependency(LrkpError):
    """A native library or binding the node cannot run without; the reason names the fix."""

    code = "host"


@dataclass(frozen=True, slots=True)
class Binding:
    """Where the nftables binding came from, for the start banner."""

    origin: str  # "import" (already importable) or "debian" (loaded by path)
    path: str


def _load_debian_copy(directory: Path) -> None:
    init = directory / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "nftables", init, submodule_search_locations=[str(directory)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - a file that exists loads
        raise ImportError(f"cannot load {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nftables"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["nftables"]
        raise


def nftables_binding(debian_copy: Path = DEBIAN_NFTABLES) -> Binding:
    """Make `import nftables` work, and check that libnftables itself loads."""
    try:
        module = importlib.import_module("nftables")
        origin = "import"
    except ModuleNotFoundError:
        if not (debian_copy / "__init__.py").is_file():
            raise MissingDependency(
                "libnftables' Python binding is missing: `import nftables` fails and "
                f"{debian_copy} does not exist; install Debian's package: "
                "apt install python3-nftables"
            ) from None
        try:
            _load_debian_copy(debian_copy)
        except Exception as exc:
            raise MissingDependency(
                f"Debian's nftables binding at {debian_copy} does not load ({exc}); "
                "reinstall it: apt install --reinstall python3-nftables"
            ) from exc
        module = sys.modules["nftables"]
        origin = "debian"
    try:
        module.Nftables()
    except OSError as exc:
        raise MissingDependency(
            f"libnftables cannot be loaded ({exc}); install it: apt install libnftables1"
        ) from exc
    return Binding(origin, str(Path(module.__file__ or "?").parent))


def netfilterqueue_binding() -> None:
    """NetfilterQueue is built against libnetfilter_queue: both must be there."""
    try:
        importlib.import_module("netfilterqueue")
    except ImportError as exc:
        raise MissingDependency(
            f"NetfilterQueue does not import ({exc}); install libnetfilter-queue1 "
            "(apt install libnetfilter-queue1), and for a pip install also "
            "libnetfilter-queue-dev and python3-dev before `pip install`"
        ) from exc


def check() -> Binding:
    """Every native dependency; the first missing one raises `MissingDependency`."""
    binding = nftables_binding()
    netfilterqueue_binding()
    return binding
