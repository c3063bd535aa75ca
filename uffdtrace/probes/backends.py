"""Which backend a session runs: `--backend auto|tracepoint|kprobe|fentry` resolved against what
this kernel has (uffdtrace.probes.capabilities, shared with `doctor`)."""

from __future__ import annotations

from pathlib import Path

from uffdtrace.errors import UserError
from uffdtrace.probes.calibration import per_boot
from uffdtrace.probes.capabilities import choose_backend, detect
from uffdtrace.probes.kernel import kallsyms
from uffdtrace.probes.kprobe import FentryBackend, KprobeBackend
from uffdtrace.probes.tracepoint import TracepointBackend

BUILT = {"tracepoint": TracepointBackend, "kprobe": KprobeBackend, "fentry": FentryBackend}
BACKENDS = ("auto", *BUILT)
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")


def resolve(requested: str) -> type[TracepointBackend]:
    """The backend class to run. `auto` skips the full capability probe (about a second) on
    kernels that plainly have neither kprobes nor BPF trampolines."""
    if requested not in BACKENDS:
        raise UserError(f"unknown backend {requested!r}: choose {', '.join(BACKENDS)}")
    if requested == "tracepoint" or (requested == "auto" and not _may_hook_functions()):
        return TracepointBackend
    if requested == "auto":  # the capability probe takes about a second: once per boot
        return BUILT[per_boot("auto_backend", lambda: choose_backend("auto", detect()))]
    return BUILT[choose_backend(requested, detect())]


def _may_hook_functions() -> bool:
    return KPROBE_PMU.exists() or "bpf_trampoline_link_prog" in kallsyms().present
