"""The save key of `uffdtrace top`: the tables on screen, written as CSV files."""

from __future__ import annotations

import csv
import re
from itertools import pairwise
from pathlib import Path

from uffdtrace.plugins import Histogram, Panel, Table


def save_snapshot(panels: dict[str, Panel], out: Path) -> list[Path]:
    """One CSV per Histogram (lo, hi, count) and Table view: OUT/<plugin.panel>_<title>.csv."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, panel in panels.items():
        for view in panel.views:
            if isinstance(view, Histogram):
                header = ("lo_" + view.unit, "hi_" + view.unit, "count")
                rows = [(lo, hi, n) for (lo, hi), n in zip(pairwise(view.edges), view.counts, strict=True)]
            elif isinstance(view, Table):
                header, rows = view.columns, list(view.rows)
            else:
                continue
            path = out / (re.sub(r"\W+", "_", f"{key}_{view.title}").strip("_") + ".csv")
            with open(path, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(header)
                writer.writerows(rows)
            paths.append(path)
    return paths
