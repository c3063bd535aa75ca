"""Configure a workload, run it in C (one blocking call, GIL released) and tabulate it.

The C side records every touch, fault message and ioctl into preallocated arrays; here they
become DataFrames through numpy structured views, with no per-fault Python work.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from uffdtrace.errors import UserError
from uffdtrace.exerciser._exerciser import ffi, lib
from uffdtrace.exerciser.hugepages import HUGEPAGE_SIZE, mem_available, reserved_hugepages

BACKINGS = ("shmem", "hugetlb", "anon")
MODES = ("minor", "missing")
HANDLERS = ("thread", "process")
PATTERNS = ("seq", "random", "zipf")
POLICIES = ("continue", "copy", "batch", "prefetch")
MISUSES = ("continue-on-missing", "copy-on-minor", "zeropage-on-minor")
OPS = ("continue", "copy", "zeropage", "wake")  # index = uffdx_op.op
# index = uffdx_op.role; "repeat": the resolving CONTINUE issued again (continue_twice)
ROLES = ("resolve", "prefetch", "misuse", "eexist-wake", "batch-wake", "repeat")

MAX_THREADS = 256
ZIPF_EXPONENT = 1.0
UFFD_PAGEFAULT_FLAG_WRITE = 1

# The errno each misuse scenario provokes, per backing, as measured on Linux 6.18
# (docs/design.md, 'Errnos'). Continue-on-missing on shmem gives EFAULT, not EINVAL: shmem
# finds no folio.
EXPECTED_MISUSE_ERRNO = {
    ("continue-on-missing", "shmem"): errno.EFAULT,
    ("continue-on-missing", "hugetlb"): errno.EFAULT,
    ("continue-on-missing", "anon"): errno.EINVAL,  # CONTINUE needs a page cache: none on anon
    ("copy-on-minor", "shmem"): errno.EEXIST,
    ("copy-on-minor", "hugetlb"): errno.EEXIST,
    ("zeropage-on-minor", "shmem"): errno.EEXIST,
    ("zeropage-on-minor", "hugetlb"): errno.EINVAL,
}


@dataclass(frozen=True)
class ExerciseConfig:
    """One workload. `run()` validates it and raises UserError on bad values."""

    backing: str = "shmem"            # shmem | hugetlb (2 MiB pages) | anon (private, missing only)
    mode: str | None = None           # minor | missing; None: missing on anon and for
                                      # continue-on-missing, else minor
    pages: int = 1000
    threads: int = 1                  # faulting threads; each first-touches its share once
    handler_threads: int = 1
    handler: str = "thread"           # thread | process (uffd passed over a unix socket)
    pattern: str = "seq"              # seq | random | zipf
    write_fraction: float = 0.0
    policy: str = "continue"          # continue | copy | batch | prefetch
    stale_fraction: float = 0.0       # policy copy: pages refreshed before CONTINUE
    misuse: str | None = None         # one of MISUSES
    cpus: Sequence[int] | None = None  # pin every workload thread (and the handler process)
    seed: int = 1
    zeropage_fraction: float = 0.0    # mode missing: pages resolved with ZEROPAGE, not COPY
    fetch_delay_us: float = 0.0       # demand handler waits this long before resolving
    prefetch_interval_us: float = 0.0  # policy prefetch: pause before each prefetched page
    delay_s: float = 0.0              # pause after set-up, before the first touch
    stall_timeout_s: float = 10.0     # no progress for this long = hung handler: abort
    corrupt_page: int | None = None   # test hook: damage this page before verification
    thread_id: bool = True            # request UFFD_FEATURE_THREAD_ID (False: every ptid is 0)
    continue_twice: bool = False      # CONTINUE each faulted page again (EEXIST), as selftests do
    reuse_fd: bool = False            # at the end: close the uffd, open a file at its number, read

    @property
    def page_size(self) -> int:
        return HUGEPAGE_SIZE if self.backing == "hugetlb" else os.sysconf("SC_PAGE_SIZE")

    def validated(self) -> ExerciseConfig:
        """This config with `mode` resolved, or UserError naming the first bad value."""
        _choice("backing", self.backing, BACKINGS)
        _choice("handler", self.handler, HANDLERS)
        _choice("pattern", self.pattern, PATTERNS)
        _choice("policy", self.policy, POLICIES)
        if self.misuse is not None:
            _choice("misuse", self.misuse, MISUSES)
        mode = self.mode
        if mode is None:
            missing = self.backing == "anon" or self.misuse == "continue-on-missing"
            mode = "missing" if missing else "minor"
        _choice("mode", mode, MODES)
        for name in ("thread_id", "continue_twice", "reuse_fd"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name.replace('_', ' ')} must be True or False, "
                                f"not {getattr(self, name)!r}")
        if self.backing == "anon" and mode != "missing":
            raise UserError("backing anon supports mode missing only "
                            "(the kernel has no minor faults on anonymous memory)")
        _int_range("pages", self.pages, 1, 1 << 31)
        _int_range("threads", self.threads, 1, MAX_THREADS)
        _int_range("handler threads", self.handler_threads, 1, MAX_THREADS)
        _int_range("seed", self.seed, 0, (1 << 63) - 1)
        for name in ("write_fraction", "stale_fraction", "zeropage_fraction"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise UserError(f"{name.replace('_', ' ')} must be between 0 and 1, not {value!r}")
        if self.pages < self.threads:
            raise UserError(f"{self.pages} pages cannot be shared by {self.threads} threads")
        if self.policy == "copy" and mode != "minor":
            raise UserError("policy copy refreshes pages before CONTINUE: it needs mode minor")
        if self.stale_fraction and self.policy != "copy":
            raise UserError("stale fraction applies to policy copy only")
        if self.zeropage_fraction and (mode != "missing" or self.backing == "hugetlb"):
            raise UserError("zeropage fraction needs mode missing on shmem or anon "
                            "(hugetlb has no UFFDIO_ZEROPAGE)")
        if self.continue_twice and (mode != "minor" or self.policy not in ("continue", "copy")):
            raise UserError("continue twice repeats the CONTINUE that resolves each fault: it "
                            "needs mode minor and policy continue or copy")
        if not self.thread_id and self.pattern == "zipf" and self.threads > 1:
            raise UserError("without thread ids a fault is known by its page alone: pattern zipf "
                            "with several threads touches pages from more than one thread "
                            "(use seq or random)")
        if self.misuse is not None:
            wanted = "missing" if self.misuse == "continue-on-missing" else "minor"
            if mode != wanted:
                raise UserError(f"misuse {self.misuse} needs mode {wanted}")
            if self.policy == "prefetch":
                raise UserError("misuse scenarios cannot run with policy prefetch "
                                "(the prefetcher would map pages before the wrong ioctl)")
        if self.cpus is not None:
            _check_cpus(self.cpus)
        if not isinstance(self.delay_s, int | float) or self.delay_s < 0:
            raise UserError(f"delay must be a number of seconds >= 0, not {self.delay_s!r}")
        for name in ("fetch_delay_us", "prefetch_interval_us"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise UserError(f"{name[:-3].replace('_', ' ')} must be >= 0 µs, not {value!r}")
        if self.prefetch_interval_us and self.policy != "prefetch":
            raise UserError("prefetch interval applies to policy prefetch only")
        if not isinstance(self.stall_timeout_s, int | float) or self.stall_timeout_s <= 0:
            raise UserError(f"stall timeout must be > 0 seconds, not {self.stall_timeout_s!r}")
        if self.corrupt_page is not None:
            _int_range("corrupt page", self.corrupt_page, 0, self.pages - 1)
        return replace(self, mode=mode, cpus=None if self.cpus is None else list(self.cpus))


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r} (choose from {', '.join(choices)})")


def _int_range(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UserError(f"{name} must be an integer from {low} to {high}, not {value!r}")


def _check_cpus(cpus: Sequence[int]) -> None:
    allowed = os.sched_getaffinity(0)
    if not cpus:
        raise UserError("cpus is empty: give at least one CPU id")
    for cpu in cpus:
        if not isinstance(cpu, int) or cpu not in allowed:
            raise UserError(f"CPU {cpu!r} is not available here (allowed: "
                            f"{','.join(map(str, sorted(allowed)))})")


@dataclass
class ExerciseResult:
    """Ground truth of one run (see the module uffdtrace.exerciser for the columns)."""

    config: ExerciseConfig
    pid: int
    handler_pid: int
    page_size: int
    base: int          # address of page 0 in the registered mapping
    features: int      # UFFDIO_API features the kernel reported
    faults: pd.DataFrame
    ops: pd.DataFrame
    touches: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def run(cfg: ExerciseConfig) -> ExerciseResult:
    """Validate `cfg`, run the workload, verify page contents, and return the records."""
    cfg = cfg.validated()
    _check_memory(cfg)
    plan = _plan(cfg)
    hugepages = reserved_hugepages(cfg.pages) if cfg.backing == "hugetlb" else nullcontext()
    with hugepages:
        return _execute(cfg, plan)


def _check_memory(cfg: ExerciseConfig) -> None:
    if cfg.backing == "hugetlb":
        return  # the hugepage pool is checked by reserved_hugepages
    need = cfg.pages * cfg.page_size
    available = mem_available()
    if need > available * 0.8:
        raise UserError(f"{cfg.pages} pages of {cfg.page_size} bytes ({need >> 20} MiB) is "
                        f"beyond the memory available ({available >> 20} MiB)")


@dataclass
class _Plan:
    """Per-touch and per-page arrays handed to C."""

    thread_start: np.ndarray  # int64 [threads + 1]
    touch_page: np.ndarray    # int64 [touches]
    touch_write: np.ndarray   # uint8 [touches]
    page_stale: np.ndarray    # uint8 [pages]
    page_zero: np.ndarray     # uint8 [pages]


def _plan(cfg: ExerciseConfig) -> _Plan:
    rng = np.random.default_rng(cfg.seed)
    shares = np.full(cfg.threads, cfg.pages // cfg.threads, dtype=np.int64)
    shares[: cfg.pages % cfg.threads] += 1
    thread_start = np.concatenate([[0], np.cumsum(shares)]).astype(np.int64)
    if cfg.pattern == "seq":
        touch_page = np.arange(cfg.pages, dtype=np.int64)
    elif cfg.pattern == "random":
        touch_page = rng.permutation(cfg.pages).astype(np.int64)
    else:
        touch_page = np.concatenate([_zipf_pages(rng, cfg.pages, n) for n in shares])
    return _Plan(
        thread_start=thread_start,
        touch_page=touch_page,
        touch_write=(rng.random(len(touch_page)) < cfg.write_fraction).astype(np.uint8),
        page_stale=(rng.random(cfg.pages) < cfg.stale_fraction).astype(np.uint8),
        page_zero=(rng.random(cfg.pages) < cfg.zeropage_fraction).astype(np.uint8),
    )


def _zipf_pages(rng: np.random.Generator, pages: int, count: int) -> np.ndarray:
    """`count` distinct pages drawn by Zipf popularity, hottest tending to come first.

    The popularity ranking is the same for every thread (a fixed shuffle), so threads share
    a hot set; weighted sampling without replacement via exponential keys.
    """
    hot_order = np.random.default_rng(0).permutation(pages)
    weight = np.empty(pages)
    weight[hot_order] = 1.0 / np.arange(1, pages + 1) ** ZIPF_EXPONENT
    keys = rng.exponential(size=pages) / weight
    return np.argsort(keys, kind="stable")[:count].astype(np.int64)


@contextmanager
def _abort_fd() -> Iterator[int]:
    """A fd that becomes readable when a signal arrives (so C can stop and Python can raise).

    Only the main thread can set Python's signal wakeup fd; elsewhere there is none (-1).
    """
    if threading.current_thread() is not threading.main_thread():
        yield -1
        return
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        yield r
    finally:
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)


def _execute(cfg: ExerciseConfig, plan: _Plan) -> ExerciseResult:
    c = ffi.new("struct uffdx_config *")
    c.backing = BACKINGS.index(cfg.backing)
    c.mode = MODES.index(cfg.mode)
    c.policy = POLICIES.index(cfg.policy)
    c.misuse = 0 if cfg.misuse is None else MISUSES.index(cfg.misuse) + 1
    c.handler_process = cfg.handler == "process"
    c.threads = cfg.threads
    c.handler_threads = cfg.handler_threads
    cpus = ffi.new("int32_t[]", list(cfg.cpus or []))
    c.ncpus = len(cfg.cpus or [])
    c.cpus = cpus
    c.pages = cfg.pages
    c.page_size = cfg.page_size
    # The buffers stay referenced by `plan` for the duration of the call.
    c.thread_start = ffi.from_buffer("int64_t[]", plan.thread_start)
    c.touch_page = ffi.from_buffer("int64_t[]", plan.touch_page)
    c.touch_write = ffi.from_buffer("uint8_t[]", plan.touch_write)
    c.page_stale = ffi.from_buffer("uint8_t[]", plan.page_stale)
    c.page_zero = ffi.from_buffer("uint8_t[]", plan.page_zero)
    c.fetch_delay_ns = int(cfg.fetch_delay_us * 1e3)
    c.prefetch_interval_ns = int(cfg.prefetch_interval_us * 1e3)
    c.delay_ns = int(cfg.delay_s * 1e9)
    c.stall_timeout_ns = int(cfg.stall_timeout_s * 1e9)
    c.corrupt_page = -1 if cfg.corrupt_page is None else cfg.corrupt_page
    c.no_thread_id = not cfg.thread_id
    c.continue_twice = cfg.continue_twice
    c.reuse_fd = cfg.reuse_fd

    res = ffi.new("struct uffdx_result *")
    try:
        with _abort_fd() as abort_fd:
            c.abort_fd = abort_fd
            lib.uffdx_run(c, res)
        if res.err:
            raise _error(cfg, ffi.string(res.step).decode(), res.err)
        return _result(cfg, res)
    finally:
        lib.uffdx_free(res)


def _error(cfg: ExerciseConfig, step: str, err: int) -> UserError:
    """One clear line for a failed run."""
    name = errno.errorcode.get(err, str(err))
    what = f"{cfg.mode} faults on {cfg.backing}"
    known = {
        ("userfaultfd", errno.EPERM): "userfaultfd is not permitted here (run as root, or set "
                                      "vm.unprivileged_userfaultfd=1)",
        ("userfaultfd", errno.ENOSYS): "this kernel has no userfaultfd (CONFIG_USERFAULTFD)",
        ("UFFDIO_API", errno.EINVAL): f"this kernel's userfaultfd does not support {what}",
        ("UFFDIO_REGISTER", errno.EINVAL): f"cannot register {what} with userfaultfd here",
        ("memfd_create", errno.EINVAL): f"memfd_create cannot make {cfg.backing} memory here",
        ("fallocate(memfd)", errno.ENOSPC): f"not enough {cfg.backing} memory for "
                                            f"{cfg.pages} pages",
        ("fallocate(memfd)", errno.ENOMEM): f"not enough memory for {cfg.pages} pages",
        ("mmap(memfd)", errno.ENOMEM): f"not enough {cfg.backing} memory for {cfg.pages} pages",
        ("mmap(anon)", errno.ENOMEM): f"not enough memory for {cfg.pages} pages",
        ("interrupted", errno.EINTR): "interrupted",
    }
    if (step, err) in known:
        return UserError(f"{known[step, err]} ({name})")
    if err == errno.ECHILD:  # the step says how the handler process ended
        return UserError(f"exerciser failed: {step}")
    return UserError(f"exerciser failed at {step}: {os.strerror(err)} ({name})")


def _records(ptr: Any, count: int, ctype: str, fields: dict[str, str]) -> np.ndarray:
    """A copy of `count` C structs as a numpy structured array (layout taken from cffi)."""
    dtype = np.dtype({
        "names": list(fields),
        "formats": list(fields.values()),
        "offsets": [ffi.offsetof(ctype, name) for name in fields],
        "itemsize": ffi.sizeof(ctype),
    })
    if count == 0:
        return np.zeros(0, dtype)
    return np.frombuffer(ffi.buffer(ptr, count * ffi.sizeof(ctype)), dtype).copy()


def _result(cfg: ExerciseConfig, res: Any) -> ExerciseResult:
    ps = cfg.page_size
    t = _records(res.touches, res.n_touches, "struct uffdx_touch", {
        "tid": "i4", "thread": "i4", "addr": "u8", "page": "i8", "write": "i4",
        "start_ns": "i8", "end_ns": "i8"})
    m = _records(res.msgs, res.n_msgs, "struct uffdx_msg", {
        "ptid": "u4", "addr": "u8", "flags": "u8", "msg_ns": "i8", "handler_tid": "i4"})
    o = _records(res.ops, res.n_ops, "struct uffdx_op", {
        "handler_tid": "i4", "op": "i4", "role": "i4", "start_ns": "i8", "end_ns": "i8",
        "addr": "u8", "len": "u8", "err": "i4", "mapped": "i8"})

    touches = pd.DataFrame({
        "tid": t["tid"].astype(np.int64), "thread": t["thread"].astype(np.int64),
        "addr": t["addr"].astype(np.int64), "page": t["page"], "write": t["write"] != 0,
        "start_ns": t["start_ns"], "end_ns": t["end_ns"],
    })
    messages = pd.DataFrame({
        "ptid": m["ptid"].astype(np.int64), "addr": m["addr"].astype(np.int64),
        "page": ((m["addr"] - res.base) // ps).astype(np.int64),
        "msg_ns": m["msg_ns"], "handler_tid": m["handler_tid"].astype(np.int64),
        "flags": m["flags"].astype(np.int64),
    })
    faults = _attribute(cfg, messages, touches)
    faults["stall_ns"] = faults["end_ns"] - faults["start_ns"]
    faults = faults[["tid", "thread", "addr", "page", "write", "start_ns", "end_ns", "stall_ns",
                     "msg_ns", "handler_tid", "flags", "ptid"]]
    ops = pd.DataFrame({
        "handler_tid": o["handler_tid"].astype(np.int64),
        "op": np.asarray(OPS)[o["op"]], "role": np.asarray(ROLES)[o["role"]],
        "start_ns": o["start_ns"], "end_ns": o["end_ns"],
        "addr": o["addr"].astype(np.int64), "len": o["len"].astype(np.int64),
        "errno": o["err"].astype(np.int64), "mapped": o["mapped"],
    })
    touches = touches.sort_values("start_ns", ignore_index=True)
    faults = faults.sort_values("msg_ns", kind="stable", ignore_index=True)
    ops = ops.sort_values("start_ns", kind="stable", ignore_index=True)

    result = ExerciseResult(
        config=cfg, pid=res.pid, handler_pid=res.handler_pid, page_size=ps, base=res.base,
        features=res.features, faults=faults, ops=ops, touches=touches,
    )
    result.summary = _summary(result, res)
    return result


def _attribute(cfg: ExerciseConfig, messages: pd.DataFrame, touches: pd.DataFrame) -> pd.DataFrame:
    """Each message joined to the touch that made it: by (ptid, page) with thread ids, else by
    page alone, which is exact because validation then allows no page touched by two threads.
    `tid` always comes from the touch; `ptid` is what the message said (0 without thread ids)."""
    columns = ["tid", "page", "thread", "write", "start_ns", "end_ns"]
    if cfg.thread_id:
        return messages.assign(tid=messages["ptid"]).merge(
            touches[columns], on=["tid", "page"], how="left", validate="many_to_one")
    if touches["page"].duplicated().any():
        raise RuntimeError("without thread ids, a page touched by two threads is ambiguous")
    return messages.merge(touches[columns], on="page", how="left", validate="many_to_one")


def _summary(r: ExerciseResult, res: Any) -> dict[str, Any]:
    cfg = r.config
    stall = r.faults["stall_ns"].dropna().to_numpy(dtype=np.int64)
    elapsed = int(r.touches["end_ns"].max() - r.touches["start_ns"].min()) if len(r.touches) else 0
    failed = r.ops[r.ops["errno"] != 0]
    by_errno = {errno.errorcode.get(e, str(e)): int(n)
                for e, n in failed["errno"].value_counts().sort_index().items()}
    misuse = r.ops[r.ops["role"] == "misuse"]["errno"]
    roles = r.ops["role"]

    def pct(q: float) -> int:
        return int(np.percentile(stall, q)) if len(stall) else 0

    return {
        "backing": cfg.backing, "mode": cfg.mode, "policy": cfg.policy, "handler": cfg.handler,
        "pattern": cfg.pattern, "misuse": cfg.misuse,
        "thread_id": cfg.thread_id, "continue_twice": cfg.continue_twice, "reuse_fd": cfg.reuse_fd,
        "pages": cfg.pages, "page_size": r.page_size, "threads": cfg.threads,
        "handler_threads": cfg.handler_threads, "cpus": cfg.cpus,
        "pid": r.pid, "handler_pid": r.handler_pid,
        "touches": len(r.touches), "faults": len(r.faults),
        "p50_ns": pct(50), "p90_ns": pct(90), "p99_ns": pct(99),
        "max_ns": int(stall.max()) if len(stall) else 0,
        "elapsed_ns": elapsed,
        "rate_per_s": round(len(r.faults) * 1e9 / elapsed, 1) if elapsed else 0.0,
        "ioctls": {op: int(n) for op, n in r.ops["op"].value_counts().sort_index().items()},
        "errors": len(failed), "errors_by_errno": by_errno,
        "misuse_errno": int(misuse.mode()[0]) if len(misuse) else None,
        "prefetched": int(((roles == "prefetch") & (r.ops["errno"] == 0)).sum()),
        "eexist_wakes": int((roles == "eexist-wake").sum()),
        "batch_wakes": int((roles == "batch-wake").sum()),
        "repeats": int((roles == "repeat").sum()),
        "repeats_eexist": int(((roles == "repeat") & (r.ops["errno"] == errno.EEXIST)).sum()),
        # reuse_fd: the uffd's fd number reopened on an ordinary file, in process reuse_fd_pid
        "reuse_fd_number": None if res.reuse_fd < 0 else int(res.reuse_fd),
        "reuse_fd_pid": int(res.reuse_pid) or None,
        "reuse_fd_verified": bool(res.reuse_verified), "reuse_fd_moved": bool(res.reuse_moved),
        "reuse_fd_reads": int(res.reuse_reads), "reuse_fd_bytes": int(res.reuse_bytes),
        "reuse_fd_start_ns": int(res.reuse_start_ns) or None,
        "reuse_fd_end_ns": int(res.reuse_end_ns) or None,
        "overflows": int(res.overflows),
        "pages_verified": int(res.pages_verified), "mismatches": int(res.mismatches),
        "first_mismatch": None if res.first_mismatch < 0 else int(res.first_mismatch),
    }
