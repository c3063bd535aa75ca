"""The live status line's part on faults blocked now (no kernel needed)."""

from __future__ import annotations

from uffdtrace.events import BlockedFault
from uffdtrace.tui.status import blocked_now


def test_blocked_now_names_the_oldest():
    blocked = [BlockedFault(pid=10, tid=11, addr=0x7F0000001000, fault_ns=1_000_000_000),
               BlockedFault(pid=10, tid=12, addr=0x7F0000002000, fault_ns=3_000_000_000)]
    assert blocked_now(blocked, now_ns=3_500_000_000) == (
        "2 blocked now, oldest 2.5 s (pid 10 tid 11 @0x7f0000001000)")
