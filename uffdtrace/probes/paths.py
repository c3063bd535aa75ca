"""Which kernel path a fault took: backing from the callers of handle_userfault, kind from a
calibration of their return addresses.

The BPF side samples one stack per (process, 2 MiB region) at the first sleep in
handle_userfault there. The first caller frame is a return address inside the function that
called handle_userfault (shmem_get_folio_gfp, hugetlb_fault's inlined no-page path,
do_anonymous_page, ...); its name gives the backing. Minor and missing faults call
handle_userfault from different call sites of the same function, so the return address itself
tells them apart once calibration has seen one fault of each kind (uffdtrace.calibrate).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from uffdtrace.pipeline import PathInfo
from uffdtrace.probes.kernel import kallsyms

BASE_PAGE = 4096


@functools.cache
def huge_page_size() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    return 2 << 20


def backing_of(frames: tuple[int, ...]) -> str:
    names = [kallsyms().name_at(a) or "" for a in frames[:3]]
    if any(n.startswith("hugetlb") for n in names):
        return "hugetlb"
    if any(n.startswith("shmem") for n in names):
        return "shmem"
    return "anon"


class PathClassifier:
    """Callable (pid, addr) -> PathInfo, caching per region once the kernel has a sample."""

    def __init__(self, region_frames: Callable[[int, int], tuple[int, ...] | None],
                 call_sites: dict[int, str]) -> None:
        self._region_frames = region_frames
        self._call_sites = call_sites
        self._cache: dict[tuple[int, int], PathInfo] = {}

    def __call__(self, pid: int, addr: int) -> PathInfo | None:
        key = (pid, addr >> 21)
        info = self._cache.get(key)
        if info is None:
            frames = self._region_frames(pid, addr)
            if not frames:
                return None  # no sleep seen in this region yet: ask again next time
            backing = backing_of(frames)
            page = huge_page_size() if backing == "hugetlb" else BASE_PAGE
            info = PathInfo(backing, page, self._call_sites.get(frames[0]))
            self._cache[key] = info
        return info
