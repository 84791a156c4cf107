# The two set-up-and-go commands (README): `make run` and `make test`.
# Both create .venv on first use: torch pinned to the 2.13.0 CPU build, the rest from pyproject.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test test-cluster test-fast lint install

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,embed,tune,mlflow]"
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/genloop run

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=15

test-cluster: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/cluster/test_multinode.py

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow and not multinode"

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
