"""Where faults land: per page and per 2 MiB region of each process, and the hottest pages.

Tables:
  pages    pid, page, faults, stall_ns  (the `top` pages with the most faults, then stall)
  regions  pid, region, faults, stall_ns  (every 2 MiB region touched, by address)

page = addr // page_size * page_size; region = addr // 2 MiB * 2 MiB. Rows without addr or
page_size are left out. Over several recordings (`report A B`) both tables start with their
`source`, and a process is a (source, pid): two hosts' pid 42 stay apart.

The sums per page are kept in numpy arrays per process, merged when they have doubled since
the last merge: memory stays in proportion to the pages touched, not to the faults.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd

from uffdtrace.events import SOURCE
from uffdtrace.plugins import Plugin, RunContext

REGION = 2 << 20
MERGE_ROWS = 1 << 20  # partial sums kept before the first merge


def _sums(keys: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """The distinct keys, ascending, and the sum of each of `values` per key (exact)."""
    if not keys.size:
        return (keys, *values)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return (keys[first], *(np.add.reduceat(v[order], first) for v in values))


class _Pages:
    """Faults and stall per page of one process: partial sums, merged as they pile up."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.rows = 0
        self.merged = 0

    def add(self, page: np.ndarray, stall: np.ndarray) -> None:
        part = _sums(page, np.ones(page.size, dtype=np.int64), stall)
        self.parts.append(part)  # type: ignore[arg-type]
        self.rows += part[0].size
        if self.rows > max(2 * self.merged, MERGE_ROWS):
            self.merge()

    def merge(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self.parts) != 1:
            page, faults, stall = (np.concatenate(c) for c in zip(*self.parts, strict=True))
            self.parts = [_sums(page, faults, stall)]  # type: ignore[list-item]
        self.rows = self.merged = self.parts[0][0].size
        return self.parts[0]


class HotpagesPlugin(Plugin):
    name = "hotpages"
    description = "faults and stall per page and per 2 MiB region; the hottest pages"
    options: ClassVar[dict[str, Any]] = {"top": 20}
    columns = ("pid", "addr", "page_size", "stall_ns")

    def start(self, ctx: RunContext) -> None:
        self.top = ctx.options["top"]
        self._procs: dict[tuple[str | None, int], _Pages] = {}  # (source, pid) -> its pages
        self._sourced = False

    def batch(self, df: pd.DataFrame) -> None:
        self._sourced |= SOURCE in df
        df = df[df["pid"].notna() & df["addr"].notna() & df["page_size"].notna()]
        if df.empty:
            return
        size = df["page_size"].to_numpy(np.int64)
        page = df["addr"].to_numpy(np.int64) // size * size
        stall = df["stall_ns"].to_numpy(np.int64, na_value=0)  # a fault without stall adds none
        keys = [SOURCE, "pid"] if SOURCE in df else ["pid"]
        for key, rows in df.groupby(keys, sort=False).indices.items():
            source, pid = key if SOURCE in df else (None, key)
            self._procs.setdefault((source, int(pid)), _Pages()).add(page[rows], stall[rows])

    def finish(self) -> dict[str, pd.DataFrame]:
        empty = np.zeros(0, np.int64)
        pages, regions = [self._frame(None, 0, "page", empty, empty, empty)], []
        for (source, pid), sums in sorted(self._procs.items(),
                                          key=lambda kv: (kv[0][0] or "", kv[0][1])):
            page, faults, stall = sums.merge()
            # the process's hottest: the hottest of all are among them
            top = (pd.DataFrame({"page": page, "faults": faults, "stall_ns": stall})
                   .nlargest(self.top, ["faults", "stall_ns"], keep="all"))
            pages.append(self._frame(source, pid, "page", *(top[c].to_numpy() for c in top)))
            regions.append(self._frame(source, pid, "region",
                                       *_sums(page // REGION * REGION, faults, stall)))
        key = [SOURCE, "pid", "page"] if self._sourced else ["pid", "page"]
        hottest = (pd.concat(pages, ignore_index=True)
                   .sort_values(["faults", "stall_ns", *key],
                                ascending=[False, False, *[True] * len(key)])
                   .head(self.top).reset_index(drop=True))
        regions = pd.concat(regions, ignore_index=True) if regions else pages[0].rename(
            columns={"page": "region"})
        return {"pages": hottest, "regions": regions}

    def _frame(self, source: str | None, pid: int, name: str, at: np.ndarray,
               faults: np.ndarray, stall: np.ndarray) -> pd.DataFrame:
        """Sums of one process, per page or region `at` (addresses), as a result table."""
        frame = pd.DataFrame({"pid": pd.array(np.full(at.size, pid), dtype="Int64"),
                              name: pd.array(at, dtype="Int64"), "faults": faults.astype(np.int64),
                              "stall_ns": pd.array(stall, dtype="Int64")})
        if self._sourced:
            frame.insert(0, SOURCE, pd.array(np.full(at.size, source, dtype=object),
                                             dtype="string"))
        return frame
