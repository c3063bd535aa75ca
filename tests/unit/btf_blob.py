"""Raw BTF blobs for the unit tests, laid out as uapi/linux/btf.h says."""

from __future__ import annotations

import struct

INT, PTR, ARRAY, STRUCT, UNION, FUNC, FUNC_PROTO = 1, 2, 3, 4, 5, 12, 13


class Blob:
    """A BTF blob: header, types, strings."""

    def __init__(self) -> None:
        self.types, self.strings, self.count = b"", b"\0", 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        at = self.strings.find(b"\0" + text.encode() + b"\0")
        if at >= 0:
            return at + 1
        self.strings += text.encode() + b"\0"
        return len(self.strings) - len(text) - 1

    def add(self, kind: int, name: str, items: list[bytes] = (), extra: bytes = b"",
            kind_flag: bool = False, size_or_type: int = 0) -> int:
        """One type record; its id."""
        info = kind << 24 | len(items) | kind_flag << 31
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra + b"".join(items)
        self.count += 1
        return self.count

    def member(self, name: str, bits: int) -> bytes:
        return struct.pack("<III", self.name(name), 1, bits)

    def bytes(self) -> bytes:
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types),
                             len(self.strings))
        return header + self.types + self.strings


