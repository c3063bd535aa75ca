"""Learn, once per boot, which call sites of handle_userfault mean a minor or a missing fault.

Minor and missing faults reach handle_userfault from different call sites inside the same
kernel function, so the return address above it tells them apart — but which address is
which depends on the kernel build and on KASLR. We provoke one fault of each kind on each
backing with the exerciser while tracing ourselves, note the call site the BPF side sampled,
and keep the answer for this boot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from uffdtrace.errors import UserError

CACHE = Path("/run/uffdtrace/calibration.json")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    return BOOT_ID.read_text().strip()


def load_call_sites() -> dict[int, str]:
    """Call-site address -> kind, for this boot; empty if never calibrated."""
    try:
        data = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("boot_id") != _boot_id():
        return {}
    return {int(a, 16): kind for a, kind in data["call_sites"].items()}


def calibrate(backend) -> dict[str, object]:
    """Run tiny minor and missing faults in this process under `backend`; cache and return
    {"call_sites": {addr: kind}, "skipped": {backing: reason}}."""
    from uffdtrace.exerciser import ExerciseConfig, run

    me = os.getpid()
    backend.track(me)
    call_sites: dict[int, str] = {}
    skipped: dict[str, str] = {}
    try:
        for backing in ("shmem", "hugetlb"):
            for mode in ("minor", "missing"):
                cfg = ExerciseConfig(backing=backing, mode=mode, pages=2, cpus=[0])
                try:
                    res = run(cfg)
                except UserError as e:
                    skipped[backing] = str(e)
                    break
                sites = {frames[0] for addr in res.faults["addr"]
                         if (frames := backend.region_frames(me, int(addr)))}
                backend.forget_regions(me)  # the next run may map the same addresses
                if len(sites) != 1:
                    skipped[f"{backing}/{mode}"] = f"{len(sites)} call sites seen"
                    continue
                call_sites[sites.pop()] = mode
    finally:
        backend.untrack(me)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps({
        "boot_id": _boot_id(),
        "call_sites": {f"{a:#x}": k for a, k in call_sites.items()},
        "skipped": skipped,
    }))
    return {"call_sites": call_sites, "skipped": skipped}
