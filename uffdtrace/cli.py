"""`uffdtrace` command line: one module per subcommand under uffdtrace.commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from uffdtrace import __version__
from uffdtrace.errors import UserError

# Each module defines NAME, HELP, add_arguments(parser) and run(args) -> int.
COMMANDS = ["demo", "record", "exercise", "doctor", "plugins", "report", "migrate", "top"]

EPILOG = """\
examples:
  uffdtrace doctor                         can I trace here, and how?
  uffdtrace exercise --backing shmem --pages 10000 --json
  uffdtrace demo                           a traced workload, end to end
"""


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end with one line (and exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="uffdtrace",
        description="Trace userfaultfd minor faults and their UFFDIO_CONTINUE with eBPF.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"uffdtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"uffdtrace.commands.{name}")
        p = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except UserError as e:
        print(f"uffdtrace: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
