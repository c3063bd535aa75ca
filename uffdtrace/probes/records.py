"""The records our BPF programs send, as numpy dtypes, and their constants: all parsed from
bpf/records.h, the one contract between the BPF programs and Python (nothing here mirrors it).

The header is plain C of a restricted kind: `#define NAME integer`, `enum { NAME = integer }`
and structs of fixed-size integer fields and char arrays. numpy's aligned layout is C's for
such structs (tests/unit/test_records.py compiles the header to check).
"""

from __future__ import annotations

import re
from importlib import resources

import numpy as np

_C_TYPES = {"u8": "u1", "u16": "<u2", "u32": "<u4", "u64": "<u8",
            "s8": "i1", "s16": "<i2", "s32": "<i4", "s64": "<i8"}
_DEFINE = re.compile(r"^#define\s+(\w+)\s+(0x[0-9A-Fa-f]+|\d+)\s*$", re.M)
_ENUM = re.compile(r"\benum\s+\w+\s*\{([^}]*)\}", re.S)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{([^}]*)\}\s*;", re.S)
_FIELD = re.compile(r"^(\w+)\s+(\w+)(?:\[(\w+)\])?$")


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def parse_constants(text: str) -> dict[str, int]:
    """Integer #defines and enum members."""
    text = _strip_comments(text)
    constants = {name: int(value, 0) for name, value in _DEFINE.findall(text)}
    for body in _ENUM.findall(text):
        for member in filter(None, (m.strip() for m in body.split(","))):
            name, _, value = (part.strip() for part in member.partition("="))
            constants[name] = int(value, 0)
    return constants


def parse_structs(text: str) -> dict[str, np.dtype]:
    """Each struct as an aligned numpy dtype (char[N] -> bytes of N; N a number or a
    constant of the same text)."""
    constants = parse_constants(text)
    structs = {}
    for name, body in _STRUCT.findall(_strip_comments(text)):
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = _FIELD.match(" ".join(decl.split()))
            if not m:
                raise ValueError(f"struct {name}: cannot read field {decl!r}")
            ctype, field, count = m.groups()
            count = count and str(constants.get(count, count))
            if ctype == "char":
                fields.append((field, f"S{count or 1}"))
            elif ctype in _C_TYPES:
                fields.append((field, _C_TYPES[ctype], (int(count),)) if count
                              else (field, _C_TYPES[ctype]))
            else:
                raise ValueError(f"struct {name}: unknown type {ctype!r}")
        structs[name] = np.dtype(fields, align=True)
    return structs


HEADER = resources.files("uffdtrace.bpf").joinpath("records.h").read_text()
CONSTANTS = parse_constants(HEADER)
STRUCTS = parse_structs(HEADER)
FAULT_DTYPE = STRUCTS["fault_record"]
IOCTL_DTYPE = STRUCTS["ioctl_record"]


def _union(**members: np.dtype) -> np.dtype:
    """`union record`: each record type's fields under its name, and the fields every record
    has at the same offset (type, flags, pid, tid) at the top level."""
    first, *others = members.values()
    common = [n for n in first.names if all(
        n in o.names and o.fields[n][:2] == first.fields[n][:2] for o in others)]
    names = [*common, *members]
    return np.dtype({
        "names": names,
        "formats": [first.fields[n][0] for n in common] + list(members.values()),
        "offsets": [first.fields[n][1] for n in common] + [0] * len(members),
        "itemsize": max(d.itemsize for d in members.values()),
    })


RECORD_DTYPE = _union(fault=FAULT_DTYPE, ioctl=IOCTL_DTYPE)
# --mode stats: the aggregates' keys and per-CPU values
FAULT_STATS_KEY, FAULT_STATS = STRUCTS["fault_stats_key"], STRUCTS["fault_stats"]
IOCTL_STATS_KEY, IOCTL_STATS = STRUCTS["ioctl_stats_key"], STRUCTS["ioctl_stats"]
STATS_BUCKETS = CONSTANTS["STATS_BUCKETS"]
STATS_KINDS = {CONSTANTS[k]: k.removeprefix("KIND_").lower() for k in
               ("KIND_MISSING", "KIND_WP", "KIND_MINOR")}
