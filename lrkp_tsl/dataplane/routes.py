"""The networks this namespace routes to without its default route (for `auto` latching)."""

from __future__ import annotations

import json
import subprocess
from ipaddress import IPv4Network

from lrkp_tsl.errors import KernelError


def routed_networks() -> list[IPv4Network]:
    """Destinations of the main table's IPv4 routes, the default route excluded."""
    result = subprocess.run(
        ["ip", "-j", "-4", "route", "show"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise KernelError(f"ip route show failed: {result.stderr.strip()}")
    networks = []
    for route in json.loads(result.stdout or "[]"):
        destination = route.get("dst", "default")
        if destination != "default":
            networks.append(IPv4Network(destination, strict=False))
    return networks
