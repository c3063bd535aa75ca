"""Run a userfaultfd fault workload whose every fault is known (ground truth for a tracer).

One memfd (shmem, or hugetlb with 2 MiB pages) is mapped twice. For minor faults every page is
populated through the plain mapping and the other mapping is registered with
UFFDIO_REGISTER_MODE_MINOR; faulting threads then first-touch its pages and handler threads
resolve each fault with UFFDIO_CONTINUE (or as the policy says). Missing faults are
resolved with UFFDIO_COPY. Anon backing is one private anonymous mapping (missing faults only,
as QEMU's default guest RAM), filled by UFFDIO_COPY from a private buffer. Afterwards every
page is read back and checked.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import IO, Any, NoReturn

from uffdtrace.errors import UserError
from uffdtrace.exerciser import ExerciseConfig
from uffdtrace.exerciser import run as run_workload
from uffdtrace.exerciser.config import (
    BACKINGS,
    HANDLERS,
    KINDS,
    MISUSES,
    PATTERNS,
    POLICIES,
)

EPILOG = """\
examples:
  uffdtrace exercise                                  1000 shmem minor faults, summary
  uffdtrace exercise --pages 100000 --cpus 0 --json   pinned to CPU 0, summary as JSON
  uffdtrace exercise --backing hugetlb --pages 64     2 MiB pages (nr_hugepages raised
                                                      for the run and restored, as root)
  uffdtrace exercise --threads 4 --handler-threads 2 --pattern random --write-fraction 0.3
  uffdtrace exercise --handler process                handler in another process, given
                                                      the uffd over a unix socket (a VMM)
  uffdtrace exercise --policy copy --stale-fraction 0.2   refresh 20% of pages first
  uffdtrace exercise --policy prefetch --pattern random --prefetch-interval-us 20 \\
                     --fetch-delay-us 100000
        a paced prefetcher maps pages in order while slow (100 ms) demand fetches race it:
        a race the handler lost shows as CONTINUE failing with EEXIST, then UFFDIO_WAKE
  uffdtrace exercise --kind missing --misuse continue-on-missing   provoke and report errno
  uffdtrace exercise --backing anon --zeropage-fraction 0.2   private anonymous memory (as
                                                      QEMU's guest RAM): COPY, 20% ZEROPAGE
  uffdtrace exercise --continue-twice --no-thread-id  as the kernel's selftests: CONTINUE
                                                      again (EEXIST), messages without ptid
  uffdtrace exercise --handler process --reuse-fd     at the end the handler process closes
                                                      the uffd and reads a file at its fd number
  uffdtrace exercise --csv faults.csv --ops-csv ops.csv            per-fault ground truth
  uffdtrace exercise --pid-file /tmp/ex.pid --delay-s 5 --pages 100000
        then, in another terminal, attach a tracer with -p "$(cat /tmp/ex.pid)"

The stall of a fault is the time its touch took (CLOCK_MONOTONIC, ns). Exit status 0 when
every page verified, 1 when some page held wrong bytes, 2 on bad input or a missing
capability.
"""


def _cpu_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpus takes CPU ids like 0,1, not {text!r}") from None


def _one_line_error(message: str) -> NoReturn:
    """argparse errors as one line (no usage dump), like every other failure here."""
    print(f"uffdtrace exercise: {message} (see --help)", file=sys.stderr)
    raise SystemExit(2)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload options, shared with commands that run the exerciser (demo)."""
    g = parser.add_argument_group("workload")
    g.add_argument("--backing", default="shmem", metavar="{" + ",".join(BACKINGS) + "}",
                   help="memory behind the faults (default shmem; anon: private anonymous "
                        "memory, kind missing only)")
    g.add_argument("--kind", metavar="{" + ",".join(KINDS) + "}",
                   help="fault kind (default minor; missing on anon and for --misuse "
                        "continue-on-missing)")
    g.add_argument("--pages", type=int, default=1000, help="pages to fault (default 1000)")
    g.add_argument("--threads", type=int, default=1, help="faulting threads (default 1)")
    g.add_argument("--handler-threads", type=int, default=1, metavar="N",
                   help="handler threads reading the uffd (default 1)")
    g.add_argument("--handler", default="thread", metavar="{" + ",".join(HANDLERS) + "}",
                   help="handlers in this process or in a separate one (default thread)")
    g.add_argument("--pattern", default="seq", metavar="{" + ",".join(PATTERNS) + "}",
                   help="order of first touches (default seq)")
    g.add_argument("--write-fraction", type=float, default=0.0, metavar="F",
                   help="share of touches that write (default 0)")
    g.add_argument("--policy", default="continue", metavar="{" + ",".join(POLICIES) + "}",
                   help="how handlers resolve faults (default continue)")
    g.add_argument("--stale-fraction", type=float, default=0.0, metavar="F",
                   help="policy copy: share of pages refreshed before CONTINUE")
    g.add_argument("--zeropage-fraction", type=float, default=0.0, metavar="F",
                   help="kind missing on shmem or anon: share of pages resolved with ZEROPAGE")
    g.add_argument("--fetch-delay-us", type=float, default=0.0, metavar="US",
                   help="demand handler waits US µs before resolving (a page fetch)")
    g.add_argument("--prefetch-interval-us", type=float, default=0.0, metavar="US",
                   help="policy prefetch: pause US µs before each prefetched page")
    g.add_argument("--misuse", metavar="{" + ",".join(MISUSES) + "}",
                   help="make a wrong ioctl first on every fault and report its errno")
    g.add_argument("--no-thread-id", dest="thread_id", action="store_false",
                   help="do not request UFFD_FEATURE_THREAD_ID: messages carry ptid 0 (the "
                        "ground truth still knows each fault's thread, from its touches)")
    g.add_argument("--continue-twice", action="store_true",
                   help="kind minor, policy continue or copy: after each resolving CONTINUE, "
                        "issue it again, as the kernel's selftests do; it fails with EEXIST "
                        "and wakes no one (role repeat in --ops-csv)")
    g.add_argument("--reuse-fd", action="store_true",
                   help="at the end, close the uffd, open /proc/meminfo at the same fd number "
                        "and read it 10 times (in the handler process with --handler process)")
    g.add_argument("--cpus", type=_cpu_list, metavar="LIST",
                   help="pin workload threads and the handler process to these CPUs, e.g. 0,1")
    g.add_argument("--seed", type=int, default=1, help="seed of the access pattern (default 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.error = _one_line_error  # type: ignore[method-assign]
    add_workload_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the summary as JSON")
    out.add_argument("--csv", metavar="FILE", help="write one row per fault to FILE")
    out.add_argument("--ops-csv", metavar="FILE", help="write one row per uffd ioctl to FILE")
    out.add_argument("--pid-file", metavar="FILE", help="write this process's pid to FILE")
    out.add_argument("--delay-s", type=float, default=0.0, metavar="S",
                     help="wait S seconds after set-up (pid file written, uffd registered) "
                          "before the first touch, so a tracer can attach")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> ExerciseConfig:
    """ExerciseConfig from the options of add_workload_arguments."""
    values = {
        "backing": args.backing, "kind": args.kind, "pages": args.pages,
        "threads": args.threads, "handler_threads": args.handler_threads,
        "handler": args.handler, "pattern": args.pattern,
        "write_fraction": args.write_fraction, "policy": args.policy,
        "stale_fraction": args.stale_fraction, "zeropage_fraction": args.zeropage_fraction,
        "fetch_delay_us": args.fetch_delay_us, "prefetch_interval_us": args.prefetch_interval_us,
        "misuse": args.misuse, "cpus": args.cpus, "seed": args.seed,
        "thread_id": args.thread_id, "continue_twice": args.continue_twice,
        "reuse_fd": args.reuse_fd,
    }
    return ExerciseConfig(**{**values, **overrides})


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) inside the block, so clean-up code runs."""
    def on_sigterm(signum: int, frame: object) -> NoReturn:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _open_output(stack: ExitStack, path: str | None) -> IO[str] | None:
    if path is None:
        return None
    try:
        return stack.enter_context(open(path, "w", newline=""))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def _write_pid_file(path: str) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write pid file {path}: {e.strerror}") from None


def _us(ns: float) -> str:
    return f"{ns / 1000:.1f} µs"


def format_summary(s: dict[str, Any]) -> str:
    """A few human lines about one run."""
    ps = s["page_size"]
    size = f"{ps >> 20} MiB" if ps >= 1 << 20 else f"{ps >> 10} KiB"
    handler = f"{s['handler']} {s['handler_pid']}" if s["handler"] == "process" else "thread"
    lines = [
        f"{s['backing']} {s['kind']} faults, policy {s['policy']}, {s['threads']} faulting + "
        f"{s['handler_threads']} handler thread(s) (handler {handler}), pid {s['pid']}, "
        f"{s['pattern']} over {s['pages']} pages of {size}"
        + (f", pinned to CPUs {','.join(map(str, s['cpus']))}" if s["cpus"] else ""),
        f"faults    {s['faults']} of {s['touches']} touches in {s['elapsed_ns'] / 1e6:.2f} ms"
        f" = {s['rate_per_s']:,.0f} faults/s",
        f"stall     p50 {_us(s['p50_ns'])}   p90 {_us(s['p90_ns'])}   p99 {_us(s['p99_ns'])}"
        f"   max {_us(s['max_ns'])}",
    ]
    ioctls = "  ".join(f"{op} {n}" for op, n in s["ioctls"].items())
    errors = ", ".join(f"{name} {n}" for name, n in s["errors_by_errno"].items()) or "none"
    lines.append(f"ioctls    {ioctls or 'none'};  errors: {errors}")
    extras = []
    if s["misuse"]:
        got = errno.errorcode.get(s["misuse_errno"], s["misuse_errno"])
        extras.append(f"misuse {s['misuse']}: the wrong ioctl failed with {got}")
    if s["policy"] == "prefetch":
        extras.append(f"prefetched {s['prefetched']} pages, {s['eexist_wakes']} EEXIST+WAKE")
    if s["batch_wakes"]:
        extras.append(f"{s['batch_wakes']} batch WAKEs")
    if not s["thread_id"]:
        extras.append("no thread ids (messages' ptid 0)")
    if s["continue_twice"]:
        extras.append(f"{s['repeats']} repeated CONTINUEs, {s['repeats_eexist']} EEXIST")
    if s["reuse_fd"]:
        extras.append(f"fd {s['reuse_fd_number']} reused by pid {s['reuse_fd_pid']}: "
                      f"{s['reuse_fd_reads']} reads, {s['reuse_fd_bytes']} bytes")
    if s["overflows"]:
        extras.append(f"{s['overflows']} records LOST (overflow)")
    if extras:
        lines.append("          " + "; ".join(extras))
    verdict = ("all hold the expected bytes" if not s["mismatches"] else
               f"{s['mismatches']} MISMATCH (first: page {s['first_mismatch']})")
    lines.append(f"verified  {s['pages_verified']} pages: {verdict}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, delay_s=args.delay_s).validated()  # before touching files
    with ExitStack() as stack:
        csv = _open_output(stack, args.csv)
        ops_csv = _open_output(stack, args.ops_csv)
        if args.pid_file:
            _write_pid_file(args.pid_file)
        with sigterm_exits():
            res = run_workload(cfg)
        if csv:
            res.faults.to_csv(csv, index=False)
        if ops_csv:
            res.ops.to_csv(ops_csv, index=False)
    print(json.dumps(res.summary) if args.json else format_summary(res.summary))
    if res.summary["mismatches"]:
        print(f"uffdtrace: verification failed: {res.summary['mismatches']} of "
              f"{res.summary['pages_verified']} pages hold wrong bytes", file=sys.stderr)
        return 1
    return 0
