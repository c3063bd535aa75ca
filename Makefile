# `make demo` and `make test` each run the idempotent set-up first (scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit vmtest lint bench stress

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/uffdtrace demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The tests that need no root, BPF or kernel, in seconds (after one `make setup` as root).
unit:
	$(PY) -m pytest tests/unit

# Only the VM tests: the kprobe and fentry backends on Debian's distro kernel under qemu TCG.
vmtest: setup
	$(PY) -m pytest -m vm

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench

# Attribution under stress: >= 10M faults, unpinned, every policy and backing, both modes,
# checked fault by fault against ground truth (`$(PY) -m bench.stress --quick` for a slice).
stress: setup
	$(PY) -m bench.stress
