"""Struct offsets from raw BTF (no kernel needed): a blob built here, laid out as uapi/linux/btf.h
says, with the cases vmlinux has: other kinds before the struct, an anonymous union first (as
Linux 6.1's struct file), and bitfield offsets (kind_flag)."""

from __future__ import annotations

import struct

import pytest

from uffdtrace.errors import UserError
from uffdtrace.probes import kernel

INT, PTR, ARRAY, STRUCT, UNION, FUNC_PROTO = 1, 2, 3, 4, 5, 13


class Blob:
    """A BTF blob: header, types, strings."""

    def __init__(self) -> None:
        self.types, self.strings = b"", b"\0"

    def name(self, text: str) -> int:
        if not text:
            return 0
        at = self.strings.find(b"\0" + text.encode() + b"\0")
        if at >= 0:
            return at + 1
        self.strings += text.encode() + b"\0"
        return len(self.strings) - len(text) - 1

    def add(self, kind: int, name: str, items: list[bytes] = (), extra: bytes = b"",
            kind_flag: bool = False) -> None:
        info = kind << 24 | len(items) | kind_flag << 31
        self.types += struct.pack("<III", self.name(name), info, 0) + extra + b"".join(items)

    def member(self, name: str, bits: int) -> bytes:
        return struct.pack("<III", self.name(name), 1, bits)

    def bytes(self) -> bytes:
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types),
                             len(self.strings))
        return header + self.types + self.strings


def vmlinux_like() -> bytes:
    b = Blob()
    b.add(INT, "int", extra=struct.pack("<I", 32))
    b.add(PTR, "")
    b.add(ARRAY, "", extra=struct.pack("<III", 1, 1, 4))
    b.add(FUNC_PROTO, "", [struct.pack("<II", 0, 1)] * 2)
    b.add(UNION, "", [b.member("f_llist", 0)])
    b.add(STRUCT, "file", [b.member("", 0), b.member("f_path", 128), b.member("f_op", 384),
                           b.member("private_data", 1600)])
    b.add(STRUCT, "task_struct", [b.member("__state", 192), b.member("pid", 3 << 24 | 10112)],
          kind_flag=True)
    return b.bytes()


def test_members_after_other_kinds_and_an_anonymous_member():
    assert kernel.btf_struct_members(vmlinux_like(), "file") == {
        "(anon)": 0, "f_path": 16, "f_op": 48, "private_data": 200}


def test_bitfield_offsets_drop_their_size():
    assert kernel.btf_struct_members(vmlinux_like(), "task_struct") == {"__state": 24, "pid": 1264}


def test_a_name_that_is_no_struct():
    assert kernel.btf_struct_members(vmlinux_like(), "f_op") is None
    assert kernel.btf_struct_members(vmlinux_like(), "mm_struct") is None


def test_a_missing_member_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(kernel, "_vmlinux_btf", vmlinux_like)
    assert kernel.struct_member_offsets.__wrapped__("file", ("f_op",)) == {"f_op": 48}
    with pytest.raises(UserError, match=r"struct file has no member\(s\) f_count in BTF"):
        kernel.struct_member_offsets.__wrapped__("file", ("f_count",))
