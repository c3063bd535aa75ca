"""Only here for cffi: the exerciser's C extension is built at install time (API mode)."""

from setuptools import setup

setup(cffi_modules=["uffdtrace/exerciser/build.py:ffibuilder", "uffdtrace/migration/build.py:ffibuilder"])
