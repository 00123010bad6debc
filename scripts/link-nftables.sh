#!/usr/bin/env bash
# Makes Debian's python3-nftables (libnftables' official binding, same version as the
# installed libnftables1) importable from the venv without exposing every Debian
# dist-package: a symlink to the one pure-Python module. PyPI has no official copy.
set -euo pipefail
venv_python=$1
src=/usr/lib/python3/dist-packages/nftables
if [ ! -f "$src/nftables.py" ]; then
  echo "link-nftables: $src is missing; install Debian's python3-nftables (make deps)" >&2
  exit 1
fi
site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn "$src" "$site/nftables"
"$venv_python" -c 'import nftables; nftables.Nftables()' \
  || { echo "link-nftables: 'import nftables' fails in $venv_python" >&2; exit 1; }
