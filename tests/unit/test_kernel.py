"""Struct offsets from raw BTF (no kernel needed): a blob built here, laid out as uapi/linux/btf.h
says, with the cases vmlinux has: other kinds before the struct, an anonymous union first (as
Linux 6.1's struct file), and bitfield offsets (kind_flag)."""

from __future__ import annotations

import struct

import pytest

from tests.unit.btf_blob import ARRAY, FUNC_PROTO, INT, PTR, STRUCT, UNION, Blob
from uffdtrace.errors import UserError
from uffdtrace.probes import kernel


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
    assert kernel.Btf(vmlinux_like()).struct_members("file") == {
        "(anon)": 0, "f_path": 16, "f_op": 48, "private_data": 200}


def test_bitfield_offsets_drop_their_size():
    assert kernel.Btf(vmlinux_like()).struct_members("task_struct") == {"__state": 24, "pid": 1264}


def test_a_name_that_is_no_struct():
    assert kernel.Btf(vmlinux_like()).struct_members("f_op") is None
    assert kernel.Btf(vmlinux_like()).struct_members("mm_struct") is None


def test_a_missing_member_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(kernel, "vmlinux_btf", lambda: kernel.Btf(vmlinux_like()))
    assert kernel.struct_member_offsets.__wrapped__("file", ("f_op",)) == {"f_op": 48}
    with pytest.raises(UserError, match=r"struct file has no member\(s\) f_count in BTF"):
        kernel.struct_member_offsets.__wrapped__("file", ("f_count",))
