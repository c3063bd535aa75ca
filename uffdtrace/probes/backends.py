"""Which backend a session runs: `--backend auto|tracepoint|kprobe|fentry` resolved against what
this kernel has (uffdtrace.probes.capabilities, shared with `doctor`)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from uffdtrace.errors import UserError
from uffdtrace.events import BlockedFault
from uffdtrace.probes.calibration import per_boot
from uffdtrace.probes.capabilities import choose_backend, detect
from uffdtrace.probes.kernel import kallsyms
from uffdtrace.probes.kprobe import FentryBackend, KprobeBackend
from uffdtrace.probes.paths import PathClassifier
from uffdtrace.probes.tracepoint import TracepointBackend, TraceScope


class Backend(Protocol):
    """What a session asks of a backend. The tracepoint backend is one; the kprobe and fentry
    backends are the tracepoint programs plus kernel-function hooks (subclasses of it)."""

    name: str
    mode: str
    compile_s: float
    attached: dict[str, str | None]  # kernel-function hook -> the symbol it found (kprobe, fentry)

    def __init__(self, mode: str, scope: TraceScope) -> None: ...
    def cflags(self) -> list[str]: ...
    def source(self) -> str: ...
    def start(self) -> None: ...
    def paths(self) -> PathClassifier: ...
    def sees_ioctls(self) -> bool: ...
    def reads_messages(self) -> bool: ...
    def track(self, pid: int, role: int = ...) -> None: ...
    def untrack(self, pid: int) -> None: ...
    def tracked(self) -> dict[int, int]: ...
    def drain(self) -> np.ndarray: ...
    def blocked_now(self) -> list[BlockedFault]: ...
    def faults_in_flight(self) -> np.ndarray: ...
    def lost(self) -> dict[str, int]: ...
    def histogram(self, name: str) -> np.ndarray: ...
    def uffd_event_counts(self) -> dict[tuple[int, int], int]: ...
    def loose_messages(self) -> dict[str, int]: ...
    def run_stats(self) -> tuple[int, int]: ...
    def close(self) -> None: ...


BUILT: dict[str, type[Backend]] = {"tracepoint": TracepointBackend, "kprobe": KprobeBackend,
                                   "fentry": FentryBackend}
BACKENDS = ("auto", *BUILT)
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")


def resolve(requested: str) -> type[Backend]:
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
