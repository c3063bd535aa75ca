"""Benchmarks, run by `make bench` as `python -m bench` (not part of the test suite)."""
