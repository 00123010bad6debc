# Sourced by the install scripts: which of the Debian packages named are not installed.
# missing_packages PKG... -> sets the array `missing` (empty when all are installed).
missing_packages() {
  missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}
