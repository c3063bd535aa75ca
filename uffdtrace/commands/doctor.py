"""Can I trace here, and how?

Probes this machine for real: loads tiny BPF programs, attaches them to every tracepoint the
tracer needs and to a kprobe, reads /proc/kallsyms and makes one real userfaultfd minor fault
on shmem and on hugetlbfs. Prints each capability, the fix for each missing one, and which
backend and modes `--backend auto` would use. Exit status 0 when tracing is possible (missing
kprobes only degrade it), 1 when it is impossible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import textwrap
from typing import Any

from uffdtrace.probes import capabilities as cap
from uffdtrace.probes.capabilities import Capabilities, Check

TITLES = {
    "system": "System",
    "bpf": "BPF features (each loaded into this kernel)",
    "tracepoints": "Tracepoints (format in tracefs, program attached)",
    "symbols": "Kernel symbols (/proc/kallsyms; addresses in --json)",
    "hooks": "Kprobe hooks (the first symbol each has here)",
    "userfaultfd": "userfaultfd (one real minor fault each)",
}
INDENT = "  "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    caps = cap.detect()
    if args.json:
        print(json.dumps(as_json(caps), indent=2))
    else:
        encoding = sys.stdout.encoding or "ascii"
        text = render(caps, unicode=_utf8(encoding), width=_width())
        # Details quote whatever the system said: never let one character crash the report.
        print(text.encode(encoding, "replace").decode(encoding))
    return 0 if cap.tracing_possible(caps) else 1


def as_json(caps: Capabilities) -> dict[str, Any]:
    """The findings and the verdict, JSON-ready."""
    data = dataclasses.asdict(caps)
    data["symbols"] = {name: f"{addr:#x}" for name, addr in caps.symbols.items()}
    data["verdict"] = {
        "tracing_possible": cap.tracing_possible(caps),
        "auto": cap.auto_backend(caps),
        "reason": None if cap.tracing_possible(caps) else cap.why_impossible(caps),
        "backends": {
            backend: {
                "modes": cap.available_modes(caps, backend),
                "missing": {mode: [c.name for c in cap.missing(caps, backend, mode)]
                            for mode in cap.REQUIREMENTS[backend]},
            }
            for backend in cap.REQUIREMENTS
        },
    }
    return data


def render(caps: Capabilities, unicode: bool, width: int) -> str:
    """The one-screen report."""
    good, bad = ("✓", "✗") if unicode else ("OK", "MISSING")
    lines = [f"uffdtrace doctor: kernel {caps.kernel}, probed in {caps.elapsed_s:.1f} s"]
    label_width = max(len(c.name) for c in caps.checks if c.section not in ("tracepoints", "hooks")
                      and c.name not in cap.KERNEL_SYMBOLS)
    for section in cap.SECTIONS:
        checks = [c for c in caps.checks if c.section == section]
        # Passing tracepoints, symbols and hooks go in a grid, absent symbols in one line.
        gridded = [c for c in checks if c.ok and (section == "tracepoints"
                                                  or c.name in cap.KERNEL_SYMBOLS)]
        hooked = [c for c in checks if c.ok and section == "hooks"]
        absent = [c for c in checks if not c.ok and c.name in cap.KERNEL_SYMBOLS]
        lines += ["", TITLES[section]]
        for names, check in _grouped([c for c in checks if c not in gridded + absent + hooked]):
            mark = (good if check.ok else bad).ljust(len(bad))
            lines += _check_lines(names, check, mark, label_width, width)
        lines += _grid([f"{good} {c.name}" for c in gridded], width)
        if hooked:
            lines += _wrap(", ".join(f"{c.name.removeprefix('hook:')}={c.detail}" for c in hooked),
                           width, f"{INDENT}{good} ")
        if absent:
            lines += _wrap(", ".join(c.name for c in absent), width, INDENT + "absent: ")
    lines += ["", *_verdict(caps, width)]
    return "\n".join(lines)


def _grouped(checks: list[Check]) -> list[tuple[list[str], Check]]:
    """Failed checks that share their detail and fix, merged into one entry."""
    groups: dict[tuple[str, str] | str, tuple[list[str], Check]] = {}
    for check in checks:
        key = (check.detail, check.fix) if not check.ok else check.name
        groups.setdefault(key, ([], check))[0].append(check.name)
    return list(groups.values())


def _check_lines(names: list[str], check: Check, mark: str, label_width: int,
                 width: int) -> list[str]:
    """mark, name, detail and (when missing) fix; a group's names get lines of their own."""
    hang = len(INDENT) + len(mark) + 1 + label_width + 2
    if len(names) == 1:
        lines = _wrap(check.detail, width, f"{INDENT}{mark} {names[0].ljust(label_width)}  ")
    else:
        lines = _wrap(", ".join(names) + ":", width, f"{INDENT}{mark} ")
        lines += _wrap(check.detail, width, " " * hang)
    if not check.ok and check.fix:
        lines += _wrap(check.fix, width, " " * hang + "fix: ")
    return lines


def _wrap(text: str, width: int, head: str, hang: int | None = None) -> list[str]:
    """`text` after `head`, wrapped, continuation lines aligned under its start (or `hang`)."""
    indent = " " * (len(head) if hang is None else hang)
    return textwrap.wrap(text, width, initial_indent=head, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False)


def _grid(cells: list[str], width: int) -> list[str]:
    """Cells in as many aligned columns as fit."""
    if not cells:
        return []
    gap = 3
    cell_width = max(map(len, cells)) + gap
    per_line = max(1, (width - len(INDENT) + gap) // cell_width)
    return [INDENT + "".join(c.ljust(cell_width) for c in cells[i:i + per_line]).rstrip()
            for i in range(0, len(cells), per_line)]


def _verdict(caps: Capabilities, width: int) -> list[str]:
    auto = cap.auto_backend(caps)
    if auto is None:
        return _wrap(f"Verdict: {cap.why_impossible(caps)}", width, "", len(INDENT))
    modes = " and ".join(f"{m} ({cap.MODES[m]})" for m in cap.available_modes(caps, auto))
    text = [f"Verdict: tracing is possible. `auto` uses the {auto} backend, modes {modes}."]
    for mode in cap.REQUIREMENTS[auto]:
        if lacking := cap.missing(caps, auto, mode):
            text.append(f"Degraded: no {mode} mode (missing {_names(lacking)}).")
    for backend in cap.REQUIREMENTS:
        if not cap.available_modes(caps, backend):
            text.append(f"Degraded, not a failure: the {backend} backend is unavailable "
                        f"(missing {_names(cap.missing(caps, backend))}).")
    return [line for t in text for line in _wrap(t, width, "", len(INDENT))]


def _names(checks: list[Check]) -> str:
    return ", ".join(c.name for c in checks)


def _utf8(encoding: str) -> bool:
    return encoding.lower().replace("-", "").replace("_", "") == "utf8"


def _width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
