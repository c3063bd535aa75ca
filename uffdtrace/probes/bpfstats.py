"""The tracer's own cost: run time of its BPF programs, from the kernel's BPF stats."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

from bcc import libbcc

STATS_SWITCH = Path("/proc/sys/kernel/bpf_stats_enabled")
# struct bpf_prog_info (uapi/linux/bpf.h): run_time_ns and run_cnt follow prog_tags.
_INFO_SIZE = 256
_RUN_TIME_OFF, _RUN_CNT_OFF = 192, 200


class BpfStats:
    """Turns kernel BPF run-time accounting on for the session and restores it afterwards."""

    def __init__(self) -> None:
        self._previous: str | None = None

    def enable(self) -> bool:
        try:
            self._previous = STATS_SWITCH.read_text().strip()
            STATS_SWITCH.write_text("1")
            return True
        except OSError:
            return False

    def restore(self) -> None:
        if self._previous is not None:
            STATS_SWITCH.write_text(self._previous)
            self._previous = None


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of one loaded program."""
    buf = ctypes.create_string_buffer(_INFO_SIZE)
    size = ctypes.c_uint32(_INFO_SIZE)
    if libbcc.lib.bpf_obj_get_info(prog_fd, buf, ctypes.byref(size)) != 0:
        return 0, 0
    return struct.unpack_from("<QQ", buf.raw, _RUN_TIME_OFF)
