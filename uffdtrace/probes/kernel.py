"""Facts about the running kernel that BPF programs are compiled against.

The kernel headers on these machines belong to another kernel (docs/design.md, 'Kernel-header
fallback'), so struct layouts come from the running kernel's BTF and function addresses from
/proc/kallsyms (docs/design.md, 'What comes from the running kernel').
"""

from __future__ import annotations

import bisect
import functools
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from uffdtrace.errors import UserError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
HIDE_SYMBOLS_ENV = "UFFDTRACE_HIDE_SYMBOLS"


def hidden_symbols() -> frozenset[str]:
    """Kernel functions to treat as absent, from $UFFDTRACE_HIDE_SYMBOLS (comma-separated):
    exercises the fallbacks of the kprobe backend on a kernel that has them all."""
    return frozenset(filter(None, os.environ.get(HIDE_SYMBOLS_ENV, "").split(",")))


@dataclass(frozen=True)
class KernelSymbols:
    """Text symbols of /proc/kallsyms, sorted by address."""

    addrs: list[int]
    names: list[str]

    def range_of(self, name: str) -> tuple[int, int] | None:
        """[start, end) of a function: from its address to the next symbol's."""
        try:
            i = self.names.index(name)
        except ValueError:
            return None
        end = next((a for a in self.addrs[i + 1 :] if a > self.addrs[i]), self.addrs[i] + 1)
        return self.addrs[i], end

    @functools.cached_property
    def present(self) -> frozenset[str]:
        return frozenset(self.names)

    def name_at(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.addrs, addr) - 1
        return self.names[i] if i >= 0 else None


@functools.cache
def kallsyms() -> KernelSymbols:
    entries = []
    hidden = hidden_symbols()
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, kind, name = line.split()[:3]
            if kind in "tT" and name not in hidden:
                entries.append((int(addr, 16), name))
    entries.sort()
    if not entries or entries[0][0] == 0:
        raise UserError("/proc/kallsyms shows no addresses: run as root (kptr_restrict)")
    return KernelSymbols([a for a, _ in entries], [n for _, n in entries])


@functools.cache
def _btf_dump() -> str:
    """The running kernel's BTF as text (bpftool's raw format)."""
    if not VMLINUX_BTF.exists():
        raise UserError(f"{VMLINUX_BTF} is missing: the kernel was built without BTF")
    try:
        # in its own session: a Ctrl-C meant for uffdtrace (which stops cleanly) is not its
        return subprocess.run(
            ["bpftool", "btf", "dump", "file", str(VMLINUX_BTF), "format", "raw"],
            capture_output=True, text=True, check=True, start_new_session=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"cannot read kernel BTF with bpftool ({e}): apt-get install bpftool") from e


@functools.cache
def btf_function_arity() -> dict[str, int]:
    """Functions the kernel's BTF describes (those fentry/fexit can attach to) -> their number
    of arguments (trampolines have a limit: 6 on x86-64 before Linux 6.6)."""
    dump = _btf_dump()
    arity = {m[1]: int(m[2]) for m in re.finditer(
        r"^\[(\d+)\] FUNC_PROTO '\(anon\)' ret_type_id=\d+ vlen=(\d+)$", dump, re.M)}
    hidden = hidden_symbols()
    return {m[1]: arity[m[2]] for m in re.finditer(r"^\[\d+\] FUNC '(\w+)' type_id=(\d+)", dump, re.M)
            if m[2] in arity and m[1] not in hidden}


# struct btf_header and struct btf_type, and what follows a type of each kind (uapi/linux/btf.h)
_BTF_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off & len
_BTF_TYPE = struct.Struct("<III")  # name_off, info (kind << 24 | vlen, kind_flag << 31), size
_BTF_MEMBER = struct.Struct("<III")  # name_off, type, offset (in bits)
BTF_KIND_STRUCT = 4
_BTF_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG: bytes after the type
_BTF_ITEMS = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # STRUCT .. ENUM64: bytes per vlen item


def btf_struct_members(btf: bytes, name: str) -> dict[str, int] | None:
    """Byte offsets of the direct members of struct `name` in a raw BTF blob ('(anon)' for
    unnamed ones), or None. One walk over the types, stopping at the struct: much faster than
    bpftool's text dump of all of vmlinux, which start-up cannot afford."""
    _, _, _, hdr_len, type_off, type_len, str_off, str_len = _BTF_HEADER.unpack_from(btf)
    strings = btf[hdr_len + str_off : hdr_len + str_off + str_len]
    at = strings.find(b"\0" + name.encode() + b"\0")  # names are deduplicated: one offset each
    if at < 0:
        return None
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end:
        name_off, info, _ = _BTF_TYPE.unpack_from(btf, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        pos += _BTF_TYPE.size
        if kind == BTF_KIND_STRUCT and name_off == at + 1:
            members = {}
            for i in range(vlen):
                m_name, _, bits = _BTF_MEMBER.unpack_from(btf, pos + i * _BTF_MEMBER.size)
                if info >> 31:  # kind_flag: a bitfield size in the offset's top byte
                    bits &= 0xFFFFFF
                label = strings[m_name : strings.index(b"\0", m_name)].decode() or "(anon)"
                members[label] = bits // 8
            return members
        pos += _BTF_ITEMS.get(kind, 0) * vlen + _BTF_FIXED.get(kind, 0)
    return None


@functools.cache
def _vmlinux_btf() -> bytes:
    try:
        return VMLINUX_BTF.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{VMLINUX_BTF} is missing: the kernel was built without BTF") from None


@functools.cache
def struct_member_offsets(struct_name: str, members: tuple[str, ...]) -> dict[str, int]:
    """Byte offsets of `members` in `struct_name`, from the running kernel's BTF."""
    found = btf_struct_members(_vmlinux_btf(), struct_name)
    if found is None:
        raise UserError(f"struct {struct_name} not found in kernel BTF")
    missing = set(members) - found.keys()
    if missing:
        raise UserError(f"struct {struct_name} has no member(s) {', '.join(sorted(missing))} in BTF")
    return {m: found[m] for m in members}
