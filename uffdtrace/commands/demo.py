"""The whole product on one screen: a post-copy-like workload, traced live.

Where network namespaces can be made (root), the workload is `uffdtrace migrate`: a guest
copied over an emulated 1 Gbit/s link, resumed on the target with stale pages fetched on
demand while a prefetcher pulls the rest. Elsewhere it is the exerciser with several faulting
threads, a stale fraction refreshed before each CONTINUE, and a prefetcher. In a terminal it
opens `uffdtrace top --hold` on it (the last screen stays up until q); without one (CI,
pipes) it records it headless, bounded in time, and prints the summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from uffdtrace.commands import record, top

HEADLESS_LIMIT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("light", "full"), default="full",
                        help="probe set (default: full)")


def netns_usable() -> bool:
    """Can this process create (and remove) a network namespace?"""
    if os.geteuid() != 0:
        return False
    try:
        from pyroute2 import netns
        name = f"uffdtrace-probe-{os.getpid()}"
        netns.create(name)
        netns.remove(name)
        return True
    except Exception:
        return False


def workload() -> tuple[list[str], str]:
    """The command to trace, and one line saying what it is."""
    me = [sys.executable, "-m", "uffdtrace"]
    if netns_usable():
        return ([*me, "migrate", "--size", "256", "--vcpus", "4", "--bandwidth", "1",
                 "--delay-us", "50", "--dirty-rate", "50000"],
                "post-copy migration over an emulated 1 Gbit/s link (uffdtrace migrate)")
    return ([*me, "exercise", "--pages", "100000", "--threads", "4", "--policy", "prefetch",
             "--fetch-delay-us", "20", "--prefetch-interval-us", "20"],
            "exerciser with a prefetcher (network namespaces unavailable here, so no migration)")


def run(args: argparse.Namespace) -> int:
    command, what = workload()
    print(f"uffdtrace demo: {what}", file=sys.stderr)
    if sys.stdin.isatty() and sys.stdout.isatty():
        return top.run(_parse(top, ["--mode", args.mode, "--hold", "--", *command]))
    with tempfile.TemporaryDirectory(prefix="uffdtrace-demo-") as tmp:
        csv = Path(tmp) / "faults.csv"
        print(f"uffdtrace demo: no terminal, recording headless (at most {HEADLESS_LIMIT_S:.0f} s)",
              file=sys.stderr)
        return record.run(_parse(record, ["--mode", args.mode, "-o", str(csv), "--duration",
                                          str(HEADLESS_LIMIT_S), "--", *command]))


def _parse(command, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"uffdtrace {command.__name__.rsplit('.', 1)[-1]}")
    command.add_arguments(parser)
    return parser.parse_args(argv)
