"""Whole BPF hash maps in one go, as numpy arrays (BPF_MAP_LOOKUP_BATCH / DELETE_BATCH, Linux
5.6+): --mode stats reads thousands of aggregates a second, which BCC's per-key ctypes calls
cannot keep up with while short-lived processes come and go."""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np


def possible_cpus() -> int:
    from bcc.utils import get_possible_cpus  # Debian's python3-bpfcc

    return len(get_possible_cpus())


def lookup_all(table, key_dtype: np.dtype, value_dtype: np.dtype,
               per_cpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every (key, value) of a BCC hash table; a per-CPU map's values have one row per CPU."""
    from bcc.libbcc import lib

    # the kernel lays per-CPU values out at 8-byte strides, one per possible CPU
    cpus = possible_cpus() if per_cpu else 1
    assert value_dtype.itemsize % 8 == 0 or not per_cpu, "per-CPU values must be 8-byte multiples"
    capacity = table.max_entries
    keys = np.zeros(capacity, key_dtype)
    values = np.zeros((capacity, cpus), value_dtype)
    batch, count, total = ctypes.c_uint32(0), ctypes.c_uint32(0), 0
    while total < capacity:
        count.value = capacity - total
        res = lib.bpf_lookup_batch(
            table.map_fd, ctypes.byref(batch) if total else None, ctypes.byref(batch),
            ctypes.c_void_p(keys.ctypes.data + total * key_dtype.itemsize),
            ctypes.c_void_p(values.ctypes.data + total * cpus * value_dtype.itemsize),
            ctypes.byref(count))
        err = ctypes.get_errno()
        total += count.value
        if res != 0:
            if err != errno.ENOENT:  # ENOENT: the end of the map
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            break
        if count.value == 0:
            break
    return keys[:total], values[:total] if per_cpu else values[:total, 0]


def delete_keys(table, keys: np.ndarray) -> None:
    """Delete these keys from a BCC hash table (keys already gone are skipped)."""
    from bcc.libbcc import lib

    keys = np.ascontiguousarray(keys)
    done = 0
    while done < len(keys):
        count = ctypes.c_uint32(len(keys) - done)
        lib.bpf_delete_batch(table.map_fd, ctypes.c_void_p(keys.ctypes.data + done * keys.dtype.itemsize),
                             ctypes.byref(count))
        done += count.value + 1  # the batch stops at a key that is gone: skip it
