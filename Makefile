# `make demo` and `make test` each run the idempotent set-up first (scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/uffdtrace demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench
