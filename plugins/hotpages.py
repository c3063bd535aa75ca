"""Where faults land: per page and per 2 MiB region of each process, and the hottest pages.

Tables:
  pages    pid, page, faults, stall_ns  (the `top` pages with the most faults, then stall)
  regions  pid, region, faults, stall_ns  (every 2 MiB region touched, by address)

page = addr // page_size * page_size; region = addr // 2 MiB * 2 MiB. Rows without addr or
page_size are left out.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd

from uffdtrace.plugins import Plugin, RunContext

REGION = 2 << 20
COMPACT_EVERY = 32  # partial aggregates kept before they are merged


def _sum(parts: list[pd.DataFrame], key: list[str]) -> pd.DataFrame:
    return pd.concat(parts).groupby(key, as_index=False)[["faults", "stall_ns"]].sum()


class HotpagesPlugin(Plugin):
    name = "hotpages"
    description = "faults and stall per page and per 2 MiB region; the hottest pages"
    options: ClassVar[dict[str, Any]] = {"top": 20}
    columns = ("pid", "addr", "page_size", "stall_ns")

    def start(self, ctx: RunContext) -> None:
        self.top = ctx.options["top"]
        self._parts: list[pd.DataFrame] = []

    def batch(self, df: pd.DataFrame) -> None:
        df = df[df["pid"].notna() & df["addr"].notna() & df["page_size"].notna()]
        page = df["addr"] // df["page_size"] * df["page_size"]
        part = (pd.DataFrame({"pid": df["pid"], "page": page, "faults": 1,
                              "stall_ns": df["stall_ns"]})
                .groupby(["pid", "page"], as_index=False)[["faults", "stall_ns"]].sum())
        self._parts.append(part)
        if len(self._parts) >= COMPACT_EVERY:
            self._parts = [_sum(self._parts, ["pid", "page"])]

    def finish(self) -> dict[str, pd.DataFrame]:
        empty = pd.DataFrame({"pid": [], "page": [], "faults": [], "stall_ns": []}, dtype="Int64")
        pages = _sum([empty, *self._parts], ["pid", "page"])
        regions = (pages.assign(region=pages["page"] // REGION * REGION)
                   .groupby(["pid", "region"], as_index=False)[["faults", "stall_ns"]].sum())
        hottest = (pages.sort_values(["faults", "stall_ns", "pid", "page"],
                                     ascending=[False, False, True, True])
                   .head(self.top).reset_index(drop=True))
        return {"pages": hottest, "regions": regions}
