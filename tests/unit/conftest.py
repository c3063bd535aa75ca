"""The fast tier: no root, BPF or kernel (`make unit`).

When a run selects only tests/unit, importing bcc is refused, so that a test that would need
BPF fails here instead of passing only where BCC happens to be installed. Hypothesis keeps no
example database: the tier also runs as an unprivileged user, in a checkout it cannot write.
"""

from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path

import pytest
from hypothesis import settings

UNIT = Path(__file__).parent

settings.register_profile("unit", database=None)
settings.load_profile("unit")


class NoBcc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "bcc":
            raise ImportError("tests/unit runs without BPF: it must not import bcc")
        return None


def only_unit_tests(config: pytest.Config) -> bool:
    paths = [Path(arg.split("::")[0]) for arg in config.args]
    return bool(paths) and all(
        (p if p.is_absolute() else config.invocation_params.dir / p).resolve().is_relative_to(UNIT)
        for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    if only_unit_tests(config):
        if "bcc" in sys.modules:
            raise pytest.UsageError("bcc was imported before tests/unit started: it must not be")
        sys.meta_path.insert(0, NoBcc())
