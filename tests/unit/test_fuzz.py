"""Fuzzing (issue #16): what reads untrusted bytes must not crash on them.

- `report`'s CSV readers (faults, and `--ioctls`) get any file: they yield DataFrames or raise
  UserError with one line, which the CLI prints; any other exception is a traceback.
- The ring-buffer decoder and the assembler get whatever the ring holds: random headers and
  random or half-plausible records. Garbage may give garbage rows, but nothing may raise, and
  a record of an unknown type is ignored.

Runs without root or a kernel, in the unit tier's budget (all of tests/unit in under 30 s:
2-4 s per test here). The examples are derandomized, so a run is reproducible and a failure
names its minimal input; `UFFDTRACE_FUZZ=N` runs N times as many, from a random seed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.unit.fake_ring import BUSY, DISCARD, FakeRing
from uffdtrace.commands.report import read_faults
from uffdtrace.errors import UserError
from uffdtrace.events import CATEGORIES, FAULT_COLUMNS, IOCTL_COLUMNS
from uffdtrace.pipeline import Assembler, Batch
from uffdtrace.probes import records
from uffdtrace.probes.paths import HookClassifier, paths_frame
from uffdtrace.probes.ringbuf import RingBufferReader

SCALE = int(os.environ.get("UFFDTRACE_FUZZ", "0") or 0)
FUZZ = settings(
    database=None,  # no example database: derandomized runs need none
    deadline=None,  # pandas' first calls are slow; the budget is max_examples
    derandomize=not SCALE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


def examples(n: int) -> settings:
    """n examples (a few seconds each test), or SCALE times as many."""
    return settings(FUZZ, max_examples=n * max(SCALE, 1))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """One file, rewritten by every example (all examples run in one call of the test)."""
    with tempfile.TemporaryDirectory() as d:
        yield Path(d) / "fuzz.csv"


# --- the CSV readers ------------------------------------------------------------------------

CELL_SAMPLES = ["", "0", "-1", "1.5", "1.0", "nan", "NA", "inf", " 1", "+1", "1e3", "0x10",
                str(2**63), str(-(2**63) - 1), "9" * 30, '"', '""', '"a,b"', "a\nb", "\r", "\t",
                "\0", "é", "True", *sorted({v for vs in CATEGORIES.values() for v in vs}),
                "CONTINUE", "nr0x40"]
CELL = st.one_of(
    st.sampled_from(CELL_SAMPLES),
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=6),
)


def rows(columns: dict) -> st.SearchStrategy[str]:
    """Rows of about the right number of cells, and of any number."""
    n = len(columns)
    width = st.one_of(st.just(n), st.integers(0, n + 2))
    return width.flatmap(lambda k: st.lists(CELL, min_size=k, max_size=k)).map(",".join)


def csv_files(columns: dict) -> st.SearchStrategy[bytes]:
    """Random bytes, or the right header followed by random bytes or by random rows."""
    header = ",".join(columns) + "\n"
    body = st.lists(rows(columns), max_size=8).map(lambda rs: "".join(r + "\n" for r in rs))
    line_end = st.sampled_from(["", "\n"])
    texts = st.one_of(
        st.tuples(st.just(header), body, line_end).map("".join),
        st.tuples(st.just(header), st.text(max_size=200)).map("".join),
    ).map(lambda t: t.encode("utf-8", "surrogatepass"))
    return st.one_of(
        st.binary(max_size=300),
        texts,
        st.tuples(st.just(header.encode()), st.binary(max_size=300)).map(b"".join),
    )


def read_or_refuse(path: Path, data: bytes, columns: dict, chunk_rows: int) -> None:
    """Every chunk with the columns' names and dtypes, or a UserError of one line."""
    path.write_bytes(data)
    try:
        chunks = list(read_faults(path, chunk_rows=chunk_rows, columns=columns))
    except UserError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return
    for chunk in chunks:
        assert list(chunk.columns) == list(columns)
        assert [str(t) for t in chunk.dtypes] == [t for t, _ in columns.values()]


