# Two commands do everything on a fresh Debian 12 machine (as root):
#   make run    bring up the lab and relay a demo call (or CONFIG=path: run the node)
#   make test   install what is missing, then run unit + netns tests
SHELL := /bin/bash
# Debian's interpreter: the one python3-nftables is built and tested against.
PYTHON ?= /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: deps run test unit lint deb bench bench-deps bench-parts fuzz clean-lab kamailio

deps: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt scripts/install-system-deps.sh scripts/debian-packages.sh scripts/link-nftables.sh
	scripts/install-system-deps.sh
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e . -r requirements-dev.txt
	scripts/link-nftables.sh $(VPY)
	touch $(STAMP)

run: deps
ifdef CONFIG
	$(VENV)/bin/lrkp-tsl run --config $(CONFIG)
else
	$(VPY) -m lrkp_lab.demo
endif

test: deps kamailio bench-deps
	$(VPY) -m pytest $(PYTEST_ARGS)

# Kamailio 6.x for the e2e suite: built once per machine into a cache outside the clone,
# keyed by the source tarball's hash and the module list (docs/kamailio.md). No tarball: a loud warning, and the
# 6.x tests skip with that reason (set LRKP_KAMAILIO_SRC); a failed build is always an error.
kamailio: deps
	@scripts/build-kamailio.sh >/dev/null || { rc=$$?; [ $$rc -eq 3 ] || exit $$rc; \
	  echo "WARNING: no Kamailio 6.x source tarball; the 6.x e2e tests will SKIP (set LRKP_KAMAILIO_SRC)" >&2; }

unit: deps
	$(VPY) -m pytest tests/unit $(PYTEST_ARGS)

# The Debian package (debhelper + dh-virtualenv, lintian-checked): dist/lrkp-tsl_<version>_<arch>.deb.
# Built from the files git knows, cached outside the clone per hash of them (docs/packaging.md).
deb: deps
	scripts/build-deb.sh --dest dist

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The side-by-side benchmark (lrkp-tsl, rtpengine, bare NAT, routing; ~20 min; BENCH_ARGS=--quick
# for ~5): bench/results/sidebyside.{md,json,png}. The single-purpose scripts: make bench-parts.
bench: deps bench-deps
	PYTHONPATH=. $(VPY) bench/sidebyside.py $(BENCH_ARGS)

# rtpengine and matplotlib: `make test` installs them too, so that the tiny side-by-side
# benchmark in the suite runs every contender (rtpengine's service is kept from starting).
bench-deps:
	scripts/install-bench-deps.sh

bench-parts: deps
	PYTHONPATH=. $(VPY) bench/dataplane_scale.py
	PYTHONPATH=. $(VPY) bench/first_packet.py
	PYTHONPATH=. $(VPY) bench/control_clients.py
	PYTHONPATH=. $(VPY) bench/control_floor.py
	PYTHONPATH=. $(VPY) bench/dataplane_cost.py
	PYTHONPATH=. $(VPY) bench/throughput.py
	PYTHONPATH=. $(VPY) bench/event_loop.py
	PYTHONPATH=. $(VPY) bench/restart.py
	PYTHONPATH=. $(VPY) bench/pair.py
	PYTHONPATH=. $(VPY) bench/conntrack_per_call.py

# The control socket fuzzed for longer than CI does, then a million random datagrams.
fuzz: deps
	LRKP_FUZZ_EXAMPLES=$${LRKP_FUZZ_EXAMPLES:-5000} $(VPY) -m pytest tests/netns/test_hostile.py -k fuzz $(PYTEST_ARGS)
	PYTHONPATH=. $(VPY) bench/fuzz_flood.py

clean-lab: deps
	$(VPY) -m lrkp_lab.lab sweep --all
