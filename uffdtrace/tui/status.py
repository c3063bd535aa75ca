"""The status line of `uffdtrace top`, from the session's status snapshots."""

from __future__ import annotations

import time
from collections.abc import Callable

from uffdtrace.events import BlockedFault, Status
from uffdtrace.tui.render import format_count


class StatusLine:
    """The status line of a live session: backend, mode, faults, losses and the tracer's cost
    (BPF run time and process CPU, as % of one CPU since the previous call), from snapshots."""

    def __init__(self, status: Callable[[], Status], skipped_rows: Callable[[], int]) -> None:
        self.status = status
        self.skipped_rows = skipped_rows
        self.last = status()

    def __call__(self) -> str:
        now, last = self.status(), self.last
        self.last = now
        wall = max(now.at_s - last.at_s, 1e-9)
        skipped = self.skipped_rows()
        return " · ".join(filter(None, [
            f"{now.backend} backend", f"{now.mode} mode",
            f"{format_count(now.faults)} faults",
            f"lost {now.lost}",
            f"BPF {(now.bpf_run_ns - last.bpf_run_ns) / 1e9 / wall:.1%} CPU "
            f"({now.bpf_runs / 1e6:.1f}M runs)",
            f"tracer {(now.cpu_s - last.cpu_s) / wall:.0%} CPU",
            f"plugins skipped {skipped} rows" if skipped else "",
            blocked_now(list(now.blocked), time.monotonic_ns()) if now.blocked else "",
        ]))


def blocked_now(blocked: list[BlockedFault], now_ns: int) -> str:
    """'N blocked now, oldest S s (pid P tid T @ADDR)' (blocked: oldest first)."""
    oldest = blocked[0]
    return (f"{len(blocked)} blocked now, oldest {(now_ns - oldest.fault_ns) / 1e9:.1f} s "
            f"(pid {oldest.pid} tid {oldest.tid} @{oldest.addr:#x})")
