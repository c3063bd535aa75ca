"""Drawing panel views (uffdtrace.plugins: Histogram, Rates, Table, Text) into a width x height
box of terminal cells, as Rich renderables. Pure functions: no Textual, easy to test."""

from __future__ import annotations

import itertools
import math
from typing import Any

from rich.console import RenderableType
from rich.table import Table as RichTable
from rich.text import Text as RichText

from uffdtrace.plugins import Histogram, Rates, Table, Text, View

BAR_EIGHTHS = " ▏▎▍▌▋▊▉█"
SPARK_EIGHTHS = " ▁▂▃▄▅▆▇█"
MAX_BAR_ROWS = 3


def format_count(value: float) -> str:
    """12, 1.2k, 12.3k, 1.2M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def format_us(us: float) -> str:
    """A duration in microseconds: 8us, 512us, 1ms, 2.5s."""
    for limit, unit in ((1e6, "s"), (1e3, "ms")):
        if us >= limit:
            return f"{us / limit:.3g}{unit}"
    return f"{us:.3g}us"


def format_ns(ns: int) -> str:
    return format_us(ns / 1000)


def render_view(view: View, width: int, height: int, *, log_scale: bool = False,
                sort: int | None = None, pid: int | None = None) -> RenderableType:
    """`view` drawn to fit width x height cells. `sort`: table column to sort by (default: the
    view's own); `pid`: show only table rows of this pid."""
    if isinstance(view, Histogram):
        return histogram(view, width, height, log_scale)
    if isinstance(view, Rates):
        return rates(view, width, height)
    if isinstance(view, Table):
        return table(view, height, view.sort if sort is None else sort, pid)
    if isinstance(view, Text):
        return RichText("\n".join(view.lines[:height]), no_wrap=True, overflow="ellipsis")
    raise TypeError(f"not a panel view: {type(view).__name__}")


def merged(h: Histogram, rows: int) -> tuple[list[float], list[int]]:
    """Edges and counts with neighbouring buckets merged pairwise until they fit in `rows`."""
    edges, counts = list(h.edges), list(h.counts)
    while len(counts) > max(rows, 1):
        counts = [sum(counts[i:i + 2]) for i in range(0, len(counts), 2)]
        edges = [*edges[:-1:2], edges[-1]]
    return edges, counts


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of `fraction` of `width` cells, to an eighth of a cell."""
    eighths = round(max(0.0, min(fraction, 1.0)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (BAR_EIGHTHS[part] if part else "")).ljust(width)


def histogram(h: Histogram, width: int, height: int, log_scale: bool) -> RichText:
    """Per bucket: range, bar, count. Buckets are merged when there are too few rows and bars
    get thicker (up to MAX_BAR_ROWS) when there are many; the note takes the first row when
    there is room."""
    out = RichText(no_wrap=True, overflow="crop")
    note = bool(h.note) and height >= 3
    if note:
        out.append(h.note[:width] + "\n", style="bold")
    edges, counts = merged(h, height - note)
    thick = max(1, min((height - note) // max(len(counts), 1), MAX_BAR_ROWS))
    unit = format_us if h.unit == "us" else (lambda v: f"{v:g}{h.unit}")
    labels = [f"{unit(lo)}-{unit(hi)}" for lo, hi in itertools.pairwise(edges)]
    shown = [format_count(c) for c in counts]
    label_w = max(map(len, labels), default=0)
    count_w = max(map(len, shown), default=0)
    bar_w = max(width - label_w - count_w - 2, 1)
    top = max(counts, default=0)
    scale = (lambda c: math.log1p(c) / math.log1p(top)) if log_scale else (lambda c: c / top)
    lines = []
    for label, count, text in zip(labels, counts, shown, strict=True):
        drawn = bar(scale(count) if top else 0.0, bar_w)
        for row in range(thick):  # thick bars: the last row is a gap between buckets
            middle = row == (thick - 2) // 2 if thick > 1 else True
            gap = thick > 1 and row == thick - 1
            lines.append(((label if middle else "").rjust(label_w), " " * bar_w if gap else drawn,
                          text if middle else ""))
    for i, (label, drawn, text) in enumerate(lines):
        out.append(label + " ", style="dim")
        out.append(drawn, style="green")
        out.append(" " + text.rjust(count_w) + ("\n" if i < len(lines) - 1 else ""))
    return out


def resample(values: tuple[float, ...], width: int) -> list[float]:
    """`values` as `width` columns: maxima of groups when too many, stretched when too few."""
    if not values or width <= 0:
        return []
    if len(values) > width:
        step = len(values) / width
        return [max(values[int(i * step):max(int((i + 1) * step), int(i * step) + 1)])
                for i in range(width)]
    return [values[i * len(values) // width] for i in range(width)]


def sparkline(values: tuple[float, ...], width: int, rows: int) -> list[str]:
    """`rows` lines of vertical bars (top line first), scaled to the largest value."""
    columns = resample(values, width)
    top = max(columns, default=0) or 1
    levels = [round(v / top * rows * 8) for v in columns]
    return ["".join(SPARK_EIGHTHS[max(0, min(level - (rows - 1 - r) * 8, 8))] for level in levels)
            for r in range(rows)]


def rates(view: Rates, width: int, height: int) -> RichText:
    """Per rate: name, current, peak, then its sparkline on the rest of the width (taller when
    the box has room)."""
    out = RichText(no_wrap=True, overflow="crop")
    rows = max(height // max(len(view.rates), 1), 1)
    name_w = max((len(r.name) for r in view.rates), default=0)
    for n, r in enumerate(view.rates):
        head = f"{r.name:<{name_w}} {format_count(r.current):>7}  peak {format_count(r.peak):>7} "
        lines = sparkline(r.history, width - len(head), rows)
        for i, line in enumerate(lines):
            out.append(head if i == rows - 1 else " " * len(head), style="bold")
            out.append(line, style="cyan")
            if n < len(view.rates) - 1 or i < rows - 1:
                out.append("\n")
    return out


def cell(column: str, value: Any) -> str:
    if column.endswith("_ns") and isinstance(value, int | float):
        return format_ns(value)
    return str(value)


def table(view: Table, height: int, sort: int, pid: int | None) -> RichTable:
    """The rows that fit, sorted by column `sort` (numbers descending, text ascending)."""
    rows = list(view.rows)
    if pid is not None and "pid" in view.columns:
        at = view.columns.index("pid")
        rows = [r for r in rows if r[at] == pid]
    numeric = all(isinstance(r[sort], int | float) for r in rows)
    rows.sort(key=lambda r: (r[sort] if numeric else str(r[sort])), reverse=numeric)
    shown = [[cell(c, v) for c, v in zip(view.columns, r, strict=True)]
             for r in rows[:max(height - 1, 0)]]
    out = RichTable(box=None, padding=(0, 1), pad_edge=False, expand=True)
    for i, name in enumerate(view.columns):
        title = name.removesuffix("_ns") + ("▼" if i == sort else "")
        number = all(isinstance(r[i], int | float) for r in rows)
        # numbers keep every digit; text columns give way when the box is narrow
        out.add_column(title, justify="right" if number else "left", no_wrap=True,
                       overflow="crop" if number else "ellipsis",
                       min_width=max([len(title), *(len(s[i]) for s in shown)]) if number else 3,
                       header_style="bold reverse" if i == sort else "bold")
    for r in shown:
        out.add_row(*r)
    return out
