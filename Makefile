# Warden: the two commands a newcomer runs are `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help setup system-packages demo walkthrough test lint typecheck contracts unit bench clean

help:
	@echo "make demo    set up and run a hub with a simulated fleet, then contain an impostor (warden demo)"
	@echo "make walkthrough  set up and run the scripted walk through Warden's CLI"
	@echo "make test    set up and run lint, types, import contracts and the test suite"
	@echo "make bench   set up and run the benchmarks in bench/"

setup: system-packages $(STAMP)

system-packages:
	@bash scripts/system-packages.sh

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Warden needs Python 3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: setup
	@$(BIN)/warden demo

walkthrough: setup
	@$(BIN)/python scripts/demo.py

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: setup
	$(BIN)/mypy

contracts: setup
	$(BIN)/lint-imports

unit: setup
	@bash scripts/ci-services.sh || echo "PostgreSQL is not available: its tests will be skipped"
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test: lint typecheck contracts unit

bench: setup
	$(BIN)/python bench/issuance.py
	PYTHONPATH=. $(BIN)/python bench/enroll.py --seconds $(or $(BENCH_SECONDS),30)
	PYTHONPATH=. $(BIN)/python bench/ocsp.py --seconds $(or $(BENCH_SECONDS),30)
	PYTHONPATH=. $(BIN)/python bench/ratelimit.py --seconds $(or $(BENCH_SECONDS),30)
	PYTHONPATH=. $(BIN)/python bench/broker_rights.py
	PYTHONPATH=. $(BIN)/python bench/containment.py
	PYTHONPATH=. $(BIN)/python bench/connect_storm.py
	PYTHONPATH=. $(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
