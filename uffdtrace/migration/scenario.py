"""A post-copy live migration on one machine: configure, run, verify, summarise.

The parent builds the link, starts the source node (page server + dirtying vCPUs) in the
source namespace and the target node (precopy, switch-over, demand handler, prefetcher,
vCPUs) in the target namespace, collects both results, compares the two guest memories byte
for byte, and removes everything it created on every path.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from uffdtrace.errors import UserError
from uffdtrace.exerciser.hugepages import HUGEPAGE_SIZE, mem_available, reserved_hugepages
from uffdtrace.migration.link import Link

BACKINGS = ("shmem", "hugetlb")
PATTERN_CODES = {"seq": 0, "random": 1, "hot": 2}   # MIG_SEQ, MIG_RANDOM, MIG_HOT
PATTERNS = tuple(PATTERN_CODES)
EXIT_GRACE_S = 5.0
COMPARE_CHUNK = 16 << 20


@dataclass(frozen=True)
class MigrationConfig:
    """One migration. `validated()` raises UserError naming the first bad value."""

    size_mib: int = 128
    backing: str = "shmem"           # shmem (4 KiB pages) | hugetlb (2 MiB pages)
    vcpus: int = 2
    dirty_rate: float = 20000.0      # pages/s written on the source by all vCPUs together
    pattern: str = "random"          # dirtying on the source and first touches on the target
    bandwidth_gbit: float = 1.0      # TBF rate of the link, both directions
    delay_us: float = 0.0            # one-way delay, added in user space by the receivers
    mtu: int = 1500
    rounds: int = 5                  # precopy rounds at most; 0 = pure post-copy
    converge: float = 0.01           # switch over once at most this fraction is dirty
    prefetch: bool = True
    seed: int = 1
    stall_timeout_s: float = 30.0

    @property
    def page_size(self) -> int:
        return HUGEPAGE_SIZE if self.backing == "hugetlb" else os.sysconf("SC_PAGE_SIZE")

    @property
    def pages(self) -> int:
        return (self.size_mib << 20) // self.page_size

    def validated(self) -> MigrationConfig:
        if self.backing not in BACKINGS:
            raise UserError(f"unknown backing {self.backing!r} (choose from {', '.join(BACKINGS)})")
        if self.pattern not in PATTERNS:
            raise UserError(f"unknown pattern {self.pattern!r} (choose from {', '.join(PATTERNS)})")
        _check("size", self.size_mib, 1, 1 << 20, "MiB")
        if self.backing == "hugetlb" and self.size_mib % 2:
            raise UserError(f"hugetlb size must be a multiple of 2 MiB, not {self.size_mib} MiB")
        _check("vcpus", self.vcpus, 1, 64)
        _check("rounds", self.rounds, 0, 64)
        _check("mtu", self.mtu, 576, 65535)
        _check("dirty rate", self.dirty_rate, 0, 1e9, "pages/s")
        _check("bandwidth", self.bandwidth_gbit, 0.001, 34.0, "Gbit/s")
        _check("delay", self.delay_us, 0, 10e6, "µs")
        _check("converge", self.converge, 0, 1)
        _check("stall timeout", self.stall_timeout_s, 0.1, 3600, "s")
        if self.pages < self.vcpus:
            raise UserError(f"{self.pages} pages cannot be shared by {self.vcpus} vCPUs")
        return self


def _check(name: str, value: object, low: float, high: float, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        span = " to ".join(str(int(x)) if x == int(x) else f"{x:g}" for x in (low, high))
        raise UserError(f"{name} must be from {span}{' ' + unit if unit else ''}, not {value!r}")


def run(cfg: MigrationConfig) -> dict[str, Any]:
    """Run one migration end to end; returns the summary (see `summarize`)."""
    cfg = cfg.validated()
    need = 2 * cfg.pages * cfg.page_size
    if cfg.backing == "shmem" and need > mem_available() * 0.8:
        raise UserError(f"source + target need {need >> 20} MiB, more than is available "
                        f"({mem_available() >> 20} MiB)")
    hugepages = reserved_hugepages(2 * cfg.pages) if cfg.backing == "hugetlb" else nullcontext()
    # pyroute2 forks helpers that must keep the default SIGTERM: the handler comes after.
    with hugepages, Link(cfg.bandwidth_gbit * 1e9, cfg.mtu) as link, _sigterm_as_interrupt(), \
            _Nodes(_timeout_s(cfg)) as nodes:
        node_cfg = _node_config(cfg)
        source = nodes.start("source", link.source_ns, node_cfg)
        nodes.read(source)   # listening
        target = nodes.start("target", link.target_ns, node_cfg)
        src, tgt = nodes.read(source), nodes.read(target)
        mismatched = compare_memory((src["pid"], src["memfd"]), (tgt["pid"], tgt["memfd"]),
                                    cfg.page_size, cfg.pages)
    return summarize(cfg, src, tgt, mismatched, link.removed_leftovers)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every clean-up runs."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _timeout_s(cfg: MigrationConfig) -> float:
    transfer = cfg.pages * cfg.page_size * 8 / (cfg.bandwidth_gbit * 1e9)
    return 60 + cfg.stall_timeout_s + 4 * (cfg.rounds + 2) * transfer


def _node_config(cfg: MigrationConfig) -> dict[str, Any]:
    return {
        "backing": BACKINGS.index(cfg.backing), "pattern": PATTERN_CODES[cfg.pattern],
        "vcpus": cfg.vcpus, "pages": cfg.pages, "page_size": cfg.page_size,
        "dirty_rate": float(cfg.dirty_rate), "delay_ns": int(cfg.delay_us * 1e3),
        "seed": cfg.seed, "prefetch": int(cfg.prefetch), "max_rounds": cfg.rounds,
        "converge_pages": int(cfg.converge * cfg.pages),
        "stall_timeout_ns": int(cfg.stall_timeout_s * 1e9),
    }


class _Nodes:
    """The node processes: started, read line by line with a deadline, always reaped."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def __enter__(self) -> _Nodes:
        return self

    def start(self, role: str, ns: str, cfg: dict[str, Any]) -> str:
        self.procs[role] = subprocess.Popen(
            [sys.executable, "-m", "uffdtrace.migration.node", role, ns, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return role

    def read(self, role: str) -> dict[str, Any]:
        """The node's next JSON line; UserError if it failed, died or took too long."""
        proc = self.procs[role]
        assert proc.stdout is not None
        while not select.select([proc.stdout], [], [], 0.2)[0]:
            if time.monotonic() > self.deadline:
                raise UserError(f"migration timed out waiting for the {role}")
            for other, p in self.procs.items():   # its peer died: it may wait forever
                if p is not proc and p.poll() is not None:
                    raise UserError(f"the {other} node died (exit status {p.returncode})")
        line = proc.stdout.readline()
        if not line:
            raise UserError(f"the {role} node died (exit status {proc.wait()})")
        msg = json.loads(line)
        if "error" in msg:
            raise UserError(f"migration failed: {msg['error']}")
        if msg.get("err"):
            raise UserError(f"migration failed in the {role} at {msg['step']}: "
                            f"{os.strerror(msg['err'])}")
        return msg

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: object) -> None:
        for proc in self.procs.values():
            if et is not None:
                proc.kill()
            if proc.stdin:
                proc.stdin.close()
        for proc in self.procs.values():
            try:
                proc.wait(EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()


def compare_memory(a: tuple[int, int], b: tuple[int, int], page_size: int, pages: int) -> int:
    """Pages that differ between two live processes' memfds, given as (pid, fd)."""
    mismatched = 0
    with open(f"/proc/{a[0]}/fd/{a[1]}", "rb", buffering=0) as fa, \
            open(f"/proc/{b[0]}/fd/{b[1]}", "rb", buffering=0) as fb:
        chunk = max(COMPARE_CHUNK // page_size, 1) * page_size
        for offset in range(0, pages * page_size, chunk):
            want = min(chunk, pages * page_size - offset)
            x, y = os.pread(fa.fileno(), want, offset), os.pread(fb.fileno(), want, offset)
            if len(x) != want or len(y) != want:
                raise UserError("cannot read the guest memory back for comparison")
            if x != y:
                xa = np.frombuffer(x, np.uint8).reshape(-1, page_size)
                ya = np.frombuffer(y, np.uint8).reshape(-1, page_size)
                mismatched += int((xa != ya).any(axis=1).sum())
    return mismatched


def summarize(cfg: MigrationConfig, src: dict[str, Any], tgt: dict[str, Any], mismatched: int,
              removed_leftovers: list[str]) -> dict[str, Any]:
    """What the scenario measured. Times in ns; bytes are those the source sent per phase."""
    precopy_ns = tgt["switch_ns"] - tgt["precopy_start_ns"]
    stalls = tgt["vcpu_stall_ns"]
    return {
        "config": asdict(cfg),
        "pages": cfg.pages, "page_size": cfg.page_size,
        "source_pid": src["pid"], "target_pid": tgt["pid"],
        "handler_tid": tgt["handler_tid"], "prefetch_tid": tgt["prefetch_tid"] or None,
        "rounds": tgt["rounds"], "round_pages": src["round_pages"],
        "round_dirty": src["round_dirty"], "dirtied_pages": src["dirtied"],
        "precopy_ns": precopy_ns,
        "downtime_ns": tgt["resume_ns"] - tgt["pause_ns"],
        "postcopy_ns": tgt["end_ns"] - tgt["resume_ns"],
        "total_ns": tgt["end_ns"] - tgt["precopy_start_ns"],
        "stale_pages": tgt["stale_pages"],
        "stale_fraction": tgt["stale_pages"] / cfg.pages,
        "demand_faults": tgt["messages"],
        "already_fresh": tgt["fresh"],
        "demand_fetched": tgt["demand_fetched"],
        "prefetch_waits": tgt["prefetch_waits"],
        "prefetched_pages": tgt["prefetched"],
        "prefetch_discarded": tgt["prefetch_discarded"],
        "handler_continues": tgt["handler_continues"],
        "eexist": tgt["eexist"],
        "demand_fetch_mean_ns": (tgt["demand_fetch_total_ns"] // tgt["demand_fetched"]
                                 if tgt["demand_fetched"] else 0),
        "demand_fetch_max_ns": tgt["demand_fetch_max_ns"],
        "blocktime_ns": sum(stalls),
        "vcpu_blocktime": [{"vcpu": i, "tid": tid, "blocktime_ns": s, "max_stall_ns": m}
                           for i, (tid, s, m) in enumerate(zip(
                               tgt["vcpu_tid"], stalls, tgt["vcpu_max_stall_ns"], strict=True))],
        "bytes_sent": {"precopy": src["bytes_precopy"], "switch_over": src["bytes_switch"],
                       "demand": src["bytes_demand"], "prefetch": src["bytes_push"]},
        "precopy_gbit_s": (src["bytes_precopy"] * 8 / precopy_ns if precopy_ns else 0.0),
        "pushed_pages": src["pushed_pages"], "push_skipped": src["push_skipped"],
        "mismatched_pages": mismatched,
        "memory_equal": mismatched == 0,
        "removed_leftovers": removed_leftovers,
    }
