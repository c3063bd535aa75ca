"""The ground truth of a run, tabulated: the C side's touch, message and ioctl records become
DataFrames through numpy structured views, with no per-fault Python work."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from uffdtrace.exerciser._exerciser import ffi
from uffdtrace.exerciser.config import ExerciseConfig

OPS = ("continue", "copy", "zeropage", "wake")  # index = uffdx_op.op
# index = uffdx_op.role; "repeat": the resolving CONTINUE issued again (continue_twice)
ROLES = ("resolve", "prefetch", "misuse", "eexist-wake", "batch-wake", "repeat")
UFFD_PAGEFAULT_FLAG_WRITE = 1


@dataclass
class ExerciseResult:
    """Ground truth of one run (see the module uffdtrace.exerciser for the columns)."""

    config: ExerciseConfig
    pid: int
    handler_pid: int
    page_size: int
    base: int          # address of page 0 in the registered mapping
    features: int      # UFFDIO_API features the kernel reported
    faults: pd.DataFrame
    ops: pd.DataFrame
    touches: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def _records(ptr: Any, count: int, ctype: str, fields: dict[str, str]) -> np.ndarray:
    """A copy of `count` C structs as a numpy structured array (layout taken from cffi)."""
    dtype = np.dtype({
        "names": list(fields),
        "formats": list(fields.values()),
        "offsets": [ffi.offsetof(ctype, name) for name in fields],
        "itemsize": ffi.sizeof(ctype),
    })
    if count == 0:
        return np.zeros(0, dtype)
    return np.frombuffer(ffi.buffer(ptr, count * ffi.sizeof(ctype)), dtype).copy()


def tabulate(cfg: ExerciseConfig, res: Any) -> ExerciseResult:
    ps = cfg.page_size
    t = _records(res.touches, res.n_touches, "struct uffdx_touch", {
        "tid": "i4", "thread": "i4", "addr": "u8", "page": "i8", "write": "i4",
        "start_ns": "i8", "end_ns": "i8"})
    m = _records(res.msgs, res.n_msgs, "struct uffdx_msg", {
        "ptid": "u4", "addr": "u8", "flags": "u8", "msg_ns": "i8", "handler_tid": "i4"})
    o = _records(res.ops, res.n_ops, "struct uffdx_op", {
        "handler_tid": "i4", "op": "i4", "role": "i4", "start_ns": "i8", "end_ns": "i8",
        "addr": "u8", "len": "u8", "err": "i4", "mapped": "i8"})

    touches = pd.DataFrame({
        "tid": t["tid"].astype(np.int64), "thread": t["thread"].astype(np.int64),
        "addr": t["addr"].astype(np.int64), "page": t["page"], "write": t["write"] != 0,
        "start_ns": t["start_ns"], "end_ns": t["end_ns"],
    })
    messages = pd.DataFrame({
        "ptid": m["ptid"].astype(np.int64), "addr": m["addr"].astype(np.int64),
        "page": ((m["addr"] - res.base) // ps).astype(np.int64),
        "msg_ns": m["msg_ns"], "handler_tid": m["handler_tid"].astype(np.int64),
        "flags": m["flags"].astype(np.int64),
    })
    faults = _attribute(cfg, messages, touches)
    faults["stall_ns"] = faults["end_ns"] - faults["start_ns"]
    faults = faults[["tid", "thread", "addr", "page", "write", "start_ns", "end_ns", "stall_ns",
                     "msg_ns", "handler_tid", "flags", "ptid"]]
    ops = pd.DataFrame({
        "handler_tid": o["handler_tid"].astype(np.int64),
        "op": np.asarray(OPS)[o["op"]], "role": np.asarray(ROLES)[o["role"]],
        "start_ns": o["start_ns"], "end_ns": o["end_ns"],
        "addr": o["addr"].astype(np.int64), "len": o["len"].astype(np.int64),
        "errno": o["err"].astype(np.int64), "mapped": o["mapped"],
    })
    touches = touches.sort_values("start_ns", ignore_index=True)
    faults = faults.sort_values("msg_ns", kind="stable", ignore_index=True)
    ops = ops.sort_values("start_ns", kind="stable", ignore_index=True)

    result = ExerciseResult(
        config=cfg, pid=res.pid, handler_pid=res.handler_pid, page_size=ps, base=res.base,
        features=res.features, faults=faults, ops=ops, touches=touches,
    )
    result.summary = _summary(result, res)
    return result


def _attribute(cfg: ExerciseConfig, messages: pd.DataFrame, touches: pd.DataFrame) -> pd.DataFrame:
    """Each message joined to the touch that made it: by (ptid, page) with thread ids, else by
    page alone, which is exact because validation then allows no page touched by two threads.
    `tid` always comes from the touch; `ptid` is what the message said (0 without thread ids)."""
    columns = ["tid", "page", "thread", "write", "start_ns", "end_ns"]
    if cfg.thread_id:
        return messages.assign(tid=messages["ptid"]).merge(
            touches[columns], on=["tid", "page"], how="left", validate="many_to_one")
    if touches["page"].duplicated().any():
        raise RuntimeError("without thread ids, a page touched by two threads is ambiguous")
    return messages.merge(touches[columns], on="page", how="left", validate="many_to_one")


def _summary(r: ExerciseResult, res: Any) -> dict[str, Any]:
    cfg = r.config
    stall = r.faults["stall_ns"].dropna().to_numpy(dtype=np.int64)
    elapsed = int(r.touches["end_ns"].max() - r.touches["start_ns"].min()) if len(r.touches) else 0
    failed = r.ops[r.ops["errno"] != 0]
    by_errno = {errno.errorcode.get(e, str(e)): int(n)
                for e, n in failed["errno"].value_counts().sort_index().items()}
    misuse = r.ops[r.ops["role"] == "misuse"]["errno"]
    roles = r.ops["role"]

    def pct(q: float) -> int:
        return int(np.percentile(stall, q)) if len(stall) else 0

    return {
        "backing": cfg.backing, "kind": cfg.kind, "policy": cfg.policy, "handler": cfg.handler,
        "pattern": cfg.pattern, "misuse": cfg.misuse,
        "thread_id": cfg.thread_id, "continue_twice": cfg.continue_twice, "reuse_fd": cfg.reuse_fd,
        "pages": cfg.pages, "page_size": r.page_size, "threads": cfg.threads,
        "handler_threads": cfg.handler_threads, "cpus": cfg.cpus,
        "pid": r.pid, "handler_pid": r.handler_pid,
        "touches": len(r.touches), "faults": len(r.faults),
        "p50_ns": pct(50), "p90_ns": pct(90), "p99_ns": pct(99),
        "max_ns": int(stall.max()) if len(stall) else 0,
        "elapsed_ns": elapsed,
        "rate_per_s": round(len(r.faults) * 1e9 / elapsed, 1) if elapsed else 0.0,
        "ioctls": {op: int(n) for op, n in r.ops["op"].value_counts().sort_index().items()},
        "errors": len(failed), "errors_by_errno": by_errno,
        "misuse_errno": int(misuse.mode()[0]) if len(misuse) else None,
        "prefetched": int(((roles == "prefetch") & (r.ops["errno"] == 0)).sum()),
        "eexist_wakes": int((roles == "eexist-wake").sum()),
        "batch_wakes": int((roles == "batch-wake").sum()),
        "repeats": int((roles == "repeat").sum()),
        "repeats_eexist": int(((roles == "repeat") & (r.ops["errno"] == errno.EEXIST)).sum()),
        # reuse_fd: the uffd's fd number reopened on an ordinary file, in process reuse_fd_pid
        "reuse_fd_number": None if res.reuse_fd < 0 else int(res.reuse_fd),
        "reuse_fd_pid": int(res.reuse_pid) or None,
        "reuse_fd_verified": bool(res.reuse_verified), "reuse_fd_moved": bool(res.reuse_moved),
        "reuse_fd_reads": int(res.reuse_reads), "reuse_fd_bytes": int(res.reuse_bytes),
        "reuse_fd_start_ns": int(res.reuse_start_ns) or None,
        "reuse_fd_end_ns": int(res.reuse_end_ns) or None,
        "overflows": int(res.overflows),
        "pages_verified": int(res.pages_verified), "mismatches": int(res.mismatches),
        "first_mismatch": None if res.first_mismatch < 0 else int(res.first_mismatch),
    }
