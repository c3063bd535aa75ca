"""What the VM run traces (one row per traced exerciser run) and what each backend must do there.

The host kernel has no kprobes, so the kprobe backend can only be tested in the VM (Debian's
6.1 kernel under qemu TCG, see harness.py). Everything is 10-50x slower under TCG: page
counts are small and latencies are never judged. To cover another backend, add rows with
`backend="kprobe"` or `"auto"` to CASES and its entry to BACKENDS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    """One `uffdtrace record --backend B --mode M -- uffdtrace exercise ...` in the guest."""

    name: str
    backend: str
    mode: str
    backing: str
    pages: int  # few: the guest has 2 GiB and TCG is slow (hugetlb pages are 2 MiB each)
    threads: int = 1
    handler: str = "thread"
    misuse: str | None = None
    misuse_errno: int | None = None  # the kernel's answer to the misuse (the exerciser's truth)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def exercise(self) -> list[str]:
        args = ["--backing", self.backing, "--pages", str(self.pages), "--threads", str(self.threads),
                "--handler", self.handler]
        return [*args, "--misuse", self.misuse] if self.misuse else args

    def scenario(self) -> dict[str, Any]:
        """The row as tests/vm/guest.py reads it from scenarios.json."""
        return {"name": self.name, "backend": self.backend, "mode": self.mode,
                "exercise": self.exercise, "env": self.env}


CASES: list[Case] = [
    Case("tracepoint-shmem-light", "tracepoint", "light", "shmem", 300),
    Case("tracepoint-hugetlb-4t-process-light", "tracepoint", "light", "hugetlb", 100, threads=4,
         handler="process"),
    Case("tracepoint-shmem-4t-full", "tracepoint", "full", "shmem", 300, threads=4),
    Case("tracepoint-hugetlb-process-full", "tracepoint", "full", "hugetlb", 100, handler="process"),
    # UFFDIO_COPY onto a page that is already there: EEXIST, on 6.1 as on 6.18.
    Case("tracepoint-misuse-copy-on-minor", "tracepoint", "full", "shmem", 100,
         misuse="copy-on-minor", misuse_errno=17),
]


# ---- Backend-specific expectations: the only place where backends may differ. ----------------

@dataclass(frozen=True)
class Backend:
    """What `record --backend <key>` must do on the guest kernel (6.1, kprobes available)."""

    reported: str  # the summary's "backend": what actually traced
    empty: dict[str, tuple[str, ...]]  # per mode: columns it cannot know (empty, never guessed)
    resolved: dict[str, tuple[str, ...]]  # per mode: columns set on every resolved fault


_NOT_LIGHT = ("msg_ns", "notify_ns", "handler_ns", "resolver", "cont_enter_ns", "cont_exit_ns",
              "continue_ns", "errno", "mapped")
_ALWAYS = ("stall_ns", "block_ns", "wake_ns", "handler_pid", "handler_tid")

BACKENDS: dict[str, Backend] = {
    "tracepoint": Backend(
        reported="tracepoint",
        empty={"light": (*_NOT_LIGHT, "mfill_ns", "install_ns"), "full": ("mfill_ns", "install_ns")},
        resolved={"light": _ALWAYS, "full": (*_ALWAYS, "msg_ns", "resolver", "continue_ns")},
    ),
}