FAULT_HEADER = (",".join(FAULT_COLUMNS) + "\n").encode()


@examples(100)
# Found by this test (fixed in report.py): one field too many in the first row (pandas took
# the first as the index, shifting every row, and the error path crashed); a decimal in an
# integer column (TypeError); a header with a lone CR (echoed raw into the message).
@example(data=FAULT_HEADER + b"," * (len(FAULT_COLUMNS) - 1) + b":,\n", chunk_rows=1)
@example(data=FAULT_HEADER + b"1.5" + b"," * (len(FAULT_COLUMNS) - 1) + b"\n", chunk_rows=1)
@example(data=b"\r\xc2\x80", chunk_rows=1)
@given(data=csv_files(FAULT_COLUMNS), chunk_rows=st.integers(1, 4))
def test_the_fault_csv_reader_refuses_garbage_with_one_line(scratch, data, chunk_rows):
    read_or_refuse(scratch, data, FAULT_COLUMNS, chunk_rows)


@examples(100)
@given(data=csv_files(IOCTL_COLUMNS), chunk_rows=st.integers(1, 4))
def test_the_ioctl_csv_reader_refuses_garbage_with_one_line(scratch, data, chunk_rows):
    read_or_refuse(scratch, data, IOCTL_COLUMNS, chunk_rows)


# --- the ring buffer and the assembler ------------------------------------------------------

RECORD = records.RECORD_DTYPE
MMS = [0xFFFF888123456789, 0xFFFF888100000040, 0]
PAGES = [0x7F0000010000, 0x7F0000011000, 0x7F0000200000, 0]
NRS = [records.NR_CONTINUE, records.NR_COPY, records.NR_ZEROPAGE, records.NR_WAKE,
       records.NR_REGISTER, records.NR_API, records.NR_MOVE, 0xFF]
FAULT_FLAGS = [v for k, v in records.CONSTANTS.items() if k.startswith("F_")]
IO_FLAGS = [v for k, v in records.CONSTANTS.items() if k.startswith("IO_")]
UNKNOWN_TYPES = [0, 3, 0x7F, 0xFF]

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
# Instants: mostly close together (so faults and ioctls join), 0 (unknown), or anything.
NEAR = st.integers(0, 20).map(lambda k: 10**9 + k * 10**5)
TIME = st.one_of(NEAR, NEAR, st.just(0), U64)
SMALL_ID = st.sampled_from([0, 1, 2, 3, 20, 21])


def flags_of(bits: list[int]) -> st.SearchStrategy[int]:
    return st.lists(st.sampled_from(bits), max_size=5).map(lambda fs: sum(set(fs)))


def record_bytes(values: dict, member: str) -> bytes:
    one = np.zeros((), records.FAULT_DTYPE if member == "fault" else records.IOCTL_DTYPE)
    for k, v in values.items():
        one[k] = v
    out = np.zeros(1, RECORD)
    out[0][member] = one
    return out.tobytes()


plausible_fault = st.fixed_dictionaries({
    "type": st.just(records.EV_FAULT), "pid": st.sampled_from([10, 20]), "tid": SMALL_ID,
    "flags": st.one_of(flags_of(FAULT_FLAGS), flags_of(FAULT_FLAGS), U32),
    "fault_ns": TIME, "block_ns": TIME, "wake_ns": TIME, "resume_ns": TIME, "msg_ns": TIME,
    "waker_ioctl_ns": TIME,
    "return_ns": TIME, "waker_pid": SMALL_ID, "waker_tid": SMALL_ID,
    "waker_nr": st.sampled_from(NRS), "addr": st.one_of(st.sampled_from(PAGES), U64),
    "mm": st.one_of(st.sampled_from(MMS), U64), "msg_flags": st.one_of(st.integers(0, 7), U64),
    "reason": U64, "error_code": U64, "gen": U32,
    "comm": st.one_of(st.sampled_from([b"CPU 1/KVM", b"vcpu", b"", b"\xff\xfe"]),
                      st.binary(max_size=16)),
}).map(lambda v: record_bytes(v, "fault"))

