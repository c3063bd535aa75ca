"""What this machine can trace, and with which backend.

Shared by `uffdtrace doctor` and backend selection. `detect()` runs every check of
`uffdtrace.probes.checks` once per process: nothing is inferred from version numbers. It never
raises: each check reports its own failure as a `Check` that is not ok, with the reason and a
concrete fix. The requirements below say which checks each backend and mode needs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from dataclasses import dataclass

from uffdtrace.errors import UserError
from uffdtrace.probes import checks
from uffdtrace.probes.checks import (  # noqa: F401  (doctor and the tests read these here)
    FIX_BCC,
    FIX_ROOT,
    KERNEL_SYMBOLS,
    SECTIONS,
    TRACEPOINTS,
    Check,
    HugePages,
)
from uffdtrace.probes.kprobe import FentryBackend, KprobeBackend
from uffdtrace.probes.tracepoint import OPTIONAL_TRACEPOINTS, TracepointBackend

MODES = {"light": "scheduler tracepoints and handlers' message reads",
         "full": "adds every uffd ioctl (raw sys_enter)"}
_BPF = ("root", "bcc", "bcc-compile", "raw-tracepoints", "ringbuf", "stack-traces")
_KPROBE = ("kprobes", "kallsyms", "handle_userfault")
_FENTRY = ("fentry", "kallsyms", "handle_userfault")


def _needs(backend: type[TracepointBackend], mode: str, *more: str) -> tuple[str, ...]:
    """The checks a backend needs in a mode: BPF, the tracepoints it attaches, and `more`."""
    return (*_BPF, *(tp for tp in backend.tracepoints(mode) if tp not in OPTIONAL_TRACEPOINTS), *more)


# backend -> mode -> names of the checks it needs. A new backend adds its entry here.
REQUIREMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "tracepoint": {m: _needs(TracepointBackend, m) for m in MODES},
    "kprobe": {m: _needs(KprobeBackend, m, *_KPROBE) for m in MODES},
    "fentry": {m: _needs(FentryBackend, m, *_FENTRY) for m in MODES},
}
# `auto` takes the first available; the last is the floor
AUTO_ORDER = ("fentry", "kprobe", "tracepoint")


@dataclass(frozen=True)
class Capabilities:
    """Everything `detect()` found on this machine."""

    kernel: str
    root: bool
    bcc_version: str | None  # None: BCC is not importable
    compile_ms: float | None  # None: a trivial BCC program does not compile
    symbols: dict[str, int]  # KERNEL_SYMBOLS present in /proc/kallsyms -> address (0: hidden)
    hugepages: HugePages | None
    checks: tuple[Check, ...]
    elapsed_s: float

    def check(self, name: str) -> Check:
        """The check called `name` (KeyError if there is none)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def ok(self, name: str) -> bool:
        return self.check(name).ok


@functools.cache
def detect() -> Capabilities:
    """Probe this machine, once per process (about a second: clang, two real faults, and
    detaching the probes dominate)."""
    start = time.monotonic()
    release = os.uname().release
    root = os.geteuid() == 0
    bcc, bcc_check = checks.import_bcc()
    tracefs, tracefs_check = checks.find_tracefs()
    found = [
        Check("root", "system", root, f"uid {os.geteuid()}", FIX_ROOT),
        bcc_check,
        checks.check_headers(release),
        tracefs_check,
    ]
    bpf_checks, compile_ms = checks.probe_bpf(bcc, tracefs, tracefs_check)
    found += bpf_checks
    found.append(checks.check_bpf_stats())
    symbols, symbol_checks = checks.probe_kallsyms()
    found += symbol_checks
    found += checks.resolve_hooks(symbols)
    found += [checks.probe_minor_fault("shmem"), checks.probe_minor_fault("hugetlb")]
    hugepages = checks.read_hugepages()
    found.append(checks.check_hugepages(hugepages))
    if not root:
        found = [_blame_privileges(c) for c in found]
    return Capabilities(
        kernel=release,
        root=root,
        bcc_version=getattr(bcc, "__version__", "unknown") if bcc else None,
        compile_ms=compile_ms,
        symbols=symbols,
        hugepages=hugepages,
        checks=tuple(found),
        elapsed_s=time.monotonic() - start,
    )


def _blame_privileges(check: Check) -> Check:
    """Without root, a failure that says "permission" is fixed by root first."""
    denied = re.search(r"not permitted|permission denied|privileges", check.detail, re.I)
    return dataclasses.replace(check, fix=FIX_ROOT) if denied and not check.ok else check


# --- backend choice -------------------------------------------------------------------------


def missing(caps: Capabilities, backend: str, mode: str = "light") -> list[Check]:
    """The checks `backend` needs in `mode` that failed here."""
    return [c for name in REQUIREMENTS[backend][mode] if not (c := caps.check(name)).ok]


def available_modes(caps: Capabilities, backend: str) -> list[str]:
    """The modes of `backend` whose requirements are all met here."""
    return [mode for mode in REQUIREMENTS[backend] if not missing(caps, backend, mode)]


def auto_backend(caps: Capabilities) -> str | None:
    """The backend `auto` picks here, or None when tracing is impossible."""
    return next((b for b in AUTO_ORDER if available_modes(caps, b)), None)


def tracing_possible(caps: Capabilities) -> bool:
    """Whether any backend can run here, in at least its light mode."""
    return auto_backend(caps) is not None


def why_impossible(caps: Capabilities) -> str:
    """One line: what stops even the most permissive backend, and how to fix it."""
    lacking = missing(caps, AUTO_ORDER[-1])
    fix = f"; fix: {lacking[0].fix}" if lacking[0].fix else ""
    return f"tracing is impossible here: {_describe(lacking)}{fix}"


def choose_backend(requested: str, caps: Capabilities) -> str:
    """Resolve `auto` or a backend's name to a backend that can run here, or UserError."""
    if requested == "auto":
        backend = auto_backend(caps)
        if backend is None:
            raise UserError(f"{why_impossible(caps)} (details: uffdtrace doctor)")
        return backend
    if requested not in REQUIREMENTS:
        choices = ", ".join(["auto", *REQUIREMENTS])
        raise UserError(f"unknown backend {requested!r} (choose from {choices})")
    lacking = missing(caps, requested)
    if lacking:
        fallback = auto_backend(caps)
        hint = f"; `auto` would use the {fallback} backend" if fallback else ""
        raise UserError(f"the {requested} backend cannot run here: {_describe(lacking)}{hint}")
    return requested


def _describe(lacking: list[Check]) -> str:
    first = lacking[0]
    more = f", and {len(lacking) - 1} more" if len(lacking) > 1 else ""
    return f"{first.name} missing ({first.detail}){more}"
