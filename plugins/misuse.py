"""uffd API misuse and loose ends: failed ioctls with an explanation, and unresolved faults.

Tables:
  errors      fault_ns, pid, tid, addr, kind, resolver, errno, errno_name, explanation
              (every fault whose page saw a failed uffd ioctl: errno != 0)
  unresolved  fault_ns, pid, tid, comm, addr, backing, kind
              (faults still in flight when their thread exited: outcome == unresolved_exit)

Panel (live viewers): failed uffd ioctls by errno, with unresolved faults as one more row.
"""

from __future__ import annotations

import errno

import pandas as pd

from uffdtrace.plugins import Panel, Plugin, RunContext, Table

EXPLAIN = {
    errno.EEXIST: "a page is already mapped there: a MINOR-registered range is resolved with "
                  "UFFDIO_CONTINUE, not COPY/ZEROPAGE",
    errno.EINVAL: "UFFDIO_CONTINUE needs a range registered with UFFDIO_REGISTER_MODE_MINOR "
                  "and page-aligned arguments: this fault is not a minor one",
    errno.EFAULT: "UFFDIO_CONTINUE found no page in the page cache: not a minor fault "
                  "(fill the page cache first, or resolve with UFFDIO_COPY)",
    errno.EAGAIN: "the mappings changed during the ioctl: retry it",
    errno.ENOENT: "the range is no longer registered (or the mapping went away)",
    errno.ESRCH: "the faulting process is exiting",
    errno.ENOMEM: "the kernel could not allocate memory for the page",
}
ERRORS = ["fault_ns", "pid", "tid", "addr", "kind", "resolver", "errno"]
UNRESOLVED = ["fault_ns", "pid", "tid", "comm", "addr", "backing", "kind"]


class MisusePlugin(Plugin):
    name = "misuse"
    description = "failed uffd ioctls (EEXIST, EINVAL, EFAULT...) explained; unresolved faults"
    columns = tuple(dict.fromkeys([*ERRORS, *UNRESOLVED, "outcome"]))

    def start(self, ctx: RunContext) -> None:
        self._errors: list[pd.DataFrame] = []
        self._unresolved: list[pd.DataFrame] = []
        self.reset()

    def reset(self) -> None:
        self._counts: dict[str, int] = {}

    def batch(self, df: pd.DataFrame) -> None:
        failed = df[df["errno"].fillna(0) != 0]
        if not failed.empty:
            self._errors.append(failed[ERRORS])
            for code, n in failed["errno"].value_counts().items():
                name = errno.errorcode.get(int(code), f"errno {code}")
                self._counts[name] = self._counts.get(name, 0) + int(n)
        unresolved = df[df["outcome"] == "unresolved_exit"]
        if not unresolved.empty:
            self._unresolved.append(unresolved[UNRESOLVED])
            self._counts["unresolved"] = self._counts.get("unresolved", 0) + len(unresolved)

    def panels(self) -> list[Panel]:
        rows = tuple(sorted(self._counts.items()))
        return [Panel("errors", (Table("errors by errno", ("error", "faults"), rows, sort=1),))]

    def finish(self) -> dict[str, pd.DataFrame]:
        errors = pd.concat(self._errors, ignore_index=True) if self._errors else pd.DataFrame(
            columns=ERRORS)
        codes = errors["errno"].astype("Int64")
        errors["errno_name"] = codes.map(lambda e: errno.errorcode.get(e, f"errno {e}"))
        errors["explanation"] = codes.map(lambda e: EXPLAIN.get(e, "the uffd ioctl failed"))
        unresolved = (pd.concat(self._unresolved, ignore_index=True) if self._unresolved
                      else pd.DataFrame(columns=UNRESOLVED))
        return {"errors": errors, "unresolved": unresolved}
