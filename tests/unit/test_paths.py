"""Which kernel path a fault took (uffdtrace/probes/paths.py), on synthetic stacks, a synthetic
kallsyms and synthetic hook flags: no kernel, no root.

The symbol table is laid out as a kernel's text section might be: each fault's sampled stack
starts with a return address inside the function that called handle_userfault, and the call
sites learned by calibration say which kind (and, for generic sites, which backing) each one
means.
"""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uffdtrace.errors import UserError
from uffdtrace.probes import kernel, paths
from uffdtrace.probes.calibration import Learned
from uffdtrace.probes.kernel import KernelSymbols
from uffdtrace.probes.paths import HookClassifier, StackClassifier, backing_of, paths_frame
from uffdtrace.probes.records import F_BLOCKED, F_HUGETLB, F_SHMEM, F_UFFD, FAULT_DTYPE

TEXT = 0xFFFFFFFF81000000
FUNCTIONS = ["_stext", "handle_userfault", "shmem_get_folio_gfp", "shmem_fault", "hugetlb_fault",
             "__handle_mm_fault", "handle_mm_fault", "do_user_addr_fault", "exc_page_fault"]
START = {name: TEXT + i * 0x1000 for i, name in enumerate(FUNCTIONS)}  # 4 KiB each
SYMBOLS = KernelSymbols(list(START.values()), list(START))

# Call sites of handle_userfault (return addresses), as calibration learns them.
SHMEM_MINOR = START["shmem_get_folio_gfp"] + 0x1A4
SHMEM_MISSING = START["shmem_get_folio_gfp"] + 0x2B8
HUGETLB_BOTH = START["hugetlb_fault"] + 0x3C0  # one site for both kinds (Debian's 6.1)
ANON_MISSING = START["__handle_mm_fault"] + 0x5D0  # do_anonymous_page inlined: generic
CALL_SITES = {
    SHMEM_MINOR: Learned("minor", "shmem"),
    SHMEM_MISSING: Learned("missing", "shmem"),
    HUGETLB_BOTH: Learned(None, "hugetlb"),
    ANON_MISSING: Learned("missing", "anon"),
}
CALLERS = (START["handle_mm_fault"] + 0x10, START["do_user_addr_fault"] + 0x2F,
           START["exc_page_fault"] + 0x77)
SHMEM_MINOR_STACK = (SHMEM_MINOR, START["shmem_fault"] + 0x60, *CALLERS)
SHMEM_MISSING_STACK = (SHMEM_MISSING, START["shmem_fault"] + 0x60, *CALLERS)
HUGETLB_STACK = (HUGETLB_BOTH, *CALLERS)
ANON_STACK = (ANON_MISSING, *CALLERS)

HUGE = 1 << 30  # not this host's huge page size: page_size must come from huge_page_size()
REGION = 2 << 20
BASE = 0x7F0000000000
HUGE_PAGE_SIZE = paths.huge_page_size  # the real one (replaced by HUGE in every test)


@pytest.fixture(autouse=True)
def synthetic_kernel(monkeypatch):
    monkeypatch.setattr(paths, "kallsyms", lambda: SYMBOLS)
    monkeypatch.setattr(paths, "huge_page_size", lambda: HUGE)


def faults(pid, addr, gen=0, error_code=0x6, flags=0, reason=0) -> np.ndarray:
    """Fault records; scalars apply to every record. error_code 0x6: a user write to a page
    that was not present."""
    n = len(addr)
    f = np.zeros(n, FAULT_DTYPE)
    for name, value in {"pid": pid, "addr": addr, "gen": gen, "error_code": error_code,
                        "flags": flags, "reason": reason}.items():
        f[name] = np.broadcast_to(np.asarray(value, dtype=np.uint64), n)
    return f


def rows(df: pd.DataFrame) -> list[tuple]:
    """(backing, page_size, kind) per row, None where unknown."""
    return [tuple(None if pd.isna(v) else v for v in r) for r in
            df[["backing", "page_size", "kind"]].itertuples(index=False)]


