"""Struct offsets from a BTF dump (no kernel needed)."""

from __future__ import annotations

import pytest

from uffdtrace.errors import UserError
from uffdtrace.probes import kernel

# bpftool's raw format, as Linux 6.1 lays out struct file: an anonymous union comes first.
DUMP = """[1] INT 'int' size=4 bits_offset=0 nr_bits=32 encoding=SIGNED
[718] STRUCT 'file' size=232 vlen=4
\t'(anon)' type_id=719 bits_offset=0
\t'f_path' type_id=400 bits_offset=128
\t'f_op' type_id=1183 bits_offset=384
\t'private_data' type_id=81 bits_offset=1600
[719] UNION '(anon)' size=16 vlen=1
\t'f_llist' type_id=500 bits_offset=0
"""


def test_members_after_an_anonymous_member(monkeypatch):
    monkeypatch.setattr(kernel, "_btf_dump", lambda: DUMP)
    offsets = kernel.struct_member_offsets.__wrapped__("file", ("f_op", "private_data"))
    assert offsets == {"f_op": 48, "private_data": 200}


def test_a_missing_member_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(kernel, "_btf_dump", lambda: DUMP)
    with pytest.raises(UserError, match=r"struct file has no member\(s\) f_count in BTF"):
        kernel.struct_member_offsets.__wrapped__("file", ("f_count",))
