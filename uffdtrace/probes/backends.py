"""Which backend a session runs: `--backend auto|tracepoint|kprobe` resolved against what this
kernel has (uffdtrace.probes.capabilities, shared with `doctor`) and what is built."""

from __future__ import annotations

from pathlib import Path

from uffdtrace.errors import UserError
from uffdtrace.probes.capabilities import choose_backend, detect
from uffdtrace.probes.kprobe import KprobeBackend
from uffdtrace.probes.tracepoint import TracepointBackend

BACKENDS = ("auto", "tracepoint", "kprobe")
BUILT = {"tracepoint": TracepointBackend, "kprobe": KprobeBackend}
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")


def resolve(requested: str) -> type[TracepointBackend]:
    """The backend class to run. `auto` skips the full capability probe (about a second) on
    kernels that plainly have no kprobes."""
    if requested not in BACKENDS:
        raise UserError(f"unknown backend {requested!r}: choose {', '.join(BACKENDS)}")
    if requested == "tracepoint" or (requested == "auto" and not KPROBE_PMU.exists()):
        return TracepointBackend
    chosen = choose_backend(requested, detect())
    if chosen not in BUILT:
        if requested == "auto":
            return TracepointBackend
        raise UserError(f"the {chosen} backend is not built yet: use --backend tracepoint")
    return BUILT[chosen]
