"""List the analysis plugins: installed ones (entry-point group `uffdtrace.plugins`, which
includes the built-ins) and, if given, plugin files. Each with its origin, description and
options (set them with `--opt PLUGIN.NAME=VALUE` on `report` and `record`).

examples:
  uffdtrace plugins
  uffdtrace plugins ./my_plugin.py
"""

from __future__ import annotations

import argparse

from uffdtrace.plugins import PluginInfo, installed, load_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="FILE.py", help="also check and list these files")


def run(args: argparse.Namespace) -> int:
    rows: list[tuple[str, str, str]] = []
    options: dict[str, str] = {}
    broken = 0
    for name, found in sorted(installed().items()):
        if isinstance(found, str):
            rows.append((name, "entry point", f"BROKEN: {found}"))
            broken += 1
        else:
            rows.append(_row(found))
            options[name] = _options(found)
    for path in args.files:
        info = load_file(path)
        rows.append(_row(info))
        options[info.name] = _options(info)
    width = [max(len(r[i]) for r in [("NAME", "ORIGIN", ""), *rows]) for i in range(2)]
    print(f"{'NAME':<{width[0]}}  {'ORIGIN':<{width[1]}}  DESCRIPTION")
    for name, origin, description in rows:
        print(f"{name:<{width[0]}}  {origin:<{width[1]}}  {description}")
        if options.get(name):
            print(f"{'':<{width[0]}}  {'':<{width[1]}}  options: {options[name]}")
    return 1 if broken else 0


def _row(info: PluginInfo) -> tuple[str, str, str]:
    return info.name, info.origin, info.cls.description


def _options(info: PluginInfo) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in info.cls.options.items())
