"""Synthetic batches with the real columns (uffdtrace/events.py) and an offline plugin host,
for the plugin tests (test_plugin_host.py, test_plugins_unit.py)."""

from __future__ import annotations

import pandas as pd

from uffdtrace.events import FAULT_COLUMNS, IOCTL_COLUMNS, coerce_faults
from uffdtrace.plugins import Plugin, PluginInfo, RunContext
from uffdtrace.sinks.plugins import PluginSink


def faults(**columns) -> pd.DataFrame:
    """A batch with FAULT_COLUMNS: the given columns, the rest <NA>."""
    return _batch(columns, FAULT_COLUMNS)


def ioctls(**columns) -> pd.DataFrame:
    """A batch with IOCTL_COLUMNS: the given columns, the rest <NA>."""
    return _batch(columns, IOCTL_COLUMNS)


def _batch(columns: dict, names: dict[str, tuple[str, str]]) -> pd.DataFrame:
    n = max(len(v) for v in columns.values() if isinstance(v, list))
    return coerce_faults(pd.DataFrame({k: v if isinstance(v, list) else [v] * n
                                       for k, v in columns.items()}), names)


def offline(*infos: PluginInfo | type[Plugin], options=None, err=None) -> PluginSink:
    infos = [i if isinstance(i, PluginInfo) else PluginInfo(i, "test") for i in infos]
    ctx = RunContext(targets=("test",), backend="file", mode="", live=False)
    return PluginSink(infos, ctx, options, err=err)


def run(plugin: type[Plugin], *batches: pd.DataFrame, **options) -> dict[str, pd.DataFrame]:
    sink = offline(plugin, options={plugin.name: {**plugin.options, **options}})
    for b in batches:
        sink.write(b)
    sink.close()
    assert sink.failed == []
    return sink.results.get(plugin.name, {})
