# Two set-up commands (README): `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	# pinned CPU build, taken from local disk on the development machines; users with a GPU
	# install their own torch first and skip this target
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

lint:
	$(BIN)/ruff check denseflow tests
	$(BIN)/ruff format --check denseflow tests

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
