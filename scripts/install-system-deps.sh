#!/usr/bin/env bash
# Installs the Debian packages the node and its lab need. Idempotent: apt runs only when
# something is missing, so `make test` on a provisioned machine costs nothing here.
set -euo pipefail

PACKAGES=(
  nftables libnftables1 python3-nftables   # the table, and libnftables' official binding
  iptables                                  # iptables-nft: xt NFQUEUE fallback (no nft queue here)
  conntrack                                 # conntrack(8), for operators and lab inspection
  libnetfilter-queue-dev python3-dev python3-venv gcc   # NetfilterQueue builds from source
  iproute2                                  # ip netns / veth / bridge for the lab
  kamailio sip-tester                       # the controlling layer and SIP peer for e2e tests
  make bison flex xz-utils                  # scripts/build-kamailio.sh: Kamailio 6.x from source
  redis-server                              # pair mode: the call table's replication feed
  keepalived                                # pair mode: VRRP moves the relay and control VIPs
  systemd                                   # systemd-analyze verify checks packaging/lrkp-tsl.service
  debhelper dh-virtualenv dpkg-dev build-essential lintian help2man  # make deb (docs/packaging.md)
)
# redis-server: on a host running systemd, Debian starts and enables its own instance
# (127.0.0.1:6379, /var/lib/redis) at install. It is left alone here: on a pair node it is
# the node's local Redis that the operator configures; tests never use it (they start their
# own servers, on their own ports and directories, inside lab namespaces).

# shellcheck source=scripts/debian-packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian-packages.sh"
missing_packages "${PACKAGES[@]}"
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: missing Debian packages: ${missing[*]}" >&2
  echo "install-system-deps: run 'make deps' as root (apt-get install), or install them yourself" >&2
  exit 1
fi
echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
