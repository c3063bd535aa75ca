"""What a workload is: its options, validated with one clear error each, and the plan of
touches it follows (the same seed gives the same plan)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from uffdtrace.errors import UserError
from uffdtrace.exerciser.hugepages import HUGEPAGE_SIZE, mem_available

BACKINGS = ("shmem", "hugetlb", "anon")
KINDS = ("minor", "missing")  # of fault
HANDLERS = ("thread", "process")
PATTERNS = ("seq", "random", "zipf")
POLICIES = ("continue", "copy", "batch", "prefetch")
MISUSES = ("continue-on-missing", "copy-on-minor", "zeropage-on-minor")

MAX_THREADS = 256
ZIPF_EXPONENT = 1.0

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
    kind: str | None = None           # minor | missing; None: missing on anon and for
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
    zeropage_fraction: float = 0.0    # kind missing: pages resolved with ZEROPAGE, not COPY
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
        """This config with `kind` resolved, or UserError naming the first bad value."""
        _choice("backing", self.backing, BACKINGS)
        _choice("handler", self.handler, HANDLERS)
        _choice("pattern", self.pattern, PATTERNS)
        _choice("policy", self.policy, POLICIES)
        if self.misuse is not None:
            _choice("misuse", self.misuse, MISUSES)
        kind = self.kind
        if kind is None:
            missing = self.backing == "anon" or self.misuse == "continue-on-missing"
            kind = "missing" if missing else "minor"
        _choice("kind", kind, KINDS)
        for name in ("thread_id", "continue_twice", "reuse_fd"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name.replace('_', ' ')} must be True or False, "
                                f"not {getattr(self, name)!r}")
        if self.backing == "anon" and kind != "missing":
            raise UserError("backing anon supports kind missing only "
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
        if self.policy == "copy" and kind != "minor":
            raise UserError("policy copy refreshes pages before CONTINUE: it needs kind minor")
        if self.stale_fraction and self.policy != "copy":
            raise UserError("stale fraction applies to policy copy only")
        if self.zeropage_fraction and (kind != "missing" or self.backing == "hugetlb"):
            raise UserError("zeropage fraction needs kind missing on shmem or anon "
                            "(hugetlb has no UFFDIO_ZEROPAGE)")
        if self.continue_twice and (kind != "minor" or self.policy not in ("continue", "copy")):
            raise UserError("continue twice repeats the CONTINUE that resolves each fault: it "
                            "needs kind minor and policy continue or copy")
        if not self.thread_id and self.pattern == "zipf" and self.threads > 1:
            raise UserError("without thread ids a fault is known by its page alone: pattern zipf "
                            "with several threads touches pages from more than one thread "
                            "(use seq or random)")
        if self.misuse is not None:
            wanted = "missing" if self.misuse == "continue-on-missing" else "minor"
            if kind != wanted:
                raise UserError(f"misuse {self.misuse} needs kind {wanted}")
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
        return replace(self, kind=kind, cpus=None if self.cpus is None else list(self.cpus))


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


def check_memory(cfg: ExerciseConfig) -> None:
    if cfg.backing == "hugetlb":
        return  # the hugepage pool is checked by reserved_hugepages
    need = cfg.pages * cfg.page_size
    available = mem_available()
    if need > available * 0.8:
        raise UserError(f"{cfg.pages} pages of {cfg.page_size} bytes ({need >> 20} MiB) is "
                        f"beyond the memory available ({available >> 20} MiB)")


@dataclass
class TouchPlan:
    """Per-touch and per-page arrays handed to C."""

    thread_start: np.ndarray  # int64 [threads + 1]
    touch_page: np.ndarray    # int64 [touches]
    touch_write: np.ndarray   # uint8 [touches]
    page_stale: np.ndarray    # uint8 [pages]
    page_zero: np.ndarray     # uint8 [pages]


def touch_plan(cfg: ExerciseConfig) -> TouchPlan:
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
    return TouchPlan(
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
