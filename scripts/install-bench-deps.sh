#!/usr/bin/env bash
# What `make bench` needs beyond scripts/install-system-deps.sh: Debian's rtpengine (the
# userspace contender of bench/sidebyside.py) and matplotlib (the plot). Idempotent.
#
# Not in install-system-deps.sh on purpose: installing rtpengine-daemon on a systemd host
# enables and starts its service, which adds iptables rules in the root namespace and listens
# on ports 30000-40000. Here the service is kept from starting (policy-rc.d) and disabled:
# the benchmark runs its own rtpengine inside a lab namespace.
set -euo pipefail

PACKAGES=(rtpengine-daemon python3-matplotlib)
# shellcheck source=scripts/debian-packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian-packages.sh"
missing_packages "${PACKAGES[@]}"
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-bench-deps: missing Debian packages: ${missing[*]} (run as root)" >&2
  exit 1
fi
echo "install-bench-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  own_policy=1
fi
trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now rtpengine-daemon.service >/dev/null 2>&1 || true
fi
