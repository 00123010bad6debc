#!/bin/sh
# manpage.sh PYTHON MODULE NAME VERSION SUMMARY OUT [SUBCOMMAND...]: a manual page made by
# help2man from the command's own --help, followed by each SUBCOMMAND's --help (argparse
# prints a subcommand's options only there). Run by debian/rules on the built venv.
set -eu
python=$1 module=$2 name=$3 version=$4 summary=$5 out=$6
shift 6
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
{
	echo '#!/bin/sh'
	echo 'if [ "$1" = --help ]; then'
	echo "  '$python' -m '$module' --help"
	for sub in "$@"; do
		echo "  echo; '$python' -m '$module' '$sub' --help"
	done
	echo 'else'
	echo "  exec '$python' -m '$module' \"\$@\""
	echo 'fi'
} >"$dir/$name"
chmod +x "$dir/$name"
help2man -N --version-string="$version" -n "$summary" "$dir/$name" >"$out"
