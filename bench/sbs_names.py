"""The side-by-side benchmark's contenders by name: their order in every table and figure, the
table's column labels and the plot's bar labels and colours, in one place.

Imports nothing of the benchmark's, so bench/plot_sidebyside.py (run with Debian's interpreter,
not the venv) can use it too.
"""

from __future__ import annotations

from typing import NamedTuple


class Names(NamedTuple):
    label: str  # the Markdown table's column
    short: str  # under the plot's bars
    colour: str  # the plot's bars


BY_NAME = {
    "route": Names("plain routing", "routing", "#888888"),
    "nat": Names("bare nft NAT + conntrack", "bare NAT", "#4c72b0"),
    "lrkp": Names("lrkp-tsl", "lrkp-tsl", "#55a868"),
    "lrkp_nat": Names("lrkp-tsl, NAT'd callers", "lrkp-tsl\nNAT'd", "#8fd19e"),
    "rtpengine": Names("rtpengine (userspace)", "rtpengine", "#c44e52"),
}
CONTENDERS = tuple(BY_NAME)
