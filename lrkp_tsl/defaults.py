"""Defaults shared by the pure core and the kernel adapters (kept here so that config
parsing never imports a kernel binding)."""

from __future__ import annotations

from pathlib import Path

# The base table, as shipped in this checkout.
DEFAULT_RULES = Path(__file__).resolve().parents[1] / "rules" / "lrkp.nft"
# The NFQUEUE for first packets: far from the low numbers other tools default to.
DEFAULT_QUEUE_NUM = 22333
