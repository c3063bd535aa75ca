"""The kprobe backend: the tracepoint programs plus kprobes on the userfaultfd functions.

Where the kernel has kprobes (distro kernels), hooks on handle_userfault, the fault handlers
and the mcopy/mfill and PTE-install functions replace guesswork with facts: which faults are
userfaultfd faults and of which kind, the backing, every uffd ioctl (in light mode too,
without syscall tracepoints) and the time spent in the ioctl's own work. The scheduler's
view (block, wake, resume, return) still comes from the tracepoints.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np

from uffdtrace.errors import UserError
from uffdtrace.probes import hooks
from uffdtrace.probes.calibration import calibrated
from uffdtrace.probes.kernel import kallsyms
from uffdtrace.probes.paths import HookPaths, Paths
from uffdtrace.probes.records import F_UFFD
from uffdtrace.probes.tracepoint import TracepointBackend

# Return probes need one instance per thread inside the function at once. Threads sleep inside
# userfaultfd_ioctl (a COPY waiting for a page lock, say), so allow many more than the
# kernel's default of max(10, 2 * CPUs).
KRETPROBE_MAXACTIVE = 1024


@dataclass
class KprobeBackend(TracepointBackend):
    name: str = "kprobe"
    recorded_flags: int = F_UFFD

    def source(self) -> str:
        bpf = resources.files("uffdtrace.bpf")
        return bpf.joinpath("tracepoint.c").read_text() + bpf.joinpath("kprobe.c").read_text()

    def cflags(self) -> list[str]:
        flags = [*super().cflags(), "-DKPROBE_BACKEND"]
        if self._ioctl_hook_exists():
            flags.append("-DIOCTL_KPROBE")  # else full mode keeps the syscall tracepoints' view
        return flags

    def _ioctl_hook_exists(self) -> bool:
        return hooks.resolve(kallsyms().names)["ioctl"] is not None

    def attach(self) -> None:
        """Attach each hook to the first of its symbols that this kernel has and that takes a
        kprobe (a listed symbol may still be notrace or partly inlined)."""
        present = set(kallsyms().names)
        for hook in hooks.HOOKS:
            self.attached[hook.name] = None
            for symbol in (s for s in hook.symbols if s in present):
                if self._attach(hook, symbol):
                    self.attached[hook.name] = symbol
                    break
            if hook.required and self.attached[hook.name] is None:
                raise UserError(f"the kprobe backend needs a kprobe on {' or '.join(hook.symbols)}, "
                                "which this kernel does not allow: use --backend tracepoint")

    def _attach(self, hook: hooks.Hook, symbol: str) -> bool:
        """Entry and return probes of `hook` on `symbol`, both or neither."""
        try:
            self._bpf.attach_kprobe(event=symbol, fn_name=hook.entry)
        except Exception:  # BCC raises a plain Exception: "not traceable"
            return False
        if hook.ret:
            try:
                self._bpf.attach_kretprobe(event=symbol, fn_name=hook.ret,
                                           maxactive=KRETPROBE_MAXACTIVE)
            except Exception:
                self._bpf.detach_kprobe(event=symbol, fn_name=hook.entry)
                return False
        return True

    def paths(self) -> Paths:
        """Kind from handle_userfault's reason: which value means minor is learned per boot."""
        gate = self._bpf["calibrating"]
        gate[ctypes.c_int(0)] = ctypes.c_uint32(os.getpid())
        try:
            reasons = calibrated("reasons", self, self._reasons_seen)
        finally:
            gate[ctypes.c_int(0)] = ctypes.c_uint32(0)
        sees_every_backing = all(self.attached.get(h) for h in ("hugetlb-fault", "shmem-fault"))
        return HookPaths(reasons, sees_every_backing)

    def sees_ioctls(self) -> bool:
        if self._ioctl_hook_exists():
            return self.attached.get("ioctl") is not None
        return self.mode == "full"

    def _reasons_seen(self, pid: int, addrs: np.ndarray) -> set[int]:
        table = self._bpf["reasons_seen"]
        seen = {k.reason for k in table}
        table.clear()
        return seen

