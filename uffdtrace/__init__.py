"""uffdtrace: eBPF observability for userfaultfd minor faults."""

__version__ = "0.1.0"
