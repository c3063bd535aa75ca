"""Plugin API and discovery: the analysis layer over fault batches.

A plugin is a subclass of `Plugin`. It declares a `name`, a one-line `description`, its
`options` (name -> default; values given with `--opt PLUGIN.NAME=VALUE` are converted to the
default's type) and the FAULT_COLUMNS it reads (`columns`; None: all of them). The host calls

    start(ctx)       once, before any fault; ctx is a RunContext, ctx.options its own options
    batch(df)        per batch: a DataFrame of fault rows (columns as declared, dtypes as in
                     uffdtrace.events). Work on whole columns, never one Python call per fault.
    ioctls(df)       per batch with uffd ioctls (full mode, live runs): a DataFrame of
                     IOCTL_COLUMNS rows, every ioctl of the traced processes, failed or not
    tick(now_ns)     live runs only, about once a second (CLOCK_MONOTONIC ns): a snapshot
    finish()         once at the end: {table name: DataFrame}, the plugin's results

Live viewers (`uffdtrace top`) also call, in the plugin's own thread like every other hook:

    panels()         after each tick(): what to show now, a list of Panel (see below)
    reset()          the viewer's reset key: start the panels afresh (finish() is unaffected)

A Panel is a name and one or more views (the viewer's metric key cycles them); a view is a
Histogram, Rates, Table or Text, plain immutable data that the viewer draws. The built-in
panels of `top` come from the built-in plugins through this same path.

Plugins are found through the entry-point group `uffdtrace.plugins` (how the built-ins in
plugins/ are registered, and how a package ships its own) or from a file named explicitly
(`--plugin ./mine.py`: a spec containing '/' or ending in .py). Nothing is ever imported from
the current directory implicitly.

    from uffdtrace.plugins import Plugin

    class Slowest(Plugin):
        name = "slowest"
        description = "the slowest fault"
        columns = ("tid", "stall_ns")

        def start(self, ctx):
            self.worst = 0

        def batch(self, df):
            self.worst = max(self.worst, int(df["stall_ns"].max(skipna=True) or 0))

        def finish(self):
            return {"max": pd.DataFrame({"stall_ns": [self.worst]})}
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from uffdtrace.errors import UserError
from uffdtrace.events import FAULT_COLUMNS

ENTRY_POINT_GROUP = "uffdtrace.plugins"


@dataclass(frozen=True)
class RunContext:
    """What a run traces, handed to every plugin's start()."""

    targets: tuple[str, ...]  # what is traced, e.g. ("pid 4242",) or ("file faults.csv",)
    backend: str  # tracing backend, "file" when replaying a CSV
    mode: str  # full | light; "" when unknown (offline)
    kernel_release: str = field(default_factory=lambda: os.uname().release)
    live: bool = True  # False: replay of a recorded CSV (report), no tick()
    tables: bool = True  # False: finish()'s tables are not wanted (a live viewer): keep no rows
    options: Mapping[str, Any] = field(default_factory=dict)  # this plugin's options


class Plugin:
    """Base class with no-op hooks: override what you need."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    columns: ClassVar[tuple[str, ...] | None] = None

    def start(self, ctx: RunContext) -> None:
        """Called once before the first batch."""

    def batch(self, df: pd.DataFrame) -> None:
        """Called with each batch of fault rows."""

    def ioctls(self, df: pd.DataFrame) -> None:
        """Called with each batch of uffd ioctl rows (full mode)."""

    def tick(self, now_ns: int) -> None:
        """Called periodically during live runs."""

    def finish(self) -> dict[str, pd.DataFrame]:
        """Called once at the end: the plugin's named result tables."""
        return {}

    def panels(self) -> list[Panel]:
        """Live viewers: the panels to show now (called after each tick)."""
        return []

    def reset(self) -> None:
        """Live viewers: forget what the panels showed so far."""


@dataclass(frozen=True)
class Histogram:
    """A panel view: counts per bucket; bucket i holds [edges[i], edges[i+1]) in `unit`."""

    title: str
    edges: tuple[float, ...]  # len(counts) + 1
    counts: tuple[int, ...]
    unit: str = "us"
    note: str = ""  # one line shown with it, e.g. "n=1200 p50 8.1us p99 14us"


@dataclass(frozen=True)
class Rate:
    """One rate of a Rates view: now, the peak so far, and recent values (oldest first)."""

    name: str
    current: float
    peak: float
    history: tuple[float, ...]


@dataclass(frozen=True)
class Rates:
    """A panel view: rates with a sparkline of their history."""

    title: str
    rates: tuple[Rate, ...]


