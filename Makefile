# The one entry point: `make demo` runs the demo server, `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser services demo cluster-demo serve test lint typecheck pytest bench clean

$(STAMP): pyproject.toml setup.py src/statecast/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium, for the dashboard's browser test (Playwright drives it; it
# downloads no browser of its own). Without root, the test says why it skips.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: chromium is not installed and this is not root: the browser test will be skipped"; fi

# Debian's PostgreSQL and NATS server: tests start private instances of them on free
# ports in temporary directories (never the machine's shared ones). Installed when
# missing and root; elsewhere the tests that need them say why they skip.
services:
	@missing=""; \
	for pair in initdb:postgresql nats-server:nats-server; do \
	  bin=$${pair%%:*}; pkg=$${pair##*:}; \
	  if ! command -v $$bin >/dev/null && ! ls /usr/lib/postgresql/*/bin/$$bin >/dev/null 2>&1; then \
	    missing="$$missing $$pkg"; fi; \
	done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's$$missing for the tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "note:$$missing not installed and this is not root: the tests that need them will skip"; fi

demo: install  ## run the server with the trading-desk demo producers
	@echo "dashboard: http://127.0.0.1:8990/   TCP: nc localhost 8989 <<< 'sync me'"
	$(BIN)/statecast serve --demo --retain 100000

cluster-demo: install services  ## three nodes on a local NATS JetStream, the demo on one
	BIN=$(BIN) bash scripts/cluster_demo.sh

test: install browser services lint typecheck pytest  ## everything CI runs

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest $(PYTEST_ARGS)

bench: install  ## the benchmarks of docs/performance.md
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build src/*.egg-info
