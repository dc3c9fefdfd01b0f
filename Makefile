# The two commands of the quick start: `make demo` and `make test`.
# Each does its own set-up: host packages, binfmt_misc, libvirtd, the virtualenv.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint setup host venv clean

demo: setup
	$(BIN)/python scripts/demo.py

# Extra pytest arguments, e.g. PYTEST_ARGS="--run-slow -m vm --target aarch64-linux" (nightly).
PYTEST_ARGS ?=

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

setup: host venv

host:
	scripts/setup-host.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e . --group dev
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