@dataclass(frozen=True)
class Table:
    """A panel view: rows of plain values. Columns ending in _ns are shown as durations; a
    "pid" column is what the viewer's pid filter applies to."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    sort: int = 0  # column sorted by (descending) until the user picks another


@dataclass(frozen=True)
class Text:
    """A panel view: lines of text."""

    title: str
    lines: tuple[str, ...]


View = Histogram | Rates | Table | Text


@dataclass(frozen=True)
class Panel:
    """One box of a live viewer: `name` is unique within its plugin; views[0] shows first."""

    name: str
    views: tuple[View, ...]


@dataclass(frozen=True)
class PluginInfo:
    """A discovered plugin: its class and where it came from."""

    cls: type[Plugin]
    origin: str  # "entry point MODULE:ATTR" or "file PATH"

    @property
    def name(self) -> str:
        return self.cls.name


def is_path(spec: str) -> bool:
    """`--plugin` specs naming a file rather than an installed plugin."""
    return "/" in spec or spec.endswith(".py")


def _check(cls: Any, where: str) -> type[Plugin]:
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise UserError(f"{where} is not a uffdtrace.plugins.Plugin subclass")
    if not cls.name or not isinstance(cls.name, str):
        raise UserError(f"{where} has no name")
    unknown = sorted(set(cls.columns or ()) - FAULT_COLUMNS.keys())
    if unknown:
        raise UserError(f"plugin {cls.name} ({where}) asks for unknown columns: "
                        + ", ".join(unknown))
    return cls


def installed() -> dict[str, PluginInfo | str]:
    """Installed plugins by entry-point name: their info, or why they fail to load."""
    found: dict[str, PluginInfo | str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = PluginInfo(_check(ep.load(), f"entry point {ep.value}"),
                                        f"entry point {ep.value}")
        except UserError as e:
            found[ep.name] = str(e)
        except Exception as e:  # a broken third-party package must not break discovery
            found[ep.name] = f"entry point {ep.value} fails on import: {type(e).__name__}: {e}"
    return found


def load_file(path: str | Path) -> PluginInfo:
    """The plugin defined in a Python file: its one Plugin subclass, or its PLUGIN attribute."""
    shown, path = path, Path(path)  # messages name the file as the user did
    if path.is_dir():
        raise UserError(f"plugin {shown} is a directory: name a Python file in it")
    if not path.is_file():
        raise UserError(f"plugin file {shown} not found")
    module_name = f"uffdtrace_user_plugin_{len(sys.modules)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"plugin file {shown} cannot be imported (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up there
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserError(f"plugin file {shown} fails on import: {type(e).__name__}: {e}") from e
    where = f"plugin file {shown}"
    if hasattr(module, "PLUGIN"):
        return PluginInfo(_check(module.PLUGIN, f"{where}: PLUGIN"), f"file {shown}")
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Plugin) and c.__module__ == module_name]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise UserError(f"{where} must define exactly one Plugin subclass or a PLUGIN "
                        f"attribute (found: {found})")
    return PluginInfo(_check(classes[0], where), f"file {shown}")


def resolve(specs: Sequence[str]) -> list[PluginInfo]:
    """Installed plugin names and plugin files -> their info, in order; UserError if unknown."""
    available: dict[str, PluginInfo | str] | None = None
    out: list[PluginInfo] = []
    for spec in specs:
        if is_path(spec):
            info = load_file(spec)
        else:
            if available is None:
                available = installed()
            found = available.get(spec)
            if found is None:
                names = ", ".join(sorted(available)) or "none installed"
                raise UserError(f"unknown plugin {spec!r} (available: {names}; "
                                "a file needs a path like ./mine.py)")
            if isinstance(found, str):
                raise UserError(f"plugin {spec}: {found}")
            info = found
        if any(o.name == info.name for o in out):
            raise UserError(f"plugin {info.name} given twice")
        out.append(info)
    return out


def _convert(value: str, default: Any, what: str) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{what} must be true or false, not {value!r}")
    if isinstance(default, int | float):
        try:
            return type(default)(value)
        except ValueError:
            raise UserError(f"{what} must be {type(default).__name__}, not {value!r}") from None
    return value


def parse_options(opts: Sequence[str], plugins: Sequence[PluginInfo]) -> dict[str, dict[str, Any]]:
    """`PLUGIN.NAME=VALUE` strings -> each plugin's full options (defaults, then the given)."""
    by_name = {p.name: p for p in plugins}
    out = {p.name: dict(p.cls.options) for p in plugins}
    for opt in opts:
        key, eq, value = opt.partition("=")
        plugin, dot, name = key.partition(".")
        if not (eq and dot and plugin and name):
            raise UserError(f"--opt {opt!r}: expected PLUGIN.NAME=VALUE")
        if plugin not in by_name:
            raise UserError(f"--opt {opt!r}: plugin {plugin} is not selected")
        defaults = by_name[plugin].cls.options
        if name not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise UserError(f"plugin {plugin} has no option {name!r} (options: {known})")
        out[plugin][name] = _convert(value, defaults[name], f"option {plugin}.{name}")
    return out
