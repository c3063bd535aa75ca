"""The BPF <-> Python record contract (bpf/records.h) and the ring-buffer decoder, without a
kernel: the header is compiled with the system's C compiler to check the parsed layout, and
the decoder reads a ring laid out in a memfd as the kernel lays out a BPF ring buffer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.unit.fake_ring import BUSY, DISCARD, FakeRing
from uffdtrace.probes import records
from uffdtrace.probes.ringbuf import RingBufferReader

TYPEDEFS = "\n".join(f"typedef __{s}int{n}_t {p}{n};" for s, p in (("u", "u"), ("", "s"))
                     for n in (8, 16, 32, 64)).replace("__int", "int").replace("__uint", "uint")


def c_layout(tmp_path: Path, structs: dict[str, list[str]]) -> dict[str, int]:
    """sizeof and offsetof of each field, as the C compiler lays records.h out."""
    lines = [f'printf("{s}.{f} %zu\\n", offsetof(struct {s}, {f}));' for s, fs in structs.items()
             for f in fs]
    lines += [f'printf("{s} %zu\\n", sizeof(struct {s}));' for s in structs]
    lines.append('printf("union %zu\\n", sizeof(union record));')
    src = tmp_path / "layout.c"
    src.write_text("#include <stdint.h>\n#include <stddef.h>\n#include <stdio.h>\n"
                   f"{TYPEDEFS}\n{records.HEADER}\nint main(void) {{\n" + "\n".join(lines) + "\n}\n")
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_parsed_layout_is_the_compilers(tmp_path):
    dtypes = {"fault_record": records.FAULT_DTYPE, "ioctl_record": records.IOCTL_DTYPE}
    layout = c_layout(tmp_path, {s: list(d.names) for s, d in dtypes.items()})
    for name, dtype in dtypes.items():
        assert layout[name] == dtype.itemsize, name
        for field in dtype.names:
            assert layout[f"{name}.{field}"] == dtype.fields[field][1], f"{name}.{field}"
    assert layout["union"] == records.RECORD_DTYPE.itemsize


def test_records_share_their_header():
    for field in ("type", "flags", "pid", "tid"):
        assert records.FAULT_DTYPE.fields[field][:2] == records.IOCTL_DTYPE.fields[field][:2]
        assert records.RECORD_DTYPE.fields[field][1] == records.FAULT_DTYPE.fields[field][1]


def test_constants_come_from_the_header():
    assert records.UFFDIO_NAMES[0x07] == "CONTINUE"
    assert records.UFFD_EVENTS[0x12] == "pagefault"
    flags = [v for k, v in records.CONSTANTS.items() if k.startswith("F_")]
    assert len(flags) == len(set(flags)) and all(f & (f - 1) == 0 for f in flags)


def test_parser_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="unknown type"):
        records.parse_structs("struct x { float f; };")
    with pytest.raises(ValueError, match="cannot read"):
        records.parse_structs("struct x { u32 a : 3; };")
    assert records.parse_constants("#define A 0x10 // c\nenum e { B = 2, C = 3 };") == {
        "A": 16, "B": 2, "C": 3}


def fault_bytes(tid: int) -> bytes:
    rec = np.zeros(1, records.FAULT_DTYPE)
    rec["type"], rec["pid"], rec["tid"], rec["fault_ns"] = records.EV_FAULT, 7, tid, 1000 + tid
    return rec.tobytes()


def test_ring_decoding_stops_at_a_busy_record_and_skips_discarded_ones():
    size = 4 * 4096
    ring = FakeRing(size, records.RECORD_DTYPE.itemsize)
    reader = RingBufferReader(ring.fd, size, records.RECORD_DTYPE)
    ring.put(fault_bytes(1))
    ring.put(fault_bytes(2), DISCARD)
    ring.put(fault_bytes(3))
    ring.put(fault_bytes(4), BUSY)  # reserved, not submitted yet
    ring.put(fault_bytes(5))
    out = reader.drain()
    assert out["tid"].tolist() == [1, 3]
    assert out["fault"]["fault_ns"].tolist() == [1001, 1003]
    assert ring.consumer() == 3 * ring.stride  # up to the busy record, which is read next time
    reader.close()


def test_ring_decoding_across_the_wrap():
    size = 4096
    ring = FakeRing(size, records.RECORD_DTYPE.itemsize)
    reader = RingBufferReader(ring.fd, size, records.RECORD_DTYPE)
    tids = []
    for round_ in range(3):  # ~25 records of 160 bytes per 4 KiB: the third round wraps
        batch = range(round_ * 10, round_ * 10 + 10)
        for tid in batch:
            ring.put(fault_bytes(tid))
        tids += reader.drain()["tid"].tolist()
    assert tids == list(range(30))
    reader.close()
