"""The kernel functions the kprobe backend hooks, with their names across kernels.

Userfaultfd internals were renamed between 5.13 and 6.x (DESIGN §2) and many helpers are static
and may be inlined, so each hook lists candidate symbols in order of preference and takes the
first one /proc/kallsyms has. `doctor` reports the same resolution the backend attaches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    name: str
    symbols: tuple[str, ...]  # candidates, preferred first
    entry: str                # BPF function (bpf/kprobe.c) run at entry
    ret: str | None           # ... and at return
    gives: str                # what the record gains from it
    required: bool = False


HOOKS = (
    Hook("fault", ("handle_userfault",), "on_uffd_fault", None,
         "which faults are userfaultfd faults, and their kind (from `reason`)", required=True),
    Hook("hugetlb-fault", ("hugetlb_fault",), "on_hugetlb_fault", None, "backing hugetlb"),
    Hook("shmem-fault", ("shmem_fault", "shmem_get_folio_gfp"), "on_shmem_fault", None,
         "backing shmem"),
    Hook("ioctl", ("userfaultfd_ioctl",), "on_ioctl_enter", "on_ioctl_return",
         "every uffd ioctl with its range, errno and `mapped`, without syscall tracepoints"),
    Hook("continue", ("mfill_atomic_continue", "mcopy_continue"), "on_mfill_enter",
         "on_mfill_return", "mfill_ns of CONTINUE"),
    Hook("copy", ("mfill_atomic_copy", "mcopy_atomic"), "on_mfill_enter", "on_mfill_return",
         "mfill_ns of COPY"),
    Hook("zeropage", ("mfill_atomic_zeropage", "mfill_zeropage"), "on_mfill_enter",
         "on_mfill_return", "mfill_ns of ZEROPAGE"),
    Hook("hugetlb-install", ("hugetlb_mfill_atomic_pte", "hugetlb_mcopy_atomic_pte"),
         "on_hugetlb_install", "on_install_return", "install_ns; hugetlb from the resolver's side"),
    Hook("shmem-install", ("shmem_mfill_atomic_pte",), "on_shmem_install", "on_install_return",
         "install_ns of shmem COPY / ZEROPAGE"),
    Hook("pte-install", ("mfill_atomic_pte_continue", "mcontinue_atomic_pte", "mfill_atomic_install_pte"),
         "on_pte_install", "on_install_return", "install_ns of shmem CONTINUE"),
)


SYMBOLS = tuple(dict.fromkeys(s for h in HOOKS for s in h.symbols))


def resolve(present: Iterable[str]) -> dict[str, str | None]:
    """Hook name -> the first of its symbols in `present` (None: this kernel has none)."""
    present = set(present)
    return {h.name: next((s for s in h.symbols if s in present), None) for h in HOOKS}
