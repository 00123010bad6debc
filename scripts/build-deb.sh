#!/usr/bin/env bash
# Builds the Debian package lrkp-tsl_<version>_<arch>.deb with Debian's tooling (debhelper,
# dh-virtualenv: docs/packaging.md) from a clean copy of this tree, and checks it with lintian
# (any error fails the build).
#
# The inputs are the files git knows (tracked or new, not ignored; edits included) of the
# node and its packaging: pyproject.toml, README.md, LICENSE, lrkp_tsl/, docs/, examples/,
# packaging/ and this script. Nothing else of the tree (.venv, lrkp_lab/, tests/) can reach
# the package. The build is cached OUTSIDE the clone, keyed by the inputs' sha256 (first 12
# hex digits): $LRKP_DEB_CACHE/deb-<sha12>/ (default /var/cache/lrkp-tsl, or
# ~/.cache/lrkp-tsl when that is not writable), holding the .deb, lintian.txt and build.log.
# The stamp is written LAST, so a killed build is redone; a second caller waits on a lock.
# Only the 5 newest builds are kept (each source change makes a new one).
#
# Output: the .deb's path on stdout; progress on stderr. `--dest DIR`: copy the .deb there
# too (make deb: dist/). Python packages come from PyPI, at the versions pinned in
# pyproject.toml and packaging/constraints.txt; downloads are cached in <cache>/pip, but no
# wheel built there is reused (NetfilterQueue's extension is compiled with Debian's hardening
# flags in every build).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "build-deb: $*" >&2; }

dest=
if [ "${1:-}" = "--dest" ]; then
  dest=$2
fi

INPUTS=(pyproject.toml README.md LICENSE lrkp_tsl docs examples packaging scripts/build-deb.sh)

cd "$repo"
mapfile -d '' files < <(git ls-files -z --cached --others --exclude-standard -- "${INPUTS[@]}" |
  sort -zu)
present=()
for f in "${files[@]}"; do
  [ -e "$f" ] || [ -L "$f" ] && present+=("$f") # a tracked file deleted in the tree is not an input
done
sha=$(for f in "${present[@]}"; do
  printf '%s\0' "$f"
  if [ -L "$f" ]; then readlink "$f"; else sha256sum <"$f"; fi
done | sha256sum | cut -d' ' -f1)

cache=${LRKP_DEB_CACHE:-/var/cache/lrkp-tsl}
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/lrkp-tsl
  mkdir -p "$cache"
fi
out=$cache/deb-${sha:0:12}
stamp=$out/.lrkp-build-complete

built() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "sha256=$sha" ] && ls "$out"/lrkp-tsl_*.deb >/dev/null 2>&1
}

finish() {
  local deb
  deb=$(ls "$out"/lrkp-tsl_*.deb)
  if [ -n "$dest" ]; then
    mkdir -p "$dest"
    cp "$deb" "$dest/"
    log "copied to $dest/$(basename "$deb")"
  fi
  echo "$deb"
}

if built; then
  log "up to date: $out"
  finish
  exit 0
fi

exec 9>"$out.lock"
flock 9
if built; then # another caller built it while we waited
  finish
  exit 0
fi

for tool in dpkg-buildpackage dh dh_virtualenv lintian; do
  command -v "$tool" >/dev/null || {
    log "missing $tool: run scripts/install-system-deps.sh (debhelper, dh-virtualenv, lintian, dpkg-dev)"
    exit 1
  }
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
changelog=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$version" != "$changelog" ]; then
  log "packaging/debian/changelog is at $changelog but pyproject.toml at $version: add a changelog entry"
  exit 1
fi

log "building lrkp-tsl $version into $out"
start=$(date +%s)
rm -rf "$out" "$out".build.*
work=$(mktemp -d "$out.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/lrkp-tsl-$version
mkdir -p "$src"
cp -a --parents "${present[@]}" "$src/"
cp -rL packaging/debian "$src/debian" # the unit is a link to packaging/lrkp-tsl.service
export PIP_CACHE_DIR=$cache/pip
rm -rf "$PIP_CACHE_DIR/wheels"
(cd "$src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  log "dpkg-buildpackage failed (whole log: $work/build.log, kept)"
  trap - EXIT
  exit 1
}
deb=$(ls "$work"/lrkp-tsl_*.deb)
# Errors fail the build; warnings and the rest are kept in lintian.txt (docs/packaging.md
# explains each one).
lintian --fail-on error --display-info "$deb" >"$work/lintian.txt" 2>&1 || {
  cat "$work/lintian.txt" >&2
  log "lintian reports errors on $(basename "$deb")"
  trap - EXIT
  exit 1
}
mkdir -p "$out"
mv "$deb" "$work/lintian.txt" "$work/build.log" "$out/"
echo "sha256=$sha" >"$stamp.tmp"
mv "$stamp.tmp" "$stamp"
# Older builds of other sources go (with their locks), the newest 5 stay.
ls -1dt "$cache"/deb-*/ 2>/dev/null | tail -n +6 | while read -r old; do
  rm -rf "${old%/}" "${old%/}.lock"
done
log "built in $(($(date +%s) - start)) s: $(basename "$deb"), $(du -k "$out/$(basename "$deb")" | cut -f1) KiB; lintian: $(wc -l <"$out/lintian.txt") tags"
finish
