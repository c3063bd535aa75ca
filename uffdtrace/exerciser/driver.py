"""Run a workload in C (one blocking call, GIL released): the threads and handlers fault and
resolve, then the pages are verified."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from uffdtrace.errors import UserError
from uffdtrace.exerciser._exerciser import ffi, lib
from uffdtrace.exerciser.config import (
    BACKINGS,
    KINDS,
    MISUSES,
    POLICIES,
    ExerciseConfig,
    TouchPlan,
    check_memory,
    touch_plan,
)
from uffdtrace.exerciser.hugepages import reserved_hugepages
from uffdtrace.exerciser.tables import ExerciseResult, tabulate


def run(cfg: ExerciseConfig) -> ExerciseResult:
    """Validate `cfg`, run the workload, verify page contents, and return the records."""
    cfg = cfg.validated()
    check_memory(cfg)
    plan = touch_plan(cfg)
    hugepages = reserved_hugepages(cfg.pages) if cfg.backing == "hugetlb" else nullcontext()
    with hugepages:
        return _execute(cfg, plan)


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


def _execute(cfg: ExerciseConfig, plan: TouchPlan) -> ExerciseResult:
    c = ffi.new("struct uffdx_config *")
    c.backing = BACKINGS.index(cfg.backing)
    c.mode = KINDS.index(cfg.kind)  # the registration mode: MINOR or MISSING
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
        return tabulate(cfg, res)
    finally:
        lib.uffdx_free(res)


def _error(cfg: ExerciseConfig, step: str, err: int) -> UserError:
    """One clear line for a failed run."""
    name = errno.errorcode.get(err, str(err))
    what = f"{cfg.kind} faults on {cfg.backing}"
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
