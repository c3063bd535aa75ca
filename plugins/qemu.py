"""QEMU post-copy blocktime per vCPU, in two definitions side by side.

- stall: what the vCPU lived through, from its fault to its return to the guest
  ([fault_ns, fault_ns + stall_ns)): uffdtrace's definition.
- qemu: QEMU's postcopy-blocktime, from the moment QEMU's fault thread read the fault message
  to the return of the ioctl that placed the page ([msg_ns, cont_exit_ns): full mode). This is
  what `query-migrate` reports as postcopy-vcpu-blocktime and postcopy-blocktime (QEMU counts
  a vCPU's time only for faults whose message it read itself: a fault resolved by the
  background stream before QEMU read its request has none).

Rows of threads that are not vCPUs (the `vcpu` column is empty) are ignored.

Tables:
  vcpus      pid, vcpu, tid, faults, requests (faults with a message read), stall_ns,
             qemu_ns (per-vCPU sums; overlapping faults of one vCPU counted once)
  processes  pid, vcpus, faults, all_blocked_ns, all_blocked_qemu_ns: the time during which
             every vCPU seen faulting in the run was blocked at once, in each definition

Over several recordings (`report A B`) both tables start with their `source`, and a vCPU is a
(source, pid, vcpu): two hosts' QEMUs with the same pid stay apart.

Panel (live viewers): vCPUs with their faults and blocked time in both definitions, shown once
a vCPU has faulted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from uffdtrace.aggregate import all_blocked_ns, merge_intervals
from uffdtrace.events import SOURCE
from uffdtrace.plugins import Panel, Plugin, RunContext, Table

COLUMNS = ("pid", "tid", "vcpu", "fault_ns", "stall_ns", "msg_ns", "cont_exit_ns")
VCPU_COLUMNS = ["pid", "vcpu", "tid", "faults", "requests", "stall_ns", "qemu_ns"]
PROCESS_COLUMNS = ["pid", "vcpus", "faults", "all_blocked_ns", "all_blocked_qemu_ns"]


class QemuPlugin(Plugin):
    name = "qemu"
    description = "QEMU post-copy blocktime per vCPU: the true stall and QEMU's definition"
    columns = COLUMNS

    def start(self, ctx: RunContext) -> None:
        self.keep = ctx.tables
        self._parts: list[pd.DataFrame] = []
        self._sourced = False
        self.reset()

    def reset(self) -> None:
        self._live = pd.DataFrame(columns=VCPU_COLUMNS)

    def batch(self, df: pd.DataFrame) -> None:
        self._sourced |= SOURCE in df
        vcpus = (df["vcpu"].notna() & df["pid"].notna()).to_numpy(bool)
        if not vcpus.any():  # no vCPU thread: the common case outside QEMU, kept cheap
            return
        df = df[vcpus]
        if self.keep:
            self._parts.append(df)
        counted = pd.DataFrame({  # one row per fault, in the columns of the sums kept
            "pid": df["pid"], "vcpu": df["vcpu"], "tid": df["tid"], "faults": 1,
            "requests": df["msg_ns"].notna().astype(np.int64), "stall_ns": df["stall_ns"],
            "qemu_ns": (df["cont_exit_ns"] - df["msg_ns"]).astype("Float64")})
        self._live = _sum_per_vcpu(pd.concat([self._live, counted], ignore_index=True))

    def panels(self) -> list[Panel]:
        if self._live.empty:
            return []
        rows = tuple((int(r.pid), int(r.vcpu), int(r.faults), int(r.stall_ns) // 1000,
                      int(r.qemu_ns) // 1000) for r in self._live.itertuples())
        return [Panel("vcpus", (Table("vCPUs: blocked time", (
            "pid", "vcpu", "faults", "stall_us", "qemu_us"), rows, sort=1),))]

    def finish(self) -> dict[str, pd.DataFrame]:
        if not self._parts:
            key = [SOURCE] if self._sourced else []
            return {"vcpus": pd.DataFrame(columns=key + VCPU_COLUMNS),
                    "processes": pd.DataFrame(columns=key + PROCESS_COLUMNS)}
        df = pd.concat(self._parts, ignore_index=True)
        process = [SOURCE, "pid"] if SOURCE in df else ["pid"]
        by_vcpu = df.groupby([*process, "vcpu"])
        vcpu = by_vcpu.ngroup().to_numpy(np.int64)  # each row's vCPU: its row in `vcpus`
        vcpus = by_vcpu.agg(tid=("tid", "last"), faults=("tid", "size"),
                            requests=("msg_ns", "count")).reset_index()
        stall = _intervals(df, vcpu, "fault_ns", None)
        qemu = _intervals(df, vcpu, "msg_ns", "cont_exit_ns")
        vcpus["stall_ns"] = _covered(len(vcpus), stall)
        vcpus["qemu_ns"] = _covered(len(vcpus), qemu)
        by_process = vcpus.groupby(process)
        owner = by_process.ngroup().to_numpy(np.int64)  # each vCPU's process: its row in `procs`
        procs = by_process.agg(vcpus=("vcpu", "size"), faults=("faults", "sum")).reset_index()
        procs["all_blocked_ns"] = _all_blocked(procs["vcpus"].to_numpy(), owner, stall)
        procs["all_blocked_qemu_ns"] = _all_blocked(procs["vcpus"].to_numpy(), owner, qemu)
        key = process[:-1]
        return {"vcpus": vcpus[key + VCPU_COLUMNS].astype({"tid": "Int64"}),
                "processes": procs[key + PROCESS_COLUMNS]}


Intervals = tuple[np.ndarray, np.ndarray, np.ndarray]  # vCPU (its row in `vcpus`), start, end


def _intervals(df: pd.DataFrame, vcpu: np.ndarray, begin: str, end: str | None) -> Intervals:
    """Each vCPU's blocked intervals, merged: [begin, end) (end None: begin + stall_ns)."""
    stop = df["stall_ns"] + df[begin] if end is None else df[end]
    ok = (df[begin].notna() & stop.notna()).to_numpy(bool)
    start, finish = df[begin].to_numpy(np.int64, na_value=0)[ok], stop.to_numpy(np.int64, na_value=0)[ok]
    # merge_intervals merges per (pid, thread): here per vCPU
    return merge_intervals(vcpu[ok], np.zeros(ok.sum(), dtype=np.int64), start, finish)


