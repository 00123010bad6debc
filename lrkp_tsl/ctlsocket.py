"""Where the management socket is: what both the node (`mgmt`) and `lrkp-ctl` need to know.

Kept apart from `mgmt` so that `lrkp-ctl` imports none of the daemon's machinery (engine,
nftables, NFQUEUE): an operator's tool must start, and answer `--version`, on a host where
the node's kernel bindings are broken.
"""

from __future__ import annotations

DEFAULT_SOCKET = "@lrkp-tsl"
ENV_SOCKET = "LRKP_CTL_SOCKET"


def socket_name(text: str) -> str:
    """`@name` -> the abstract address (leading NUL); `/path` as it is."""
    return "\0" + text[1:] if text.startswith("@") else text
