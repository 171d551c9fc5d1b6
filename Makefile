# Two commands do all set-up on a fresh machine:
#   make run    install everything, then train the reference system with Karn (`karn run`)
#   make test   install everything (Debian prometheus/alertmanager included), then run the tests
VENV   ?= .venv
PYTHON ?= python3
PIP_CONSTRAINTS ?= constraints-cpu.txt
BIN    := $(VENV)/bin

.PHONY: setup run test lint typecheck check bench system-deps clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PIP_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(PIP_CONSTRAINTS) -e '.[test]'
	touch $@

run: setup
	$(BIN)/karn run $(ARGS)

system-deps:
	./scripts/install-system-deps.sh

# The suite runs on every CPU (pytest-xdist; a file's tests stay on one worker, so its
# module fixtures start once). PYTEST_WORKERS=0 runs it serially.
PYTEST_WORKERS ?= auto
test: setup system-deps
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Lint and format check (ruff, config in pyproject.toml), and mypy --strict on the torch-free core.
lint: setup
	$(BIN)/ruff check karn_otel tests benchmarks
	$(BIN)/ruff format --check karn_otel tests benchmarks

typecheck: setup
	$(BIN)/mypy

check: lint typecheck test

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
