"""Probes: capability detection, backend choice, and loading/attaching the BPF programs."""
