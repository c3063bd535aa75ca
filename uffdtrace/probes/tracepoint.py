"""The tracepoint backend: raw tracepoints only, so it runs on kernels without kprobes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from uffdtrace.errors import UserError
from uffdtrace.events import BlockedFault
from uffdtrace.probes.bpfstats import prog_run_stats
from uffdtrace.probes.calibration import calibrated
from uffdtrace.probes.kernel import kallsyms, struct_member_offsets
from uffdtrace.probes.mapbatch import delete_keys, lookup_all
from uffdtrace.probes.paths import PathClassifier, StackClassifier
from uffdtrace.probes.records import (
    EV_FAULT,
    F_ACTIVE,
    F_BLOCKED_AT_END,
    F_MSG,
    F_SLEPT,
    F_WOKEN,
    FAULT_DTYPE,
    FAULT_STATS,
    FAULT_STATS_KEY,
    IOCTL_STATS,
    IOCTL_STATS_KEY,
    LOST_REASONS,
    RECORD_DTYPE,
    ROLE_TARGET,
    records_of,
)
from uffdtrace.probes.ringbuf import RingBufferReader

MODES = ("light", "full", "stats")
# What bpf/tracepoint.c attaches, by mode: `doctor` checks these, and tests/test_capabilities.py
# holds them against what BCC attached. Raw sys_exit sees handlers' message reads (every mode),
# sys_enter and sys_exit the uffd ioctls (full, stats).
TRACEPOINTS: dict[str, tuple[str, ...]] = {
    "exceptions:page_fault_user": MODES,
    "sched:sched_switch": MODES,
    "sched:sched_waking": MODES,
    "rseq:rseq_update": MODES,
    "sched:sched_process_fork": MODES,
    "sched:sched_process_exit": MODES,
    "task:task_rename": MODES,
    "maple_tree:ma_write": MODES,
    "raw_syscalls:sys_enter": ("full", "stats"),
    "raw_syscalls:sys_exit": MODES,
}
# Attached where present (Linux 6.1+): without it, a region mapped anew keeps its first backing.
OPTIONAL_TRACEPOINTS = ("maple_tree:ma_write",)
RINGBUF_BYTES = 128 << 20  # ~2 s of full-mode records at 200k faults/s, while the drain thread waits
STATS_RINGBUF_BYTES = 4096  # --mode stats sends no records
# Fault aggregates BPF keeps at most (4 x as many ioctl ones), preallocated: 4096 x 448 bytes
# = 1.8 MB per CPU, and 2.2 MB for ioctls. Those of gone processes are deleted every interval.
STATS_KEYS = 4096
MAX_THREADS = 65536
BPF_DIR = resources.files("uffdtrace.bpf")
STATS_DTYPES = {"fault_stats": (FAULT_STATS_KEY, FAULT_STATS), "ioctl_stats": (IOCTL_STATS_KEY, IOCTL_STATS)}


@dataclass(frozen=True)
class TraceScope:
    """Which processes the BPF programs look at (and, in stats mode, how finely)."""

    pids: tuple[int, ...] = ()
    all: bool = False
    follow_children: bool = False
    discover: bool = False  # processes that set up a userfaultfd join (ROLE_DISCOVERED)
    per_thread: bool = False  # stats mode: one aggregate per thread, not per process


@dataclass
class TracepointBackend:
    mode: str
    scope: TraceScope
    name: str = "tracepoint"
    compile_s: float = 0.0
    recorded_flags: int = F_WOKEN | F_MSG  # in-flight faults that are uffd faults (F_RECORDED)
    attached: dict[str, str | None] = field(default_factory=dict)  # kprobe hook -> symbol
    _bpf: object = field(default=None, repr=False)
    _ring: RingBufferReader | None = field(default=None, repr=False)

    def cflags(self) -> list[str]:
        huf, wake, uffd_ioctl = (_function_range(f) for f in (
            "handle_userfault", "userfaultfd_wake_function", "userfaultfd_ioctl"))
        irqentry = (_function_range("__irqentry_text_start")[0], _function_range("__irqentry_text_end")[0])
        flags = [f"-D{name}={offset}" for name, offset in _kernel_offsets().items()] + [
            f"-DHUF_START={huf[0]:#x}ULL",
            f"-DHUF_END={huf[1]:#x}ULL",
            f"-DUWAKE_START={wake[0]:#x}ULL",
            f"-DUWAKE_END={wake[1]:#x}ULL",
            f"-DIRQENTRY_START={irqentry[0]:#x}ULL",
            f"-DIRQENTRY_END={irqentry[1]:#x}ULL",
            f"-DUIOCTL_START={uffd_ioctl[0]:#x}ULL",
            f"-DUIOCTL_END={uffd_ioctl[1]:#x}ULL",
            f"-DRINGBUF_PAGES={self.ringbuf_bytes() // 4096}",
            f"-DMAX_THREADS={MAX_THREADS}",
        ]
        from bcc import BPF  # Debian's python3-bpfcc

        if BPF.tracepoint_exists("maple_tree", "ma_write"):
            flags.append("-DMAPPINGS_TRACEPOINT")
        if self.mode in ("full", "stats"):
            flags.append("-DFULL_MODE")
        if self.mode == "stats":
            flags += ["-DSTATS_MODE", f"-DSTATS_KEYS={STATS_KEYS}"]
            if self.scope.per_thread:
                flags.append("-DSTATS_PER_THREAD")
        if self.scope.discover:
            flags.append("-DDISCOVER_UFFDS")
        if self.scope.all:
            flags.append("-DTRACE_ALL")
        if self.scope.follow_children:
            flags.append("-DFOLLOW_CHILDREN")
        return flags

    def source(self) -> str:
        """The program as compiled: bpf/tracepoint.c with bpf/records.h in place of its
        #include (what --ebpf prints is all there is)."""
        text = BPF_DIR.joinpath("tracepoint.c").read_text()
        include = next(line for line in text.splitlines() if line.startswith('#include "records.h"'))
        return text.replace(include, BPF_DIR.joinpath("records.h").read_text().rstrip())

    def start(self) -> None:
        """Compile and attach (BCC attaches every RAW_TRACEPOINT_PROBE it compiles)."""
        from bcc import BPF  # Debian's python3-bpfcc

        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}: choose {', '.join(MODES)}")
        t0 = time.monotonic()
        try:
            self._bpf = BPF(text=self.source(), cflags=self.cflags())
            self.attach()
        except UserError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise UserError(f"BPF program failed to load ({e}); run `uffdtrace doctor`") from e
        self.compile_s = time.monotonic() - t0
        for pid in self.scope.pids:
            self.track(pid)
        events = self._bpf["events"]
        self._ring = RingBufferReader(events.map_fd, self.ringbuf_bytes(), RECORD_DTYPE)

    def ringbuf_bytes(self) -> int:
        return STATS_RINGBUF_BYTES if self.mode == "stats" else RINGBUF_BYTES

    def attach(self) -> None:
        """Attach what BCC does not attach by itself (nothing: all are raw tracepoints)."""

    def paths(self) -> PathClassifier:
        """How this backend tells each fault's backing and kind (learning call sites once)."""
        return StackClassifier(self.region_frames, calibrated("call_sites", self, self._call_sites_seen))

    def sees_ioctls(self) -> bool:
        return self.mode != "light"

    def reads_messages(self) -> bool:
        """Handlers' reads of uffd messages are traced (TRACE_READS in bpf/tracepoint.c): in
        both modes here, as a fault mapped before its thread slept shows nowhere else."""
        return True

    @classmethod
    def tracepoints(cls, mode: str) -> tuple[str, ...]:
        """The tracepoints (category:name) this backend attaches in `mode`, where they exist."""
        return tuple(tp for tp, modes in TRACEPOINTS.items() if mode in modes)

    def raw_tracepoints(self) -> list[str]:
        """The raw tracepoints this backend's programs are attached to."""
        return sorted(tp.decode() for tp in self._bpf.raw_tracepoint_fds)

    def _call_sites_seen(self, pid: int, addrs: np.ndarray) -> set[int]:
        regions = {int(a) >> 21 for a in addrs}
        sites = {frames[0] for k, v in self._bpf["regions"].items()
                 if k.tgid == pid and k.region in regions and (frames := tuple(f for f in v.frames if f))}
        self.forget_regions(pid)  # the next calibration run may map the same addresses
        return sites

    def track(self, pid: int, role: int = ROLE_TARGET) -> None:
        self._bpf["tracked"][ctypes.c_uint32(pid)] = ctypes.c_uint8(role)

    def untrack(self, pid: int) -> None:
        """Stop tracing a process. Its threads' per-thread state goes too: a thread with state
        counts as tracked (the fast path of page_fault_user)."""
        self._bpf["tracked"].pop(ctypes.c_uint32(pid), None)
        inflight = self._bpf["inflight"]
        with contextlib.suppress(OSError):  # gone: its threads' state went at their exit
            for tid in os.listdir(f"/proc/{pid}/task"):
                inflight.pop(ctypes.c_uint32(int(tid)), None)

    def discovered_name(self, pid: int) -> str | None:
        """The name a discovered process had when it set up its userfaultfd (DISCOVER_UFFDS),
        once: the entry goes."""
        table = self._bpf["discovered_comms"]
        key = ctypes.c_uint32(pid)
        try:
            name = table[key].comm.decode(errors="replace")
        except KeyError:
            return None
        table.pop(key, None)
        return name

    def handler_of(self, pid: int) -> int | None:
        """The discovered process whose faults a ROLE_PENDING_HANDLER process handles."""
        try:
            return self._bpf["handler_of"][ctypes.c_uint32(pid)].value
        except KeyError:
            return None

    def tracked(self) -> dict[int, int]:
        return {k.value: v.value for k, v in self._bpf["tracked"].items()}

    def drain(self) -> np.ndarray:
        return self._ring.drain()

    def blocked_now(self) -> list[BlockedFault]:
        """Faults whose thread sleeps in handle_userfault now, oldest first."""
        blocked = [BlockedFault(st.tgid, k.value, st.addr, st.fault_ns)
                   for k, st in self._bpf["inflight"].items()
                   if st.flags & F_ACTIVE and st.flags & F_SLEPT and not st.flags & F_WOKEN]
        return sorted(blocked, key=lambda b: b.fault_ns)

    def faults_in_flight(self) -> np.ndarray:
        """Recordable faults whose thread has not shown yet that it left the fault (no return
        to user space, later fault, switch-out or exit), for the end of a session: woken ones
        are done; those still asleep in the fault are flagged F_BLOCKED_AT_END."""
        rows = []
        for k, st in self._bpf["inflight"].items():
            blocked = st.flags & F_SLEPT and not st.flags & F_WOKEN
            if st.flags & F_ACTIVE and (st.flags & self.recorded_flags or blocked):
                flags = (st.flags & ~F_ACTIVE) | (F_BLOCKED_AT_END if blocked else 0)
                rows.append({
                    "type": EV_FAULT, "waker_nr": st.ioctl_nr, "flags": flags, "pid": st.tgid,
                    "tid": k.value, "waker_pid": st.waker_pid, "waker_tid": st.waker_tid,
                    "notify_tid": st.notify_tid, "gen": st.gen, "fault_ns": st.fault_ns,
                    "block_ns": st.block_ns, "wake_ns": st.wake_ns, "resume_ns": st.resume_ns,
                    "msg_ns": st.msg_ns, "waker_ioctl_ns": st.ioctl_enter_ns, "addr": st.addr,
                    "error_code": st.error_code, "msg_flags": st.msg_flags, "reason": st.reason,
                    "mm": st.mm, "msg_tid": st.msg_tid, "comm": bytes(st.comm)})
        faults = np.zeros(len(rows), FAULT_DTYPE)
        for i, row in enumerate(rows):
            faults[i] = tuple(row.get(name, 0) for name in FAULT_DTYPE.names)
        return records_of(faults)

    def lost(self) -> dict[str, int]:
        table = self._bpf["lost"]
        return {name: int(sum(table[ctypes.c_int(i)])) for i, name in enumerate(LOST_REASONS)}

    def histogram(self, name: str) -> np.ndarray:
        """Counts per log2 µs bucket: index N holds [2^N, 2^(N+1)) µs (N=0 also holds < 1 µs)."""
        counts = np.zeros(64, dtype=np.int64)
        for k, v in self._bpf[f"{name}_hist"].items():
            counts[k.value] = v.value
        return counts

    def stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """--mode stats: the aggregates `fault_stats` or `ioctl_stats` as (keys, values summed
        over CPUs, modulo 2^32 for u32 counters; comm from any CPU that has one), dtypes from
        records.h."""
        key_dtype, value_dtype = STATS_DTYPES[name]
        if name == "ioctl_stats":  # one shared value per key
            return lookup_all(self._bpf[name], key_dtype, value_dtype, per_cpu=False)
        keys, per_cpu = lookup_all(self._bpf[name], key_dtype, value_dtype, per_cpu=True)
        values = np.zeros(len(keys), value_dtype)
        for field_name in value_dtype.names:
            column = per_cpu[field_name]
            if field_name == "comm":  # the first CPU's that has one
                has = column != b""
                values["comm"] = column[np.arange(len(column)), has.argmax(axis=1)]
            else:  # u32 counters stay u32: their sum wraps as each CPU's does
                values[field_name] = column.sum(axis=1, dtype=column.dtype)
        return keys, values

    def forget(self, pids: set[int]) -> None:
        """Stop tracing these processes (gone, or refused), and drop their aggregates and event
        counts (read already, or not wanted)."""
        if not pids:
            return
        wanted = np.fromiter(pids, np.uint32)
        tables = [name for name in STATS_DTYPES if self.mode == "stats"]
        for name in tables:
            keys, _ = self.stats(name)
            delete_keys(self._bpf[name], keys[np.isin(keys["pid"], wanted)])
        events = self._bpf["uffd_events"]
        for k in [k for k in events if k.value >> 32 in pids]:
            events.pop(k, None)
        for pid in pids:
            self.untrack(pid)
            if self.scope.discover:
                self._bpf["handler_of"].pop(ctypes.c_uint32(pid), None)
                self._bpf["discovered_comms"].pop(ctypes.c_uint32(pid), None)

    def region_frames(self, pid: int, gen: int, addr: int) -> tuple[int, ...] | None:
        """Callers of handle_userfault sampled at the first block in addr's 2 MiB region, under
        generation `gen` of the process's mappings."""
        table = self._bpf["regions"]
        key = table.Key(pid, gen, addr >> 21)
        try:
            value = table[key]
        except KeyError:
            return None
        return tuple(f for f in value.frames if f)

    def forget_regions(self, pid: int) -> None:
        """Drop a process's sampled regions (its mappings changed)."""
        table = self._bpf["regions"]
        for key in [k for k in table if k.tgid == pid]:
            del table[key]

    def uffd_event_counts(self) -> dict[tuple[int, int], int]:
        if not self.reads_messages():
            return {}
        return {(k.value >> 32, k.value & 0xFFFFFFFF): v.value
                for k, v in self._bpf["uffd_events"].items()}

    def loose_messages(self) -> dict[str, int]:
        """Fault messages that named no thread in flight (handlers without
        UFFD_FEATURE_THREAD_ID): given to their fault by address space and page, and those
        still held, of no traced fault (an untraced thread's, or read after its fault ended)."""
        if not self.reads_messages():
            return {"matched_by_address": 0, "unmatched": 0}
        held, claimed = (int(self._bpf["loose"][ctypes.c_int(i)].value) for i in (0, 1))
        return {"matched_by_address": claimed, "unmatched": held}

    def run_stats(self) -> tuple[int, int]:
        """Total (run_time_ns, run_cnt) of this backend's BPF programs."""
        runs = self.program_stats().values()
        return sum(ns for ns, _ in runs), sum(cnt for _, cnt in runs)

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """(run_time_ns, run_cnt) of each BPF program, by name."""
        return {(name.decode() if isinstance(name, bytes) else name): prog_run_stats(fn.fd)
                for name, fn in self._bpf.funcs.items()}

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def _function_range(name: str) -> tuple[int, int]:
    found = kallsyms().range_of(name)
    if found is None:
        raise UserError(f"{name} is not in /proc/kallsyms: no userfaultfd support?")
    return found