assert {"type", "flags", "pid", "tid"} <= set(RECORD_DTYPE.names), "records.h: common header"


def records_of(rows: np.ndarray) -> np.ndarray:
    """Rows of one record type (FAULT_DTYPE or IOCTL_DTYPE) as ring-buffer records."""
    out = np.zeros(len(rows), RECORD_DTYPE)
    out["fault" if rows.dtype == FAULT_DTYPE else "ioctl"] = rows
    return out


EV_FAULT, EV_IOCTL = CONSTANTS["EV_FAULT"], CONSTANTS["EV_IOCTL"]
ROLE_TARGET, ROLE_HANDLER, ROLE_DISCOVERED, ROLE_PENDING_HANDLER = (
    CONSTANTS[f"ROLE_{r}"] for r in ("TARGET", "HANDLER", "DISCOVERED", "PENDING_HANDLER"))

# fault_record.flags
F_NOTIFIED = CONSTANTS["F_NOTIFIED"]
F_BLOCKED = CONSTANTS["F_BLOCKED"]
F_WOKEN = CONSTANTS["F_WOKEN"]
F_WOKEN_ON_CPU = CONSTANTS["F_WOKEN_ON_CPU"]
F_EXITED = CONSTANTS["F_EXITED"]
F_MSG = CONSTANTS["F_MSG"]
F_SLEPT = CONSTANTS["F_SLEPT"]
F_OTHER_SLEEP = CONSTANTS["F_OTHER_SLEEP"]
F_RESUMED = CONSTANTS["F_RESUMED"]
F_OFF_AGAIN = CONSTANTS["F_OFF_AGAIN"]
F_UFFD = CONSTANTS["F_UFFD"]
F_HUGETLB = CONSTANTS["F_HUGETLB"]
F_SHMEM = CONSTANTS["F_SHMEM"]
F_ACTIVE = CONSTANTS["F_ACTIVE"]
F_BLOCKED_AT_END = CONSTANTS["F_BLOCKED_AT_END"]
F_RELEASED = CONSTANTS["F_RELEASED"]
F_SIGNALLED = CONSTANTS["F_SIGNALLED"]

# ioctl_record.flags
IO_MFILL = CONSTANTS["IO_MFILL"]
IO_HUGETLB = CONSTANTS["IO_HUGETLB"]
IO_SHMEM = CONSTANTS["IO_SHMEM"]
IO_PTE = CONSTANTS["IO_PTE"]

# The summary's names of the per-CPU `lost` counters, in index order.
_LOST_NAMES = {"LOST_RINGBUF": "ringbuf_full", "LOST_INFLIGHT_FULL": "inflight_map_full",
               "LOST_IOCTL_FULL": "ioctl_map_full", "LOST_STATS_FULL": "stats_map_full"}
LOST_REASONS = tuple(name for _, name in sorted((CONSTANTS[c], name) for c, name in _LOST_NAMES.items()))
assert len(LOST_REASONS) == CONSTANTS["LOST_REASONS"], "records.h: a lost reason without a name"

UFFDIO_NAMES = {v: k.removeprefix("UFFDIO_NR_") for k, v in CONSTANTS.items()
                if k.startswith("UFFDIO_NR_")}
NR_REGISTER, NR_WAKE, NR_COPY, NR_ZEROPAGE, NR_MOVE, NR_CONTINUE, NR_POISON, NR_API = (
    CONSTANTS[f"UFFDIO_NR_{n}"] for n in
    ("REGISTER", "WAKE", "COPY", "ZEROPAGE", "MOVE", "CONTINUE", "POISON", "API"))

UFFD_EVENTS = {v: k.removeprefix("UFFD_EVENT_").lower() for k, v in CONSTANTS.items()
               if k.startswith("UFFD_EVENT_")}
UFFD_PAGEFAULT_FLAG_WRITE = CONSTANTS["UFFD_PAGEFAULT_FLAG_WRITE"]
UFFD_PAGEFAULT_FLAG_WP = CONSTANTS["UFFD_PAGEFAULT_FLAG_WP"]
UFFD_PAGEFAULT_FLAG_MINOR = CONSTANTS["UFFD_PAGEFAULT_FLAG_MINOR"]
