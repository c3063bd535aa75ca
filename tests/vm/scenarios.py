"""What the VM run traces, and what each backend must do there.

The host kernel has no kprobes, so the kprobe and fentry backends can only be tested in the VM
(Debian's 6.1 kernel under qemu TCG, see harness.py). Under TCG everything is 10-50x slower
and each `record` compiles its BPF program (10-40 s), so a *session* is one `uffdtrace record`
around several exerciser *workloads* run by one process (tests/vm/workloads.py). Page counts
are small and latencies are never judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Workload:
    """One `uffdtrace exercise` run."""

    backing: str
    pages: int  # few: the guest has 2 GiB and TCG is slow (hugetlb pages are 2 MiB each)
    threads: int = 1
    handler: str = "thread"
    misuse: str | None = None

    @property
    def args(self) -> list[str]:
        args = ["--backing", self.backing, "--pages", str(self.pages), "--threads", str(self.threads),
                "--handler", self.handler]
        return [*args, "--misuse", self.misuse] if self.misuse else args


WORKLOADS = {
    "shmem": Workload("shmem", 60),
    "shmem-4t-process": Workload("shmem", 60, threads=4, handler="process"),
    "hugetlb": Workload("hugetlb", 16),
    "hugetlb-4t-process": Workload("hugetlb", 24, threads=4, handler="process"),
    # UFFDIO_COPY onto a page that is already there: EEXIST (17), on 6.1 as on 6.18.
    "misuse": Workload("shmem", 30, misuse="copy-on-minor"),
}
MISUSE_ERRNO = 17

# Symbols the fallback session pretends are absent (UFFDTRACE_HIDE_SYMBOLS): shmem's fault hook
# falls back to shmem_get_folio_gfp; hugetlb's has no fallback (the backing then comes from the
# resolver's PTE-install function); CONTINUE's mcopy/mfill hook has none on 6.1.
HIDDEN = ("hugetlb_fault", "shmem_fault", "mcopy_continue")


@dataclass(frozen=True)
class Session:
    """One `uffdtrace record --backend B --mode M -- python -m tests.vm.workloads ...`."""

    name: str
    backend: str  # as asked on the command line
    mode: str
    reported: str  # the backend the summary must name
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    env: dict[str, str] = field(default_factory=dict)

    def scenario(self) -> dict[str, Any]:
        """The row as tests/vm/guest.py reads it from scenarios.json."""
        return {"name": self.name, "backend": self.backend, "mode": self.mode, "env": self.env,
                "workloads": {w: WORKLOADS[w].args for w in self.workloads}}


SESSIONS = [
    Session("kprobe-light", "kprobe", "light", "kprobe"),
    Session("kprobe-full", "kprobe", "full", "kprobe"),
    Session("auto-light", "auto", "light", "fentry"),  # auto prefers fentry where it exists
    Session("kprobe-fallbacks", "kprobe", "light", "kprobe", ("shmem", "hugetlb", "misuse"),
            env={"UFFDTRACE_HIDE_SYMBOLS": ",".join(HIDDEN)}),
    # Light mode's code is full mode's less the ioctls: one session proves 6.1's verifier takes
    # the tracepoint backend (the host's tests cover light mode on the same workloads).
    Session("tracepoint-full", "tracepoint", "full", "tracepoint", ("shmem", "hugetlb-4t-process", "misuse")),
]
BY_NAME = {s.name: s for s in SESSIONS}

# Columns each backend and mode fills on every resolved fault, and leaves empty on all.
_TIMELINE = ("stall_ns", "block_ns", "wake_ns", "handler_pid", "handler_tid")
_IOCTL = ("resolver", "cont_enter_ns", "cont_exit_ns", "continue_ns", "mapped", "errno")
_MSG = ("msg_ns", "handler_ns")
_HOOKS = ("mfill_ns", "install_ns")
FILLED = {
    ("tracepoint", "full"): (*_TIMELINE, *_IOCTL, *_MSG),
    ("kprobe", "light"): (*_TIMELINE, *_IOCTL, *_HOOKS),
    ("kprobe", "full"): (*_TIMELINE, *_IOCTL, *_MSG, *_HOOKS),
    ("fentry", "light"): (*_TIMELINE, *_IOCTL, *_HOOKS),
}
EMPTY = {
    ("tracepoint", "full"): _HOOKS,
    ("kprobe", "light"): _MSG,
    ("kprobe", "full"): (),
    ("fentry", "light"): _MSG,
}
