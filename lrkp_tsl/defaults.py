"""Defaults shared by the pure core and the kernel adapters (kept here so that config
parsing never imports a kernel binding)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def packaged_rules() -> Path:
    """The base table shipped inside the package (wheel, .deb or checkout alike).

    Looked up through the package, never the source tree or the cwd, so an installed node
    finds it wherever it runs from. Installed packages are plain directories, so the
    resource is a real file that `nft -c -f` and log lines can name. In the Debian package
    it is a link to /usr/share/lrkp-tsl/lrkp.nft: that file is the one named.
    """
    return Path(str(resources.files("lrkp_tsl") / "rules" / "lrkp.nft")).resolve()


DEFAULT_RULES = packaged_rules()
# The NFQUEUE for first packets: far from the low numbers other tools default to.
DEFAULT_QUEUE_NUM = 22333
