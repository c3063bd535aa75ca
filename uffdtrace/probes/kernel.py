"""Facts about the running kernel that BPF programs are compiled against.

The kernel headers on these machines belong to another kernel (docs/design.md, 'Kernel-header
fallback'), so struct layouts come from the running kernel's BTF and function addresses from
/proc/kallsyms (docs/design.md, 'What comes from the running kernel').
"""

from __future__ import annotations

import bisect
import functools
import os
import struct
from collections.abc import Iterator
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


# struct btf_header and struct btf_type, and what follows a type of each kind (uapi/linux/btf.h)
_BTF_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off & len
_BTF_TYPE = struct.Struct("<III")  # name_off, info (kind << 24 | vlen, kind_flag << 31), size/type
_BTF_MEMBER = struct.Struct("<III")  # name_off, type, offset (in bits)
BTF_KIND_STRUCT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 4, 12, 13
_BTF_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG: bytes after the type
_BTF_ITEMS = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # STRUCT .. ENUM64: bytes per vlen item


@dataclass(frozen=True)
class Btf:
    """A raw BTF blob (such as /sys/kernel/btf/vmlinux), read directly: a text dump of all of
    vmlinux by bpftool costs about a second of start-up, a walk over the records a tenth."""

    blob: bytes

    def _types(self) -> Iterator[tuple[int, int, int, int, int]]:
        """(kind, info, name_off, size_or_type, offset of its items) of each type, in id order
        (the first is id 1)."""
        _, _, _, hdr_len, type_off, type_len, _, _ = _BTF_HEADER.unpack_from(self.blob)
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_or_type = _BTF_TYPE.unpack_from(self.blob, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            pos += _BTF_TYPE.size
            yield kind, info, name_off, size_or_type, pos
            pos += _BTF_ITEMS.get(kind, 0) * vlen + _BTF_FIXED.get(kind, 0)

    @functools.cached_property
    def _strings(self) -> bytes:
        _, _, _, hdr_len, _, _, str_off, str_len = _BTF_HEADER.unpack_from(self.blob)
        return self.blob[hdr_len + str_off : hdr_len + str_off + str_len]

    def _name(self, off: int) -> str:
        return self._strings[off : self._strings.index(b"\0", off)].decode()

    def struct_members(self, name: str) -> dict[str, int] | None:
        """Byte offsets of the direct members of struct `name` ('(anon)' for unnamed ones), or
        None. The walk stops at the struct."""
        at = self._strings.find(b"\0" + name.encode() + b"\0")  # names are deduplicated
        if at < 0:
            return None
        for kind, info, name_off, _, items in self._types():
            if kind == BTF_KIND_STRUCT and name_off == at + 1:
                members = {}
                for i in range(info & 0xFFFF):
                    m_name, _, bits = _BTF_MEMBER.unpack_from(self.blob, items + i * _BTF_MEMBER.size)
                    if info >> 31:  # kind_flag: a bitfield size in the offset's top byte
                        bits &= 0xFFFFFF
                    members[self._name(m_name) or "(anon)"] = bits // 8
                return members
        return None

    def function_arity(self) -> dict[str, int]:
        """Each function (FUNC) -> the number of arguments of its prototype."""
        protos: dict[int, int] = {}
        funcs: list[tuple[int, int]] = []
        for type_id, (kind, info, name_off, size_or_type, _) in enumerate(self._types(), start=1):
            if kind == BTF_KIND_FUNC_PROTO:
                protos[type_id] = info & 0xFFFF
            elif kind == BTF_KIND_FUNC:
                funcs.append((name_off, size_or_type))
        return {self._name(name_off): protos[proto] for name_off, proto in funcs if proto in protos}


@functools.cache
def vmlinux_btf() -> Btf:
    """The running kernel's BTF."""
    try:
        return Btf(VMLINUX_BTF.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{VMLINUX_BTF} is missing: the kernel was built without BTF") from None


@functools.cache
def btf_function_arity() -> dict[str, int]:
    """Functions the kernel's BTF describes (those fentry/fexit can attach to) -> their number
    of arguments (trampolines have a limit: 6 on x86-64 before Linux 6.6)."""
    hidden = hidden_symbols()
    return {name: n for name, n in vmlinux_btf().function_arity().items() if name not in hidden}


@functools.cache
def struct_member_offsets(struct_name: str, members: tuple[str, ...]) -> dict[str, int]:
    """Byte offsets of `members` in `struct_name`, from the running kernel's BTF."""
    found = vmlinux_btf().struct_members(struct_name)
    if found is None:
        raise UserError(f"struct {struct_name} not found in kernel BTF")
    missing = set(members) - found.keys()
    if missing:
        raise UserError(f"struct {struct_name} has no member(s) {', '.join(sorted(missing))} in BTF")
    return {m: found[m] for m in members}
