"""A recording (`uffdtrace record` CSV) against the exerciser's ground truth, fault by fault.

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
