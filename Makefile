# The two promised commands: `make run` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
VAR := var
DB ?= $(VAR)/registry.db
NETWORKS ?= inventories/services.yaml

.PHONY: run test test-fast lint bench venv system-deps clean

$(INSTALLED): pyproject.toml
	@scripts/ensure-python-venv "$(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(INSTALLED)

system-deps:
	@scripts/ensure-system-deps

## run: create the venv and start the registry on the embedded store ($(DB))
run: $(INSTALLED)
	@mkdir -p $(VAR)
	$(VENV)/bin/svcreg demo --db $(DB) --networks $(NETWORKS)

## test: every test the project has (lint, unit, property, netns, kill -9)
test: $(INSTALLED) system-deps lint
	$(PY) -m pytest

## test-fast: the tests that need neither root nor network namespaces
test-fast: $(INSTALLED) lint
	$(PY) -m pytest -m "not netns"

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## bench: the benchmarks in bench/ (numbers for the notes, not pass/fail)
bench: $(INSTALLED)
	$(PY) bench/bench_core.py

clean:
	rm -rf $(VENV) $(VAR) .pytest_cache .ruff_cache .hypothesis