def _covered(vcpus: int, intervals: Intervals) -> np.ndarray:
    vcpu, start, end = intervals
    spans = np.zeros(vcpus, dtype=np.int64)
    np.add.at(spans, vcpu, end - start)
    return spans


def _all_blocked(vcpus: np.ndarray, owner: np.ndarray, intervals: Intervals) -> list[int]:
    """Per process (`vcpus` of it; `owner`: each vCPU's process), the time all its vCPUs were
    blocked at once."""
    vcpu, start, end = intervals
    process = owner[vcpu]
    order = np.argsort(process, kind="stable")
    process, start, end = process[order], start[order], end[order]
    lo = np.searchsorted(process, np.arange(len(vcpus)), side="left")
    hi = np.searchsorted(process, np.arange(len(vcpus)), side="right")
    return [all_blocked_ns(start[a:b], end[a:b], int(n)) for a, b, n in zip(lo, hi, vcpus, strict=True)]


def _sum_per_vcpu(df: pd.DataFrame) -> pd.DataFrame:
    """Sums per vCPU (live: overlapping faults of a vCPU are summed, not merged)."""
    return (df.groupby(["pid", "vcpu"])
            .agg(tid=("tid", "last"), faults=("faults", "sum"), requests=("requests", "sum"),
                 stall_ns=("stall_ns", "sum"), qemu_ns=("qemu_ns", "sum"))
            .reset_index()[VCPU_COLUMNS])
