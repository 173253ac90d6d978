# The two promised commands: `make run` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
VAR := var
SVCREG_HOME ?= $(VAR)/svcreg
NETWORKS ?= inventories/services.yaml

.PHONY: run test test-fast lint bench venv system-deps clean sanity units

$(INSTALLED): pyproject.toml
	@scripts/ensure-python-venv "$(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(INSTALLED)

system-deps:
	@scripts/ensure-system-deps

## run: create the venv, set up $(SVCREG_HOME) on first run (svcreg init), serve the registry over TLS
run: $(INSTALLED)
	@if [ ! -e "$(SVCREG_HOME)/svcreg.yaml" ]; then \
		mkdir -p -m 700 "$(SVCREG_HOME)" && \
		{ [ -e "$(SVCREG_HOME)/services.yaml" ] || install -m 644 "$(NETWORKS)" "$(SVCREG_HOME)/services.yaml"; } && \
		$(VENV)/bin/svcreg init "$(SVCREG_HOME)"; \
	fi
	exec $(VENV)/bin/svcreg serve --config "$(SVCREG_HOME)/svcreg.yaml"

## test: every test the project has (lint, ansible-test sanity and units, unit, property, netns, kill -9)
test: $(INSTALLED) system-deps lint sanity units
	$(PY) -m pytest

## test-fast: the tests that need neither root nor network namespaces
test-fast: $(INSTALLED) lint
	$(PY) -m pytest -m "not netns"

## lint: ruff on the Python, ansible-lint on the playbooks (config in .ansible-lint: offline, production profile)
lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ansible-lint playbooks/*.yml

## sanity: ansible-test sanity for the collection (offline get-pip stand-in when the download fails)
sanity: $(INSTALLED)
	cd ansible_collections/svcreg/registry && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		$(CURDIR)/scripts/ansible-test-offline sanity --venv --python 3.11

## units: ansible-test units for the collection (tests/unit; its requirements.txt lists what the registry package imports)
units: $(INSTALLED)
	cd ansible_collections/svcreg/registry && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
		$(CURDIR)/scripts/ansible-test-offline units --venv --python 3.11

## bench: the benchmarks in bench/ (numbers for the notes, not pass/fail)
bench: $(INSTALLED)
	$(PY) bench/bench_core.py

clean:
	rm -rf $(VENV) $(VAR) .pytest_cache .ruff_cache .hypothesis
