"""The kernel functions the kprobe and fentry backends hook, with their names across kernels.

Userfaultfd internals were renamed between 5.13 and 6.x (docs/design.md, 'Renamed userfaultfd
internals') and many helpers are static and may be inlined, so each hook lists candidate
symbols in order of preference and takes the first one /proc/kallsyms has. `doctor` reports the
same resolution the backends attach.

The BPF side (bpf/kprobe.c) has one plain C function per hook action; the entry points that
call them are generated here, as kprobe/kretprobe functions or as fentry/fexit programs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    name: str
    symbols: tuple[str, ...]  # candidates, preferred first
    params: tuple[tuple[str, str], ...]  # (C type, name) of the leading arguments used
    entry: str  # C call at entry, in terms of `params`
    ret: str | None  # C call at return, in terms of `ret` (then `params` must be complete)
    gives: str  # what the record gains from it
    required: bool = False


HOOKS = (
    Hook("fault", ("handle_userfault",), (("void *", "vmf"), ("u64", "reason")),
         "uffd_fault(reason)", None,
         "which faults are userfaultfd faults, and their kind (from `reason`)", required=True),
    Hook("hugetlb-fault", ("hugetlb_fault",), (), "fault_path(F_HUGETLB)", None, "backing hugetlb"),
    Hook("shmem-fault", ("shmem_fault", "shmem_get_folio_gfp"), (), "fault_path(F_SHMEM)", None,
         "backing shmem"),
    Hook("ioctl", ("userfaultfd_ioctl",), (("void *", "file"), ("u32", "cmd"), ("u64", "arg")),
         "ioctl_enter(file, cmd, arg)", "ioctl_return(ret)",
         "every uffd ioctl with its range, errno and `mapped`, without syscall tracepoints"),
    Hook("continue", ("mfill_atomic_continue", "mcopy_continue"), (), "mfill_enter()",
         "mfill_return()", "mfill_ns of CONTINUE"),
    Hook("copy", ("mfill_atomic_copy", "mcopy_atomic"), (), "mfill_enter()", "mfill_return()",
         "mfill_ns of COPY"),
    Hook("zeropage", ("mfill_atomic_zeropage", "mfill_zeropage"), (), "mfill_enter()",
         "mfill_return()", "mfill_ns of ZEROPAGE"),
    Hook("hugetlb-install", ("hugetlb_mfill_atomic_pte", "hugetlb_mcopy_atomic_pte"), (),
         "install_enter(IO_HUGETLB)", "install_return()",
         "install_ns; hugetlb from the resolver's side"),
    Hook("shmem-install", ("shmem_mfill_atomic_pte",), (), "install_enter(IO_SHMEM)",
         "install_return()", "install_ns of shmem COPY / ZEROPAGE"),
    Hook("pte-install", ("mfill_atomic_pte_continue", "mcontinue_atomic_pte", "mfill_atomic_install_pte"),
         (), "install_enter(IO_PTE)", "install_return()", "install_ns of shmem CONTINUE"),
)
SYMBOLS = tuple(dict.fromkeys(s for h in HOOKS for s in h.symbols))


def resolve(present: Iterable[str]) -> dict[str, str | None]:
    """Hook name -> the first of its symbols in `present` (None: this kernel has none)."""
    present = set(present)
    return {h.name: next((s for s in h.symbols if s in present), None) for h in HOOKS}


def kprobe_functions(hook: Hook) -> tuple[str, str | None, str]:
    """(entry function name, return function name or None, their C source) for kprobes."""
    ident = hook.name.replace("-", "_")
    args = "".join(f"    {_decl(t, n)} = ({t})PT_REGS_PARM{i}(ctx);\n"
                   for i, (t, n) in enumerate(hook.params, 1))
    src = f"int hook_{ident}(struct pt_regs *ctx) {{\n{args}    return {hook.entry};\n}}\n"
    if hook.ret is None:
        return f"hook_{ident}", None, src
    src += (f"int hook_{ident}_return(struct pt_regs *ctx) {{\n"
            f"    long ret = PT_REGS_RC(ctx);\n    return {hook.ret};\n}}\n")
    return f"hook_{ident}", f"hook_{ident}_return", src


def fentry_programs(hook: Hook, symbol: str) -> str:
    """fentry (and fexit) programs on `symbol`; BCC attaches them when it loads them."""
    params = ", ".join(_decl(t, n) for t, n in hook.params)
    src = f"KFUNC_PROBE({symbol}{', ' if params else ''}{params}) {{ return {hook.entry}; }}\n"
    if hook.ret is not None:
        # fexit sees the return value after all the arguments; otherwise none are needed.
        ret_params = f", {params}, long ret" if re.search(r"\bret\b", hook.ret) else ""
        src += f"KRETFUNC_PROBE({symbol}{ret_params}) {{ return {hook.ret}; }}\n"
    return src


def _decl(ctype: str, name: str) -> str:
    return f"{ctype}{name}" if ctype.endswith("*") else f"{ctype} {name}"
