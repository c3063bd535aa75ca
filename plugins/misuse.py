"""uffd API misuse and loose ends: failed ioctls explained, and unresolved faults.

Failed ioctls come from the ioctl records (full mode; `report --ioctls`), each explained by
what failed and where. Two kinds are told apart:
  already mapped  EEXIST where the page was mapped already: a repeated or raced CONTINUE,
                  COPY or ZEROPAGE (the kernel selftests repeat every CONTINUE on purpose; a
                  prefetcher races demand faults). Harmless: it maps nothing and wakes no one.
  error           anything else: the ioctl did not do what the handler meant, and a thread
                  waiting on that page stays blocked until another ioctl resolves it.

Tables:
  errors      enter_ns, pid, tid, comm, ioctl, start, len, errno, errno_name, category,
              explanation: one row per failed uffd ioctl
  unresolved  fault_ns, pid, tid, comm, addr, backing, kind, outcome, stall_ns: faults whose
              thread exited inside them, or that were still blocked when tracing ended

Over several recordings (`report A B`, with their --ioctls) both tables start with the rows'
`source`, and a range registered by one recording's pid 42 says nothing of another's.

Panel (live viewers): failed ioctls by category and errno, and unresolved faults. A live
viewer (no tables wanted) only counts them: it keeps no rows.
"""

from __future__ import annotations

import errno

import numpy as np
import pandas as pd

from uffdtrace.aggregate import add_counts
from uffdtrace.events import SOURCE
from uffdtrace.plugins import Panel, Plugin, RunContext, Table

REGISTER_MODE_MINOR = 4
EXPLAIN = {
    ("CONTINUE", errno.EEXIST): "CONTINUE on a page that is already mapped (a repeated or "
                                "raced CONTINUE): it maps and wakes nothing",
    ("COPY", errno.EEXIST): "COPY onto a page that is already there",
    ("ZEROPAGE", errno.EEXIST): "ZEROPAGE onto a page that is already there",
    ("CONTINUE", errno.EINVAL): "CONTINUE needs a range registered with "
                                "UFFDIO_REGISTER_MODE_MINOR and page-aligned arguments",
    ("CONTINUE", errno.EFAULT): "CONTINUE found no page in the page cache: not a minor fault "
                                "(fill the page cache first, or resolve with UFFDIO_COPY)",
    ("ZEROPAGE", errno.EINVAL): "ZEROPAGE is not supported on this memory (hugetlbfs) or the "
                                "range is not page-aligned",
}
EXPLAIN_ANY = {
    errno.EINVAL: "invalid arguments for this ioctl, mode or memory",
    errno.EAGAIN: "the mappings changed during the ioctl: retry it",
    errno.ENOENT: "the range is no longer registered (or the mapping went away)",
    errno.ESRCH: "the faulting process is exiting",
    errno.ENOMEM: "the kernel could not allocate memory for the page",
    errno.EFAULT: "a bad user address in the arguments, or no page to map",
}
IN_MINOR_RANGE = ("; in a MINOR-registered range the page cache holds the page: resolve "
                  "with UFFDIO_CONTINUE")
ERRORS = ["enter_ns", "pid", "tid", "comm", "ioctl", "start", "len", "errno"]
UNRESOLVED_OUTCOMES = ("unresolved_exit", "unresolved_end")
UNRESOLVED = ["fault_ns", "pid", "tid", "comm", "addr", "backing", "kind", "outcome", "stall_ns"]