plausible_ioctl = st.fixed_dictionaries({
    "type": st.just(records.EV_IOCTL), "pid": st.sampled_from([10, 20]), "tid": SMALL_ID,
    "nr": st.one_of(st.sampled_from(NRS), st.integers(0, 255)),
    "flags": st.one_of(flags_of(IO_FLAGS), U32), "woken": st.integers(0, 2**16 - 1),
    "enter_ns": TIME, "exit_ns": TIME, "mfill_ns": U64, "install_ns": U64,
    "start": st.one_of(st.sampled_from(PAGES), U64),
    "len": st.one_of(st.sampled_from([4096, 2 << 20, 0]), U64), "mode": U64,
    "ret": st.one_of(st.sampled_from([0, -17, -14, -22]), st.integers(-(2**63), 2**63 - 1)),
    "mapped": st.one_of(st.sampled_from([0, 4096, -17]), st.integers(-(2**63), 2**63 - 1)),
    "mm": st.one_of(st.sampled_from(MMS), U64), "comm": st.binary(max_size=16),
}).map(lambda v: record_bytes(v, "ioctl"))


def retyped(payload: bytes, type_: int) -> bytes:
    return bytes([type_]) + payload[1:]


garbage = st.tuples(st.binary(min_size=RECORD.itemsize, max_size=RECORD.itemsize),
                    st.sampled_from([records.EV_FAULT, records.EV_IOCTL, *UNKNOWN_TYPES])
                    ).map(lambda t: retyped(*t))
unknown = st.tuples(st.one_of(plausible_fault, plausible_ioctl, garbage),
                    st.sampled_from(UNKNOWN_TYPES)).map(lambda t: retyped(*t))
payloads = st.one_of(plausible_fault, plausible_ioctl, garbage, unknown)
# The header word: BUSY (reserved, submitted later or never), DISCARD, any length bits.
headers = st.tuples(st.sampled_from([0, 0, 0, DISCARD, BUSY, BUSY | DISCARD]),
                    st.one_of(st.just(RECORD.itemsize), st.integers(0, 2**30 - 1))
                    ).map(lambda t: t[0] | t[1])


def fake_paths(f: np.ndarray) -> pd.DataFrame:
    """Some faults shmem minor, some hugetlb missing, some unknown (as a backend may say)."""
    pick = f["tid"] % 3
    backing = np.select([pick == 0, pick == 1], np.array(["shmem", "hugetlb"], dtype=object), None)
    kind = np.select([pick == 0, pick == 1], np.array(["minor", "missing"], dtype=object), None)
    return paths_frame(backing, kind)


# How an Assembler is made: classifier, ioctls seen, vCPUs (built in the test, fresh for every
# run of an example).
assembler_args = st.tuples(
    st.sampled_from([fake_paths, HookClassifier({5: "minor", 1: "missing"}, True),
                     HookClassifier({}, False)]),
    st.booleans(),
    st.sampled_from([{}, {1: 0, 2: 7}]),
)
# What becomes of the records still reserved before a drain: nothing yet, or submitted (kept or
# discarded), as the kernel does with a reservation.
commits = st.sampled_from(["none", "submit", "discard"])

# The smallest crash this test found (Assembler._find_resolvers: int(<NA>)): a successful
# CONTINUE and a fault that never slept (no flags: outcome no_wait) whose fault_ns is 0.
CRASH_NO_WAIT_AT_0 = [([(RECORD.itemsize, record_bytes({"type": records.EV_IOCTL,
                                                          "nr": records.NR_CONTINUE}, "ioctl")),
                        (RECORD.itemsize, record_bytes({"type": records.EV_FAULT}, "fault"))],
                       "none")]


