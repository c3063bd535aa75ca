"""Per-kernel facts learned once per boot, above all by provoking faults of known kind.

Some facts that tell minor from missing faults depend on the kernel build and on KASLR: which
call sites of handle_userfault mean which kind (tracepoint backend), or the value of its
`reason` argument (kprobe backend: VM_UFFD_MINOR's bit differs between kernels). Instead of
trusting constants, we run one tiny workload per (backing, kind) in this process while the
backend traces it (minor and missing on shmem and hugetlb; missing on private anonymous
memory, which has no minor faults), note the value it observed for each, and keep the answers
for this boot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from uffdtrace.errors import UserError

CACHE = Path("/run/uffdtrace/calibration.json")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

T = TypeVar("T")
# (pid, faulting addresses of one run) -> the distinct values the backend saw for that run
Observer = Callable[[int, np.ndarray], set[int]]
KINDS_BY_BACKING = {"shmem": ("minor", "missing"), "hugetlb": ("minor", "missing"), "anon": ("missing",)}


@dataclass(frozen=True)
class Learned:
    """What one observed value tells: the kind and the backing of the faults it was seen for
    (None: seen for more than one, so it tells nothing of that)."""

    kind: str | None
    backing: str | None


def calibrated(name: str, backend, observe: Observer) -> dict[int, Learned]:
    """Value -> what it tells, for the fact `name`, from this boot's cache or learned now under
    `backend` (which must trace this process when told to `track` it)."""
    # The cache key names what was provoked: a cache from a version that learned less is not used.
    key = f"{name}:{','.join(KINDS_BY_BACKING)}:kind,backing"
    learned = per_boot(key, lambda: {f"{v:#x}": [found.kind, found.backing]
                                     for v, found in _provoke(backend, observe).items()})
    return {int(v, 16): Learned(*found) for v, found in learned.items()}


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


def _provoke(backend, observe: Observer) -> dict[int, Learned]:
    """Each value observed -> the kind and the backing it was seen for, where only one. A value
    seen for both kinds (say, a call site shared by minor and missing faults) tells no kind:
    not guessed."""
    from uffdtrace.exerciser import ExerciseConfig, run

    me = os.getpid()
    backend.track(me)
    seen: dict[int, set[tuple[str, str]]] = {}
    try:
        for backing, kinds in KINDS_BY_BACKING.items():
            for kind in kinds:
                cfg = ExerciseConfig(backing=backing, kind=kind, pages=2, cpus=[0])
                try:
                    res = run(cfg)
                except UserError:
                    break  # e.g. no hugepages here: the other backing still teaches
                for value in observe(me, res.faults["addr"].to_numpy()):
                    seen.setdefault(value, set()).add((backing, kind))
    finally:
        backend.untrack(me)
    learned = {value: Learned(_only({k for _, k in pairs}), _only({b for b, _ in pairs}))
               for value, pairs in seen.items()}
    return {value: found for value, found in learned.items() if found.kind or found.backing}


def _only(values: set[str]) -> str | None:
    return next(iter(values)) if len(values) == 1 else None
