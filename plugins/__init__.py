"""uffdtrace's built-in plugins, installed as the package `uffdtrace_plugins` and registered
under the entry-point group `uffdtrace.plugins` (see pyproject.toml). One plugin per module."""