def expected(ring: list[tuple[int, bytes]]) -> tuple[list[bytes], int]:
    """What a drain must return of the unread records (header, payload), oldest first: the
    submitted ones that are not discarded, up to the first still reserved; and how many it
    consumes."""
    out, taken = [], 0
    for header, payload in ring:
        if header & BUSY:
            break
        taken += 1
        if not header & DISCARD:
            out.append(payload)
    return out, taken


def collect(batches: list[Batch]) -> tuple[pd.DataFrame, pd.DataFrame]:
    faults = pd.concat([b.faults for b in batches], ignore_index=True)
    ioctls = pd.concat([b.ioctls for b in batches], ignore_index=True)
    return faults, ioctls


@examples(25)
@example(size=4096, start=0, rounds=CRASH_NO_WAIT_AT_0, args=(fake_paths, True, {}))
@given(size=st.sampled_from([4096, 8192]), start=st.integers(0, 200),
       rounds=st.lists(st.tuples(st.lists(st.tuples(headers, payloads), max_size=12), commits),
                       min_size=1, max_size=4),
       args=assembler_args)
def test_the_decoder_and_assembler_survive_any_ring(size, start, rounds, args):
    """Round by round: records go into the ring (as long as it has room, as in the kernel),
    reserved ones may be submitted, then one drain. The drain returns exactly the submitted,
    undiscarded records up to the first still reserved; the assembler takes every drain and
    then finishes without an exception; and when records of unknown type were in the ring, an
    assembler fed the same drains without them gives the same rows."""
    ring = FakeRing(size, RECORD.itemsize, start=start * (8 + ((RECORD.itemsize + 7) & ~7)))
    reader = RingBufferReader(ring.fd, size, RECORD)
    asm = Assembler(*args[:2], vcpus=args[2])
    known = [records.EV_FAULT, records.EV_IOCTL]
    twin = Assembler(*args[:2], vcpus=args[2]) if any(
        payload[0] not in known for puts, _ in rounds for _, payload in puts) else None
    unread: list[list] = []  # [position, header, payload] of the records not consumed yet
    got: list[Batch] = []
    without_unknown: list[Batch] = []
    try:
        for puts, commit in rounds:
            for header, payload in puts:
                if ring.room():
                    unread.append([ring.put_raw(header, payload), header, payload])
            for rec in unread:
                if rec[1] & BUSY and commit != "none":
                    rec[1] = rec[1] & ~BUSY | (DISCARD if commit == "discard" else 0)
                    ring.set_header(rec[0], rec[1])
            want, taken = expected([(h, p) for _, h, p in unread])
            raw = reader.drain()
            assert [r.tobytes() for r in raw] == want
            del unread[:taken]
            assert ring.consumer() == (unread[0][0] if unread else ring.prod)
            got.append(asm.feed(raw))
            if twin:
                without_unknown.append(twin.feed(raw[np.isin(raw["type"], known)]))
        got.append(asm.finish())
        if twin:
            without_unknown.append(twin.finish())
    finally:
        reader.close()
        ring.close()
    faults, ioctls = collect(got)
    assert list(faults.columns) == list(FAULT_COLUMNS)
    assert list(ioctls.columns) == list(IOCTL_COLUMNS)
    if twin:
        twin_faults, twin_ioctls = collect(without_unknown)
        pd.testing.assert_frame_equal(faults, twin_faults)
        pd.testing.assert_frame_equal(ioctls, twin_ioctls)


@examples(15)
@given(batches=st.lists(st.lists(unknown, max_size=10), max_size=4), args=assembler_args)
def test_records_of_unknown_type_give_no_rows(batches, args):
    asm = Assembler(*args[:2], vcpus=args[2])
    out = [asm.feed(np.frombuffer(b"".join(b), dtype=RECORD)) for b in batches]
    faults, ioctls = collect([*out, asm.finish()])
    assert faults.empty and ioctls.empty
