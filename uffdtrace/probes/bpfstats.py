"""The tracer's own cost: run time of its BPF programs, from the kernel's BPF stats."""

from __future__ import annotations

import ctypes
import os
import struct

BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type (uapi/linux/bpf.h)
# struct bpf_prog_info (uapi/linux/bpf.h): run_time_ns and run_cnt follow prog_tags.
_INFO_SIZE = 256
_RUN_TIME_OFF, _RUN_CNT_OFF = 192, 200


class BpfStats:
    """Holds kernel BPF run-time accounting on for the session, with the bpf() command
    BPF_ENABLE_STATS rather than the kernel.bpf_stats_enabled sysctl: the kernel keeps the stats
    on while any holder's fd is open and turns them off when the last one closes or dies, so a
    killed session leaves nothing on and overlapping sessions don't switch each other's off."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def enable(self) -> bool:
        if self._fd is None:
            try:
                self._fd = stats_fd()
            except OSError:
                return False
        return True

    def restore(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def stats_fd() -> int:
    """An fd that holds BPF run-time stats on until it is closed (close-on-exec, as libbpf
    opens it: a traced command does not inherit it)."""
    from bcc import libbcc  # Debian's python3-bpfcc, imported when tracing starts

    fd = libbcc.lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
    if fd < 0:
        raise OSError(-fd, f"BPF_ENABLE_STATS: {os.strerror(-fd)}")
    return fd


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of one loaded program."""
    buf = ctypes.create_string_buffer(_INFO_SIZE)
    size = ctypes.c_uint32(_INFO_SIZE)
    from bcc import libbcc

    if libbcc.lib.bpf_obj_get_info(prog_fd, buf, ctypes.byref(size)) != 0:
        return 0, 0
    return struct.unpack_from("<QQ", buf.raw, _RUN_TIME_OFF)
