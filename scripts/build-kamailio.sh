#!/usr/bin/env bash
# Builds Kamailio from the vendored source snapshot (6.x, the lrkproxy that sends `D`), so the
# e2e suite can run against it as well as against Debian's 5.6. Only the modules that
# examples/kamailio.cfg (lrkproxy) and examples/kamailio-rtpengine.cfg (rtpengine, the ng
# protocol) load are built (a fraction of the ~95 s a full build takes).
#
# The build lives in a cache OUTSIDE the clone, one directory per tarball and module list,
# keyed by the tarball's sha256 and the list's (first 12 and 8 hex digits):
# $LRKP_KAMAILIO_CACHE/kamailio-<sha12>-<modules8>/ (default cache: /var/cache/lrkp-tsl, or
# ~/.cache/lrkp-tsl when that is not writable). A checkout with another module list builds
# beside it, never over it: two checkouts on one machine never remove each other's build
# (nor the binary a running test uses). It is reused when
# complete: the stamp file is written LAST, so a build that was killed half-way has no stamp
# and is redone from scratch. A second caller waits on a lock instead of building twice.
#
# Source: $LRKP_KAMAILIO_SRC, a kamailio-*.tar.xz or a directory holding one; default
# ../shared/vendor/kamailio next to the clone, or next to the main clone (found through git,
# so worktrees work too), or /work/shared/vendor/kamailio.
#
# Output: the install prefix on stdout (bin in sbin/, modules under lib*/kamailio/modules/);
# progress on stderr. Exit 3: no tarball found (the caller decides: skip locally, fail in CI).
# `--prefix-only`: print where the build is (or would be) and exit 0 when complete, 4 if not.
set -euo pipefail

# rtpengine: Kamailio's ng client (needs no external library); nathelper: NAT detection and
# Contact fixing in the rtpengine example.
MODULES="tm tmx sl rr pv maxfwd textops siputils sanity ipops xlog lrkproxy rtpengine nathelper"

repo=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "build-kamailio: $*" >&2; }

default_src() {
  # The main clone's parent holds shared/; for a worktree, git's common dir names the main clone.
  local common
  common=$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  # A clone elsewhere (CI clones into a scratch directory) falls back to the workplace's copy.
  local candidate
  for candidate in "$repo/../shared/vendor/kamailio" \
    ${common:+"$(dirname "$common")/../shared/vendor/kamailio"} /work/shared/vendor/kamailio; do
    if [ -d "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
  echo "$repo/../shared/vendor/kamailio"
}

src=${LRKP_KAMAILIO_SRC:-$(default_src)}
tarball=$src
if [ -d "$src" ]; then
  tarball=$(find "$src" -maxdepth 1 -name 'kamailio-*.tar.xz' | sort | tail -n 1)
fi
if [ -z "$tarball" ] || [ ! -f "$tarball" ]; then
  log "no Kamailio source tarball (kamailio-*.tar.xz) at $src; set LRKP_KAMAILIO_SRC"
  exit 3
fi
tarball=$(realpath "$tarball")

cache=${LRKP_KAMAILIO_CACHE:-/var/cache/lrkp-tsl}
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/lrkp-tsl
  mkdir -p "$cache"
fi
sha=$(sha256sum "$tarball" | cut -d' ' -f1)
modules_sha=$(echo "$MODULES" | sha256sum | cut -d' ' -f1)
prefix=$cache/kamailio-${sha:0:12}-${modules_sha:0:8}
stamp=$prefix/.lrkp-build-complete
want="sha256=$sha modules=$MODULES"

complete() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$prefix/sbin/kamailio" ]
}

if [ "${1:-}" = "--prefix-only" ]; then
  echo "$prefix"
  complete && exit 0 || exit 4
fi

if complete; then
  log "up to date: $prefix (from $tarball)"
  echo "$prefix"
  exit 0
fi

exec 9>"$prefix.lock"
flock 9
if complete; then # another caller built it while we waited
  echo "$prefix"
  exit 0
fi

for tool in gcc make bison flex; do
  command -v "$tool" >/dev/null || { log "missing $tool: run scripts/install-system-deps.sh"; exit 1; }
done

log "building $(basename "$tarball") into $prefix (modules: $MODULES)"
start=$(date +%s)
# Under the lock, anything left by an earlier, killed build of this tarball is garbage.
rm -rf "$prefix" "$prefix".build.*
work=$(mktemp -d "$prefix.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xJf "$tarball" -C "$work"
top=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
# Every module not in the list is excluded (the default set would build ~100 of them).
exclude=$(cd "$top/src/modules" && for m in *; do
  [ -d "$m" ] && [[ " $MODULES " != *" $m "* ]] && echo "$m"
done | tr '\n' ' ')
jobs=$(nproc 2>/dev/null || echo 2)
(
  cd "$top"
  make cfg PREFIX="$prefix" include_modules="$MODULES" exclude_modules="$exclude" >/dev/null
  make -j"$jobs" all >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }
  make install >"$work/install.log" 2>&1 || { tail -n 40 "$work/install.log" >&2; exit 1; }
)
for m in $MODULES; do
  if [ -z "$(find "$prefix" -path '*/kamailio/modules/*' -name "$m.so" | head -n 1)" ]; then
    log "module $m.so missing after the build"
    exit 1
  fi
done
echo "$want" >"$stamp.tmp"
mv "$stamp.tmp" "$stamp"
log "built in $(($(date +%s) - start)) s: $("$prefix/sbin/kamailio" -v | head -n 1)"
echo "$prefix"
