"""cffi build script (API mode) for the migration emulator's C side: `uffdtrace.migration._migration`.

Run by setuptools through setup.py's `cffi_modules`, or directly: `python build.py`.
"""

from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent


def _cdef() -> str:
    """migration.h without its preprocessor lines (cffi's cdef takes plain declarations)."""
    lines = (HERE / "migration.h").read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "uffdtrace.migration._migration",
    (HERE / "migration.c").read_text(),
    include_dirs=[str(HERE), str(HERE.parent)],  # native_util.h
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent.parent), verbose=True)
