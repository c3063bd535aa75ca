"""Which kernel path a fault took: its backing (hugetlb / shmem / anon), page size and kind.

Each backend sees the path differently, so each has a `PathClassifier`: a callable from a
batch of fault records to a DataFrame of those three columns, one row per record (None / <NA>
where the path is unknown).

- Tracepoint backend (`StackClassifier`): the BPF side samples one stack per (process, 2 MiB
  region, generation of the process's mappings) at the first sleep in handle_userfault there.
  The first caller frame is a return address inside the function that called handle_userfault
  (shmem_get_folio_gfp, hugetlb_fault's inlined no-page path, __handle_mm_fault with
  do_anonymous_page inlined, ...). A hugetlb or shmem function's name gives the backing.
  Minor and missing faults call handle_userfault from different call sites of the same
  function, so the return address itself tells them apart once calibration has seen one fault
  of each (kind, backing) (uffdtrace.probes.calibration); generic call sites (anonymous
  memory's) get their backing from calibration too. Where one call site serves both kinds
  (hugetlb on Debian's 6.1), calibration sees it for both and the kind stays unknown. A
  write-protect fault is told by its error code: the page was present.
- Kprobe backend (`HookClassifier`): the fault's own hooks say it (hugetlb_fault or shmem's fault
  handler hit before handle_userfault, and handle_userfault's `reason`, calibrated).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from uffdtrace.aggregate import distinct_rows
from uffdtrace.probes.calibration import Learned
from uffdtrace.probes.kernel import kallsyms
from uffdtrace.probes.records import F_HUGETLB, F_SHMEM, F_UFFD, FAULT_DTYPE

BASE_PAGE = 4096
X86_PF_PROT = 1  # page fault error code: the page was present (a protection fault)

PathClassifier = Callable[[np.ndarray], pd.DataFrame]  # + of_stats_keys (--mode stats)


@functools.cache
def huge_page_size() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    return 2 << 20


def paths_frame(backing: np.ndarray, kind: np.ndarray) -> pd.DataFrame:
    """A classifier's result from per-record object arrays of backing and kind (None: unknown)."""
    known = pd.notna(backing)
    page = np.where(backing == "hugetlb", huge_page_size(), BASE_PAGE)
    return pd.DataFrame({
        "backing": pd.array(backing, dtype="string"),
        "page_size": pd.Series(page, dtype="Int64").where(known),
        "kind": pd.array(kind, dtype="string"),
    })


def backing_of(frames: tuple[int, ...], call_sites: dict[int, Learned]) -> str | None:
    names = [kallsyms().name_at(a) or "" for a in frames[:3]]
    if any(n.startswith("hugetlb") for n in names):
        return "hugetlb"
    if any(n.startswith("shmem") for n in names):
        return "shmem"
    learned = call_sites.get(frames[0])
    return learned.backing if learned else None


@dataclass(frozen=True)
class PathInfo:
    backing: str
    kind: str | None


class StackClassifier:
    """Classifies by the stack sampled per region, cached per region once the kernel has one."""

    def __init__(self, region_frames: Callable[[int, int, int], tuple[int, ...] | None],
                 call_sites: dict[int, Learned]) -> None:
        self._region_frames = region_frames  # (pid, generation, addr) -> frames
        self._call_sites = call_sites
        self._cache: dict[tuple[int, int, int], PathInfo] = {}

    def region(self, pid: int, gen: int, addr: int) -> PathInfo | None:
        key = (pid, gen, addr >> 21)
        info = self._cache.get(key)
        if info is None:
            frames = self._region_frames(pid, gen, addr)
            if not frames:
                return None  # no sleep seen in this region yet: ask again next time
            info = self._cache[key] = self._of_frames(frames)
        return info

    def _of_frames(self, frames: tuple[int, ...]) -> PathInfo:
        site = self._call_sites.get(frames[0])
        return PathInfo(backing_of(frames, self._call_sites), site.kind if site else None)

    def of_stats_keys(self, keys: np.ndarray) -> tuple[list[str | None], list[str | None]]:
        """Backing and kind of --mode stats aggregates, from the callers in their key."""
        infos = [self._of_frames(frames) if (frames := tuple(int(a) for a in k["path"] if a)) else None
                 for k in keys]
        return [i.backing if i else None for i in infos], [i.kind if i else None for i in infos]

    def __call__(self, f: np.ndarray) -> pd.DataFrame:
        inverse, first = distinct_rows(f["pid"], f["gen"], f["addr"] >> np.uint64(21))  # regions
        infos = [self.region(int(f["pid"][i]), int(f["gen"][i]), int(f["addr"][i])) for i in first]
        backing = np.array([p.backing if p else None for p in infos], dtype=object)
        kind = np.array([p.kind if p else None for p in infos], dtype=object)[inverse]
        kind[(f["error_code"] & X86_PF_PROT) != 0] = "wp"
        return paths_frame(backing[inverse], kind)


class HookClassifier:
    """Classifies by the fault's kernel-function hooks: backing from hugetlb_fault / shmem's fault
    handler, kind from handle_userfault's `reason` (value -> kind, calibrated)."""

    def __init__(self, reason_kinds: dict[int, str], sees_every_backing: bool) -> None:
        self._reason_kinds = reason_kinds
        self._anon_when_neither = sees_every_backing  # else "neither" may be a missing hook

    def __call__(self, f: np.ndarray) -> pd.DataFrame:
        flags = f["flags"]
        uffd = (flags & F_UFFD) != 0
        conditions = [(flags & F_HUGETLB) != 0, (flags & F_SHMEM) != 0,
                      uffd & self._anon_when_neither]
        backing = np.select(conditions, np.array(["hugetlb", "shmem", "anon"], dtype=object), None)
        kind = pd.Series(f["reason"]).map(self._reason_kinds).where(uffd)
        return paths_frame(backing, kind.to_numpy(dtype=object, na_value=None))

    def of_stats_keys(self, keys: np.ndarray) -> tuple[list[str | None], list[str | None]]:
        """Backing and kind of --mode stats aggregates, from the hooks and reason in their key."""
        f = np.zeros(len(keys), FAULT_DTYPE)
        f["flags"], f["reason"] = keys["hooks"], keys["path"][:, 0]
        paths = self(f)
        return (paths["backing"].astype(object).where(paths["backing"].notna(), None).tolist(),
                paths["kind"].astype(object).where(paths["kind"].notna(), None).tolist())
