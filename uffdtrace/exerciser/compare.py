"""A recording (`uffdtrace record` CSVs) against the exerciser's ground truth, fault by fault
and ioctl by ioctl.

The exerciser times each first touch in user space, [start_ns, end_ns]; the tracer sees the
fault from the kernel, [fault_ns, fault_ns + stall_ns]. Both clocks are CLOCK_MONOTONIC, so
the kernel's interval must lie inside the touch. What separates them is the exception entry
(`entry_ns`: touch start to the fault tracepoint) and exit (`exit_ns`: return to user mode,
the retried access, the end timestamp), which no tracepoint sees.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ABS_TOLERANCE_NS = 2000
REL_TOLERANCE = 0.05


def match_faults(recorded: pd.DataFrame, truth: pd.DataFrame, page_size: int) -> pd.DataFrame:
    """One row per ground-truth fault that the tracer saw resolved (it waited for a handler),
    matched by tid and page: the path the tracer saw (resolving thread and ioctl, whether the
    thread slept), the touch, the stall, the windows around it, and the error relative to the
    tolerance (5 % of the touch or 2 µs, whichever is larger; <= 1 is within)."""
    pages = recorded.assign(page_addr=recorded["addr"] // page_size * page_size)
    joined = truth.merge(pages, left_on=["tid", "addr"], right_on=["tid", "page_addr"],
                         suffixes=("_gt", ""), validate="one_to_one")
    if len(joined) != len(truth):
        raise ValueError(f"{len(truth) - len(joined)} of {len(truth)} ground-truth faults "
                         "have no record with the same tid and page")
    joined = joined[joined["outcome"] == "resolved"]
    touch = joined["stall_ns_gt"].to_numpy(dtype=np.int64)
    stall = joined["stall_ns"].to_numpy(dtype=np.int64)
    fault = joined["fault_ns"].to_numpy(dtype=np.int64)
    return pd.DataFrame({
        "tid": joined["tid"].to_numpy(),
        "addr": joined["addr_gt"].to_numpy(),
        "handler_tid": joined["handler_tid"].to_numpy(),
        "resolver": joined["resolver"].to_numpy(),
        "slept": joined["block_ns"].notna().to_numpy(),
        "touch_ns": touch,
        "stall_ns": stall,
        "entry_ns": fault - joined["start_ns"].to_numpy(dtype=np.int64),
        "exit_ns": joined["end_ns"].to_numpy(dtype=np.int64) - (fault + stall),
        "error": np.abs(touch - stall) / np.maximum(REL_TOLERANCE * touch, ABS_TOLERANCE_NS),
    })


RESOLVING = ("CONTINUE", "COPY", "ZEROPAGE", "WAKE")


def misattributed(recorded: pd.DataFrame, ops: pd.DataFrame) -> pd.DataFrame:
    """Fault rows whose resolver is not what the exerciser did: the call of the same thread
    under way at cont_enter_ns (a thread makes one call at a time) must be the same command,
    cover the fault's address and have succeeded. Rows without a resolver are wrong too."""
    f = recorded[recorded["resolver"].notna()].astype({"handler_tid": "int64", "cont_enter_ns": "int64"})
    calls = ops.assign(op=ops["op"].str.upper()).sort_values("start_ns")
    joined = pd.merge_asof(f.sort_values("cont_enter_ns"), calls, left_on="cont_enter_ns",
                           right_on="start_ns", by="handler_tid", suffixes=("", "_op"))
    right = ((joined["cont_enter_ns"] <= joined["end_ns"]) & (joined["op"] == joined["resolver"])
             & (joined["addr_op"] <= joined["addr"]) & (joined["addr"] < joined["addr_op"] + joined["len"])
             & (joined["errno_op"] == 0))
    return pd.concat([recorded[recorded["resolver"].isna()], joined.loc[~right, recorded.columns]])


def unrecorded_ioctls(ioctls: pd.DataFrame, ops: pd.DataFrame) -> pd.DataFrame:
    """The exerciser's ioctls with no row in a `record --ioctls` CSV of the same thread,
    command, start and errno, entered and left inside the exerciser's timestamps around the
    call; and extra resolving-ioctl rows beyond the exerciser's count."""
    calls = ops.assign(ioctl=ops["op"].str.upper(), call=range(len(ops)))
    joined = calls.merge(ioctls, left_on=["handler_tid", "ioctl", "addr", "errno"],
                         right_on=["tid", "ioctl", "start", "errno"], suffixes=("", "_rec"))
    inside = (joined["start_ns"] <= joined["enter_ns"]) & (joined["exit_ns"] <= joined["end_ns"])
    missing = calls[~calls["call"].isin(joined.loc[inside, "call"])]
    extra = len(ioctls[ioctls["ioctl"].isin(RESOLVING)]) - len(calls)
    if extra > 0:
        missing = pd.concat([missing, ioctls[ioctls["ioctl"].isin(RESOLVING)].tail(extra)])
    return missing