class Stacks:
    """The BPF side's per-region stacks: (pid, gen, region) -> frames; counts the look-ups."""

    def __init__(self, stacks: dict[tuple[int, int, int], tuple[int, ...]]) -> None:
        self.stacks = stacks
        self.asked: list[tuple[int, int, int]] = []

    def __call__(self, pid: int, gen: int, addr: int) -> tuple[int, ...] | None:
        self.asked.append((pid, gen, addr >> 21))
        return self.stacks.get((pid, gen, addr >> 21))


# --- the symbol table ---------------------------------------------------------------------


def test_name_at_and_range_of_a_function():
    shmem = START["shmem_get_folio_gfp"]
    assert SYMBOLS.name_at(shmem) == "shmem_get_folio_gfp"
    assert SYMBOLS.name_at(shmem + 0xFFF) == "shmem_get_folio_gfp"
    assert SYMBOLS.name_at(shmem + 0x1000) == "shmem_fault"
    assert SYMBOLS.name_at(TEXT - 1) is None
    assert SYMBOLS.range_of("shmem_get_folio_gfp") == (shmem, shmem + 0x1000)
    assert SYMBOLS.range_of("exc_page_fault") == (START["exc_page_fault"], START["exc_page_fault"] + 1)
    assert SYMBOLS.range_of("no_such_function") is None
    aliased = KernelSymbols([0x10, 0x10, 0x30], ["a", "b", "c"])  # two names, one address
    assert aliased.range_of("a") == (0x10, 0x30)


KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81004000 t hugetlb_fault
ffffffff81001000 T handle_userfault
ffffffff81002000 t shmem_get_folio_gfp
ffffffff81a00000 D jiffies_like_data
ffffffff81005000 W weak_function
ffffffffc0401000 t kvm_module_function\t[kvm]
"""


def opening(fake: Path):
    """An `open` for the module under test: opens `fake`, whatever path it is given."""

    def open_(path, *args, **kwargs):
        return builtins.open(fake, *args, **kwargs)  # the caller closes it

    return open_


def read_kallsyms(monkeypatch, tmp_path: Path, text: str, hide: str = "") -> KernelSymbols:
    fake = tmp_path / "kallsyms"
    fake.write_text(text)
    monkeypatch.setattr(kernel, "open", opening(fake), raising=False)
    monkeypatch.setenv(kernel.HIDE_SYMBOLS_ENV, hide)
    return kernel.kallsyms.__wrapped__()


def test_kallsyms_keeps_text_symbols_sorted(monkeypatch, tmp_path):
    syms = read_kallsyms(monkeypatch, tmp_path, KALLSYMS)
    assert syms.names == ["_stext", "handle_userfault", "shmem_get_folio_gfp", "hugetlb_fault",
                          "kvm_module_function"]
    assert syms.addrs == sorted(syms.addrs) and syms.addrs[1] == 0xFFFFFFFF81001000
    assert syms.name_at(0xFFFFFFFF81002ABC) == "shmem_get_folio_gfp"


def test_kallsyms_hides_what_the_environment_says(monkeypatch, tmp_path):
    syms = read_kallsyms(monkeypatch, tmp_path, KALLSYMS, hide="hugetlb_fault,,shmem_get_folio_gfp")
    assert syms.present == {"_stext", "handle_userfault", "kvm_module_function"}


def test_kallsyms_without_addresses_asks_for_root(monkeypatch, tmp_path):
    """What an unprivileged reader sees with kptr_restrict: every address 0."""
    zeros = "".join(f"0000000000000000 {line.split(' ', 1)[1]}\n" for line in KALLSYMS.splitlines())
    with pytest.raises(UserError, match=r"^/proc/kallsyms shows no addresses: run as root "
                                        r"\(kptr_restrict\)$"):
        read_kallsyms(monkeypatch, tmp_path, zeros)


@pytest.mark.parametrize(("meminfo", "size"), [
    ("MemTotal:       16384000 kB\nHugePages_Total:       0\nHugepagesize:    1048576 kB\n", 1 << 30),
    ("MemTotal:       16384000 kB\nHugepagesize:       2048 kB\n", 2 << 20),
    ("MemTotal:       16384000 kB\n", 2 << 20),  # no hugetlbfs: the x86-64 default
], ids=["1G", "2M", "none"])
def test_huge_page_size_from_meminfo(monkeypatch, tmp_path, meminfo, size):
    fake = tmp_path / "meminfo"
    fake.write_text(meminfo)
    monkeypatch.setattr(paths, "open", opening(fake), raising=False)
    assert HUGE_PAGE_SIZE.__wrapped__() == size


# --- backing from the stack ---------------------------------------------------------------


@pytest.mark.parametrize(("frames", "backing"), [
    (SHMEM_MINOR_STACK, "shmem"),
    (HUGETLB_STACK, "hugetlb"),
    (ANON_STACK, "anon"),  # a generic call site: only calibration knows its backing
    # a hugetlb or shmem function among the first three frames decides, not the call site
    ((ANON_MISSING, START["handle_mm_fault"] + 8, START["hugetlb_fault"] + 0x20), "hugetlb"),
    ((ANON_MISSING, START["shmem_fault"] + 8), "shmem"),
    # further down it does not: the call site does
    ((ANON_MISSING, *CALLERS[:2], START["hugetlb_fault"] + 0x20), "anon"),
    ((START["__handle_mm_fault"] + 0x123, *CALLERS), None),  # a call site never calibrated
    ((TEXT - 0x40, *CALLERS), None),  # below the first symbol
])
def test_backing_of_a_stack(frames, backing):
    assert backing_of(frames, CALL_SITES) == backing


def test_a_call_site_seen_for_two_backings_tells_none():
    site = START["__handle_mm_fault"] + 0x600
    assert backing_of((site, *CALLERS), {site: Learned("missing", None)}) is None


# --- StackClassifier ----------------------------------------------------------------------


def test_each_region_gets_the_path_of_its_stack():
    """One fault per region: backing from the stack, kind from the call site (none for a site
    that serves both kinds), page size from the backing."""
    stacks = Stacks({(1, 0, (BASE >> 21) + i): s for i, s in enumerate(
        [SHMEM_MINOR_STACK, SHMEM_MISSING_STACK, HUGETLB_STACK, ANON_STACK,
         (START["__handle_mm_fault"] + 0x123, *CALLERS)])})
    out = StackClassifier(stacks, CALL_SITES)(faults(1, [BASE + i * REGION + 0x42 for i in range(5)]))
    assert rows(out) == [("shmem", 4096, "minor"), ("shmem", 4096, "missing"),
                         ("hugetlb", HUGE, None), ("anon", 4096, "missing"), (None, None, None)]
    assert [str(t) for t in out.dtypes] == ["string", "Int64", "string"]


def test_a_region_is_asked_for_once_per_process_and_generation():
    """Faults of one 2 MiB region share its stack, across batches; another process, another
    generation of the process's mappings (an munmap/mmap in between) or the next region is
    asked for anew."""
    stacks = Stacks({(1, 0, BASE >> 21): SHMEM_MINOR_STACK,
                     (1, 1, BASE >> 21): ANON_STACK,
                     (2, 0, BASE >> 21): HUGETLB_STACK,
                     (1, 0, (BASE >> 21) + 1): SHMEM_MISSING_STACK})
    classify = StackClassifier(stacks, CALL_SITES)
    out = classify(faults(pid=[1, 1, 2, 1, 1, 1],
                          addr=[BASE, BASE + REGION - 1, BASE + 0x1000, BASE + 0x5000, BASE + REGION,
                                BASE + 0x3000],
                          gen=[0, 0, 0, 1, 0, 0]))
    assert rows(out) == [("shmem", 4096, "minor"), ("shmem", 4096, "minor"), ("hugetlb", HUGE, None),
                         ("anon", 4096, "missing"), ("shmem", 4096, "missing"), ("shmem", 4096, "minor")]
    assert sorted(stacks.asked) == sorted(stacks.stacks)  # each region once
    classify(faults(1, [BASE + 0x7000, BASE + REGION + 0x7000]))
    assert len(stacks.asked) == 4  # cached


def test_a_region_without_a_stack_yet_is_asked_again():
    """No sleep seen there yet: unknown now, and asked for again in the next batch, when the
    kernel may have sampled one."""
    stacks = Stacks({})
    classify = StackClassifier(stacks, CALL_SITES)
    assert rows(classify(faults(1, [BASE, BASE + 8]))) == [(None, None, None)] * 2
    stacks.stacks[(1, 0, BASE >> 21)] = SHMEM_MINOR_STACK
    assert rows(classify(faults(1, [BASE + 16]))) == [("shmem", 4096, "minor")]
    assert stacks.asked == [(1, 0, BASE >> 21)] * 2


def test_a_protection_fault_is_write_protect_whatever_the_call_site():
    """Error code bit 0 (X86_PF_PROT): the page was present, so a wp fault; the backing still
    comes from the stack. Other error-code bits (write, user) say nothing of the kind."""
    stacks = Stacks({(1, 0, BASE >> 21): SHMEM_MINOR_STACK})
    out = StackClassifier(stacks, CALL_SITES)(
        faults(1, [BASE, BASE, BASE, BASE + REGION], error_code=[0x7, 0x6, 0x4, 0x5]))
    assert rows(out) == [("shmem", 4096, "wp"), ("shmem", 4096, "minor"), ("shmem", 4096, "minor"),
                         (None, None, "wp")]


def test_an_empty_batch():
    out = StackClassifier(Stacks({}), CALL_SITES)(faults(1, []))
    assert out.empty and list(out.columns) == ["backing", "page_size", "kind"]


# --- HookClassifier -----------------------------------------------------------------------

MINOR_REASON, MISSING_REASON, WP_REASON = 0x80, 0x10, 0x40  # as calibration may find them
REASONS = {MINOR_REASON: "minor", MISSING_REASON: "missing", WP_REASON: "wp"}


def test_hooks_give_backing_and_reason_gives_kind():
    flags = [F_UFFD | F_SHMEM, F_UFFD | F_HUGETLB, F_UFFD, F_UFFD | F_SHMEM | F_BLOCKED, F_UFFD]
    reason = [MINOR_REASON, MISSING_REASON, MISSING_REASON, WP_REASON, 0x1234]
    out = HookClassifier(REASONS, sees_every_backing=True)(faults(1, [BASE] * 5, flags=flags,
                                                                  reason=reason))
    assert rows(out) == [("shmem", 4096, "minor"), ("hugetlb", HUGE, "missing"),
                         ("anon", 4096, "missing"), ("shmem", 4096, "wp"),
                         ("anon", 4096, None)]  # a reason calibration never saw: no kind


def test_without_every_fault_hook_a_plain_uffd_fault_has_no_backing():
    """When hugetlb_fault or shmem's fault handler could not be hooked, a fault that hit
    neither may be one whose hook is missing: not called anonymous."""
    out = HookClassifier(REASONS, sees_every_backing=False)(
        faults(1, [BASE] * 3, flags=[F_UFFD, F_UFFD | F_SHMEM, F_UFFD | F_HUGETLB], reason=MINOR_REASON))
    assert rows(out) == [(None, None, "minor"), ("shmem", 4096, "minor"), ("hugetlb", HUGE, "minor")]


def test_a_fault_handle_userfault_never_saw_has_no_kind():
    out = HookClassifier(REASONS, sees_every_backing=True)(
        faults(1, [BASE] * 2, flags=[F_SHMEM, 0], reason=MINOR_REASON))
    assert [r[2] for r in rows(out)] == [None, None]
    assert rows(out)[1] == (None, None, None)


def test_paths_frame_page_size_only_where_the_backing_is_known():
    out = paths_frame(np.array(["hugetlb", None, "anon"], dtype=object),
                      np.array([None, "minor", "missing"], dtype=object))
    assert rows(out) == [("hugetlb", HUGE, None), (None, None, "minor"), ("anon", 4096, "missing")]
    assert [str(t) for t in out.dtypes] == ["string", "Int64", "string"]