# -D name -> (struct, member): the kernel offsets the BPF programs read at (bpf/tracepoint.c).
KERNEL_OFFSETS = {
    "TASK_PID_OFF": ("task_struct", "pid"),
    "TASK_TGID_OFF": ("task_struct", "tgid"),
    "TASK_STATE_OFF": ("task_struct", "__state"),
    "TASK_MM_OFF": ("task_struct", "mm"),
    "TASK_FILES_OFF": ("task_struct", "files"),
    "FILES_FDT_OFF": ("files_struct", "fdt"),
    "FDT_MAX_FDS_OFF": ("fdtable", "max_fds"),
    "FDT_FD_OFF": ("fdtable", "fd"),
    "FILE_F_OP_OFF": ("file", "f_op"),
    "FILE_PRIVATE_OFF": ("file", "private_data"),
    "FOPS_IOCTL_OFF": ("file_operations", "unlocked_ioctl"),
    "UCTX_MM_OFF": ("userfaultfd_ctx", "mm"),
}


def _kernel_offsets() -> dict[str, int]:
    members: dict[str, set[str]] = {}
    for struct, member in KERNEL_OFFSETS.values():
        members.setdefault(struct, set()).add(member)
    offsets = {s: struct_member_offsets(s, tuple(sorted(m))) for s, m in members.items()}
    return {name: offsets[s][m] for name, (s, m) in KERNEL_OFFSETS.items()}
