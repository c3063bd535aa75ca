"""Per-kernel facts learned once per boot, above all by provoking faults of known kind.

Some facts that tell minor from missing faults depend on the kernel build and on KASLR: which
call sites of handle_userfault mean which kind (tracepoint backend), or the value of its
`reason` argument (kprobe backend: VM_UFFD_MINOR's bit differs between kernels). Instead of
trusting constants, we run one tiny minor and one missing workload per backing in this process
while the backend traces it, note the value it observed for each, and keep the answers for
this boot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from uffdtrace.errors import UserError

CACHE = Path("/run/uffdtrace/calibration.json")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

T = TypeVar("T")
# (pid, faulting addresses of one run) -> the distinct values the backend saw for that run
Observer = Callable[[int, np.ndarray], set[int]]


def calibrated(name: str, backend, observe: Observer) -> dict[int, str]:
    """Value -> kind ("minor" / "missing") for the fact `name`, from this boot's cache or
    learned now under `backend` (which must trace this process when told to `track` it)."""
    learned = per_boot(name, lambda: {f"{v:#x}": kind for v, kind in _provoke(backend, observe).items()})
    return {int(v, 16): kind for v, kind in learned.items()}


def per_boot(name: str, compute: Callable[[], T]) -> T:
    """A JSON-able fact about this boot of this machine: cached, or computed now and cached
    (unless empty: learning nothing may be transient)."""
    cache = _load()
    if name in cache:
        return cache[name]
    value = compute()
    if value:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(json.dumps({"boot_id": _boot_id(), **cache, name: value}))
    return value


def _boot_id() -> str:
    return BOOT_ID.read_text().strip()


def _load() -> dict[str, Any]:
    """This boot's cached facts (empty after a reboot or without a cache)."""
    try:
        data = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}
    return data if data.pop("boot_id", None) == _boot_id() else {}


def _provoke(backend, observe: Observer) -> dict[int, str]:
    """Each value observed in runs of only one kind -> that kind. A value seen for both kinds
    (say, a call site shared by minor and missing faults) tells nothing: dropped, not guessed."""
    from uffdtrace.exerciser import ExerciseConfig, run

    me = os.getpid()
    backend.track(me)
    kinds: dict[int, set[str]] = {}
    try:
        for backing in ("shmem", "hugetlb"):
            for mode in ("minor", "missing"):
                cfg = ExerciseConfig(backing=backing, mode=mode, pages=2, cpus=[0])
                try:
                    res = run(cfg)
                except UserError:
                    break  # e.g. no hugepages here: the other backing still teaches
                for value in observe(me, res.faults["addr"].to_numpy()):
                    kinds.setdefault(value, set()).add(mode)
    finally:
        backend.untrack(me)
    return {value: seen.pop() for value, seen in kinds.items() if len(seen) == 1}