class MisusePlugin(Plugin):
    name = "misuse"
    description = "failed uffd ioctls explained (repeats apart from errors); unresolved faults"
    columns = tuple(dict.fromkeys(UNRESOLVED))

    def start(self, ctx: RunContext) -> None:
        self.keep = ctx.tables  # a live viewer counts, and keeps no rows
        self._errors: list[pd.DataFrame] = []
        self._unresolved: list[pd.DataFrame] = []
        self._minor_ranges: list[tuple[str | None, int, int, int]] = []  # source, pid, start, end
        self._sourced = False
        self.reset()

    def reset(self) -> None:
        self._counts: dict[str, int] = {}

    def ioctls(self, df: pd.DataFrame) -> None:
        self._sourced |= SOURCE in df
        codes = df["errno"].to_numpy(np.int64, na_value=0)
        failed = codes != 0
        if self.keep:
            self._tabulate(df, failed)
        if not failed.any():
            return
        by_errno: dict[int, int] = {}
        add_counts(by_errno, pd.Series(codes[failed]))
        for code, n in sorted(by_errno.items()):
            key = (f"{'already mapped' if code == errno.EEXIST else 'error'}: "
                   f"{errno.errorcode.get(code, code)}")
            self._counts[key] = self._counts.get(key, 0) + n

    def _tabulate(self, df: pd.DataFrame, failed: np.ndarray) -> None:
        """The MINOR-registered ranges, and each failed ioctl explained."""
        registered = df[(df["ioctl"] == "REGISTER") & (df["errno"] == 0)
                        & ((df["mode"] & REGISTER_MODE_MINOR) != 0)]
        sources = registered[SOURCE] if SOURCE in df else [None] * len(registered)
        self._minor_ranges += [(src, int(p), int(s), int(s + n)) for src, p, s, n in zip(
            sources, registered["pid"], registered["start"], registered["len"], strict=True)]
        if not failed.any():
            return
        failed = df.loc[failed, _with_source(df, ERRORS)].copy()
        failed["category"] = np.where(failed["errno"] == errno.EEXIST, "already mapped", "error")
        sources = failed[SOURCE] if SOURCE in df else [None] * len(failed)
        failed["explanation"] = [self._explain(*row) for row in zip(
            failed["ioctl"], failed["errno"], sources, failed["pid"], failed["start"], strict=True)]
        self._errors.append(failed)

    def _explain(self, ioctl: str, code: int, source: str | None, pid: int, start) -> str:
        text = EXPLAIN.get((ioctl, code)) or EXPLAIN_ANY.get(code, f"{ioctl} failed")
        if ioctl in ("COPY", "ZEROPAGE") and code == errno.EEXIST and not pd.isna(start) and any(
                src == source and p == pid and s <= start < e
                for src, p, s, e in self._minor_ranges):
            text += IN_MINOR_RANGE
        return text

    def batch(self, df: pd.DataFrame) -> None:
        self._sourced |= SOURCE in df
        outcomes: dict[str, int] = {}
        add_counts(outcomes, df["outcome"])
        n = sum(outcomes.get(o, 0) for o in UNRESOLVED_OUTCOMES)
        if not n:
            return
        self._counts["unresolved faults"] = self._counts.get("unresolved faults", 0) + n
        if self.keep:
            unresolved = df[df["outcome"].isin(UNRESOLVED_OUTCOMES)]
            self._unresolved.append(unresolved[_with_source(df, UNRESOLVED)])

    def panels(self) -> list[Panel]:
        rows = tuple(sorted(self._counts.items()))
        return [Panel("errors", (Table("uffd errors", ("what", "count"), rows,
                                       sort=1),))]

    def finish(self) -> dict[str, pd.DataFrame]:
        errors = (pd.concat(self._errors, ignore_index=True) if self._errors
                  else pd.DataFrame(columns=[*self._columns(ERRORS), "category", "explanation"]))
        errors.insert(errors.columns.get_loc("errno") + 1, "errno_name", errors["errno"].map(
            lambda e: errno.errorcode.get(int(e), f"errno {e}")).astype("string"))
        unresolved = (pd.concat(self._unresolved, ignore_index=True) if self._unresolved
                      else pd.DataFrame(columns=self._columns(UNRESOLVED)))
        return {"errors": errors, "unresolved": unresolved}

    def _columns(self, columns: list[str]) -> list[str]:
        """`columns`, after the source over several recordings."""
        return [SOURCE, *columns] if self._sourced else columns


def _with_source(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """`columns`, after the rows' source when they have one."""
    return [SOURCE, *columns] if SOURCE in df else columns
