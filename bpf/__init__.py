"""BPF C sources loaded by BCC at run time (installed as package data of uffdtrace.bpf)."""
