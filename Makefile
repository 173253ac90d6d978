# The two promised commands: `make run` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SERVING := $(VENV)/.installed-serve
INSTALLED := $(VENV)/.installed
VAR := var
SVCREG_HOME ?= $(VAR)/svcreg
NETWORKS ?= inventories/services.yaml

.PHONY: run test test-fast lint bench venv system-deps clean sanity units molecule

# What serving needs (make run): svcreg and its runtime libraries, nothing of the test toolchain.
$(SERVING): pyproject.toml
	@scripts/ensure-python-venv "$(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $@

# Everything else (make test, lint, bench): the test toolchain (molecule, ansible, ansible-lint, ...) on top.
$(INSTALLED): $(SERVING)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(INSTALLED)

system-deps:
	@scripts/ensure-system-deps

## run: create the venv, set up $(SVCREG_HOME) on first run (svcreg init), serve the registry over TLS
run: $(SERVING)
	@if [ ! -e "$(SVCREG_HOME)/svcreg.yaml" ]; then \
		mkdir -p -m 700 "$(SVCREG_HOME)" && \
		{ [ -e "$(SVCREG_HOME)/services.yaml" ] || install -m 644 "$(NETWORKS)" "$(SVCREG_HOME)/services.yaml"; } && \
		$(VENV)/bin/svcreg init "$(SVCREG_HOME)"; \
	fi
	exec $(VENV)/bin/svcreg serve --config "$(SVCREG_HOME)/svcreg.yaml"

## test: every test the project has (lint, ansible-test sanity and units, unit, property, netns, kill -9),
## then the molecule scenarios
test: $(INSTALLED) system-deps lint sanity units
	$(PY) -m pytest
	@$(MAKE) --no-print-directory molecule

## test-fast: the tests that need neither root nor network namespaces nor Docker
test-fast: $(INSTALLED) lint
	$(PY) -m pytest -m "not netns"

## molecule: the molecule scenarios (molecule/*: node containers, a registry per scenario; docs/docker.md).
## They need a Docker engine (scripts/ensure-docker starts one as root) and the node image (built once).
molecule: $(INSTALLED)
	@scripts/ensure-docker || { \
		echo "make: error: the molecule scenarios need a Docker engine and \`docker info\` fails (see above)." >&2; \
		echo "make: \`make test-fast\` runs the tests that need neither Docker nor root." >&2; \
		exit 1; }
	@scripts/build-node-image >/dev/null
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" molecule test --all

## lint: ruff on the Python (the collection too), mypy (strict) on registry/, ansible-lint on the playbooks and
## the molecule scenarios (config in .ansible-lint: offline, production profile)
lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ansible-lint playbooks/*.yml molecule/*/*.yml molecule/shared/tasks/*.yml \
		.config/molecule/config.yml

## sanity: ansible-test sanity for the collection (offline get-pip stand-in when the download fails)
sanity: $(INSTALLED)
	cd ansible_collections/svcreg/registry && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		$(CURDIR)/scripts/ansible-test-offline sanity --venv --python 3.11

## units: ansible-test units for the collection (tests/unit; its requirements.txt lists what the registry package imports)
units: $(INSTALLED)
	cd ansible_collections/svcreg/registry && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		$(CURDIR)/scripts/ansible-test-offline units --venv --python 3.11

## bench: the benchmarks in bench/ (numbers for the notes, not pass/fail; bench_deploy needs root).
## bench_server drives svcreg, etcd (Debian's etcd-server) and a raw websockets echo side by side.
bench: $(INSTALLED) system-deps
	@$(PY) -c 'import aetcd' 2>/dev/null || $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/bench_core.py
	$(PY) bench/bench_server.py --runs 3
	$(PY) bench/bench_inventory.py --services 2000 --runs 3
	$(PY) bench/bench_deploy.py

clean:
	rm -rf $(VENV) $(VAR) .pytest_cache .ruff_cache .hypothesis
