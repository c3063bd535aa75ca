"""`uffdtrace` command line: one module per subcommand under uffdtrace.commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from uffdtrace import __version__
from uffdtrace.errors import UserError

# name -> one-line help. uffdtrace.commands.<name> defines add_arguments(parser) and
# run(args) -> int, and is imported only when its command runs (`doctor` must work where BCC,
# textual or pyroute2 are missing, and `exercise` needs none of them).
COMMANDS = {
    "demo": "a post-copy-like workload, traced live (headless without a terminal)",
    "record": "record per-fault timelines to CSV or Parquet",
    "exercise": "run a userfaultfd fault workload with ground truth",
    "doctor": "can I trace here, and how? (probes this machine, prints fixes)",
    "plugins": "list the analysis plugins (installed and given files)",
    "report": "analyse recordings (CSV, Parquet; one or many) with plugins (tables, CSVs, plots)",
    "migrate": "emulate a post-copy live migration (namespaces, veth, TBF, MINOR faults)",
    "top": "live view: latency histograms, rates, threads by stall",
    "export": "Prometheus exporter of fault metrics aggregated in BPF (a daemon for fleets)",
}

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


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The full parser of the command named in argv; every other command by name and help."""
    parser = OneLineParser(
        prog="uffdtrace",
        description="Trace userfaultfd minor faults and their UFFDIO_CONTINUE with eBPF.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"uffdtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:
            module = importlib.import_module(f"uffdtrace.commands.{name}")
            p.description = module.__doc__
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args._run(args)
    except UserError as e:
        print(f"uffdtrace: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `uffdtrace ... | head`: the reader left; say nothing more there
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
