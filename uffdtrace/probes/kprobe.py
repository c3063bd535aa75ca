"""The kprobe and fentry backends: the tracepoint programs plus hooks on the userfaultfd
functions.

Where the kernel allows it (distro kernels), hooks on handle_userfault, the fault handlers and
the mcopy/mfill and PTE-install functions replace guesswork with facts: which faults are
userfaultfd faults and of which kind, the backing, every uffd ioctl (in light mode too,
without syscall tracepoints) and the time spent in the ioctl's own work. The scheduler's view
(block, wake, resume, return) still comes from the tracepoints. The two backends differ only
in how the hooks attach: kprobes/kretprobes, or BPF trampolines (fentry/fexit), which cost
less per call and need no return-probe instances.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from uffdtrace.errors import UserError
from uffdtrace.probes import hooks
from uffdtrace.probes.calibration import calibrated
from uffdtrace.probes.kernel import btf_function_arity, kallsyms
from uffdtrace.probes.paths import HookClassifier, PathClassifier
from uffdtrace.probes.records import F_UFFD
from uffdtrace.probes.tracepoint import BPF_DIR, TracepointBackend

# Return probes need one instance per thread inside the function at once. Threads sleep inside
# userfaultfd_ioctl (a COPY waiting for a page lock, say), so allow many more than the
# kernel's default of max(10, 2 * CPUs).
KRETPROBE_MAXACTIVE = 1024
# fentry/fexit trampolines handle at most this many arguments on x86-64 before Linux 6.6.
TRAMPOLINE_MAX_ARGS = 6


@dataclass
class KprobeBackend(TracepointBackend):
    name: str = "kprobe"
    recorded_flags: int = F_UFFD

    def source(self) -> str:
        return "".join([super().source(), BPF_DIR.joinpath("kprobe.c").read_text(),
                        self.entry_points()])

    def entry_points(self) -> str:
        return "".join(hooks.kprobe_functions(h)[2] for h in hooks.HOOKS)

    def resolved(self) -> dict[str, str | None]:
        return hooks.resolve(kallsyms().present)

    def cflags(self) -> list[str]:
        flags = [*super().cflags(), "-DKPROBE_BACKEND"]
        if self.resolved()["ioctl"]:
            flags.append("-DIOCTL_KPROBE")  # else full mode keeps the syscall tracepoints' view
        return flags

    def attach(self) -> None:
        """Attach each hook to the first of its symbols that this kernel has and that takes a
        kprobe (a listed symbol may still be notrace or partly inlined)."""
        for hook in hooks.HOOKS:
            self.attached[hook.name] = self._kprobe_first(hook)
        self._require_fault_hook()

    def _kprobe_first(self, hook: hooks.Hook) -> str | None:
        """"kprobe:<symbol>" for the first of the hook's symbols that takes its probes, or None."""
        present = kallsyms().present
        return next((f"kprobe:{s}" for s in hook.symbols if s in present and self._attach(hook, s)), None)

    def _require_fault_hook(self) -> None:
        for hook in hooks.HOOKS:
            if hook.required and self.attached[hook.name] is None:
                raise UserError(f"the {self.name} backend needs {' or '.join(hook.symbols)}, "
                                "which this kernel does not let it hook: use --backend tracepoint")

    def _attach(self, hook: hooks.Hook, symbol: str) -> bool:
        """Entry and return probes of `hook` on `symbol`, both or neither."""
        entry, ret, _ = hooks.kprobe_functions(hook)
        try:
            self._bpf.attach_kprobe(event=symbol, fn_name=entry)
        except Exception:  # BCC raises a plain Exception: "not traceable"
            return False
        if ret:
            try:
                self._bpf.attach_kretprobe(event=symbol, fn_name=ret, maxactive=KRETPROBE_MAXACTIVE)
            except Exception:
                self._bpf.detach_kprobe(event=symbol, fn_name=entry)
                return False
        return True

    def paths(self) -> PathClassifier:
        """Kind from handle_userfault's reason: which value means minor is learned per boot."""
        gate = self._bpf["calibrating"]
        gate[ctypes.c_int(0)] = ctypes.c_uint32(os.getpid())
        try:
            reasons = {v: found.kind for v, found in calibrated("reasons", self, self._reasons_seen).items()
                       if found.kind}
        finally:
            gate[ctypes.c_int(0)] = ctypes.c_uint32(0)
        sees_every_backing = all(self.attached.get(h) for h in ("hugetlb-fault", "shmem-fault"))
        return HookClassifier(reasons, sees_every_backing)

    @classmethod
    def tracepoints(cls, mode: str) -> tuple[str, ...]:
        """No syscall tracepoint in light mode: handle_userfault's hook sees every fault."""
        tps = super().tracepoints(mode)
        return tps if mode == "full" else tuple(tp for tp in tps if not tp.startswith("raw_syscalls:"))

    def reads_messages(self) -> bool:
        return self.mode == "full"  # handle_userfault's own hook sees every uffd fault

    def sees_ioctls(self) -> bool:
        if self.resolved()["ioctl"]:
            return self.attached.get("ioctl") is not None
        return self.mode == "full"

    def _reasons_seen(self, pid: int, addrs: np.ndarray) -> set[int]:
        table = self._bpf["reasons_seen"]
        seen = {k.reason for k in table}
        table.clear()
        return seen


@dataclass
class FentryBackend(KprobeBackend):
    """The same hooks as BPF trampolines where the kernel's BTF allows one (BCC attaches those
    while it loads them), kprobes for the rest."""

    name: str = "fentry"

    def trampolined(self) -> dict[str, str]:
        """Hook name -> symbol, for the hooks that get fentry/fexit programs."""
        arity = btf_function_arity()
        return {name: symbol for name, symbol in self.resolved().items()
                if symbol and arity.get(symbol, TRAMPOLINE_MAX_ARGS + 1) <= TRAMPOLINE_MAX_ARGS}

    def entry_points(self) -> str:
        chosen = self.trampolined()
        return super().entry_points() + "".join(
            hooks.fentry_programs(h, chosen[h.name]) for h in hooks.HOOKS if h.name in chosen)

    def attach(self) -> None:
        chosen = self.trampolined()
        for hook in hooks.HOOKS:
            if hook.name in chosen:
                self.attached[hook.name] = f"fentry:{chosen[hook.name]}"
            else:  # more arguments than a trampoline takes, or not in BTF
                self.attached[hook.name] = self._kprobe_first(hook)
        self._require_fault_hook()
