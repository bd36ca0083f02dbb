# The two commands a newcomer needs (both install whatever is missing first):
#   make demo   - a small real run on the built-in Fashion-MNIST data, on CPU
#   make test   - the test suite (what CI runs)
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
CMX_HOME ?= $(CURDIR)/.cmx-home
export CMX_HOME
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo test test-fast lint check format bench

setup:
	@bash .ci/bootstrap

demo: setup
	@bash examples/demo.sh

# .ci/suite: the tests in two streams (the two-node `ray up` test beside the rest), each pytest with
# -X faulthandler: a crash in native code, even while the interpreter shuts down after the summary,
# prints every thread's Python stack (one fresh-clone run on 2026-12-01 segfaulted there).
test: setup check
	bash .ci/suite

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

# The static checks `make test` runs first: style, types, and the layer contract (pyproject.toml).
check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

lint: check

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/model_throughput.py
	$(BIN)/python benchmarks/loader_throughput.py
