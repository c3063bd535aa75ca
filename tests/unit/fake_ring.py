"""A BPF ring buffer without a kernel, for the ring-buffer decoder's tests (test_records.py,
test_fuzz.py): a memfd laid out as BPF_MAP_TYPE_RINGBUF's mmap."""

from __future__ import annotations

import mmap
import os
import struct

BUSY, DISCARD, HEADER = 1 << 31, 1 << 30, 8


class FakeRing:
    """A memfd laid out as BPF_MAP_TYPE_RINGBUF's mmap: consumer page, producer page, then the
    data area twice (the kernel maps it twice, back to back). `start` is where both positions
    begin (the kernel's move on from 0 by one stride per record, so any multiple of it)."""

    def __init__(self, size: int, record_size: int, start: int = 0) -> None:
        self.page, self.size = mmap.PAGESIZE, size
        self.stride = HEADER + ((record_size + 7) & ~7)
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * self.page + 2 * size)
        self.prod = start
        os.pwrite(self.fd, struct.pack("<Q", start), 0)
        os.pwrite(self.fd, struct.pack("<Q", start), self.page)

    def put(self, payload: bytes, hdr_flags: int = 0) -> int:
        """Submit one record (BUSY: reserved, not submitted yet); returns its position."""
        return self.put_raw(len(payload) | hdr_flags, payload)

    def put_raw(self, header: int, payload: bytes) -> int:
        """One record with any 32-bit header word (length and the BUSY/DISCARD bits)."""
        pos = self.prod
        rec = struct.pack("<II", header, 0) + payload.ljust(self.stride - HEADER, b"\0")
        self._write(pos, rec)
        self.prod += self.stride
        os.pwrite(self.fd, struct.pack("<Q", self.prod), self.page)
        return pos

    def set_header(self, pos: int, header: int) -> None:
        """Rewrite the header of the record at `pos`: a reserved record submitted later."""
        self._write(pos, struct.pack("<I", header))

    def _write(self, pos: int, data: bytes) -> None:
        offset = pos % self.size
        for copy in (0, self.size):  # both views of the data area
            os.pwrite(self.fd, data, 2 * self.page + copy + offset)

    def consumer(self) -> int:
        return struct.unpack("<Q", os.pread(self.fd, 8, 0))[0]

    def room(self) -> bool:
        """One more record fits: the kernel never overwrites what the consumer has not read."""
        return self.prod + self.stride - self.consumer() <= self.size

    def close(self) -> None:
        os.close(self.fd)
