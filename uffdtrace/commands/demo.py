"""A short workload, end to end: shmem minor faults served by a handler thread.

For now this runs the exerciser alone and prints its summary; the tracer will watch it here.
"""

from __future__ import annotations

import argparse

from uffdtrace.commands.exercise import format_summary, sigterm_exits
from uffdtrace.exerciser import ExerciseConfig
from uffdtrace.exerciser import run as run_workload

NAME = "demo"
HELP = "a short traced workload, end to end"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pages", type=int, default=2000, help="pages to fault (default 2000)")


def run(args: argparse.Namespace) -> int:
    with sigterm_exits():
        res = run_workload(ExerciseConfig(backing="shmem", pages=args.pages))
    print(format_summary(res.summary))
    return 0 if res.summary["mismatches"] == 0 else 1
