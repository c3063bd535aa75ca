"""Post-copy live migration emulated on one machine, with userfaultfd MINOR faults.

    from uffdtrace.migration import MigrationConfig, run
    summary = run(MigrationConfig(size_mib=64, bandwidth_gbit=1.0))

The link (namespaces, veth, TBF) is built with pyroute2 in `link`; the source and target
run as processes in their namespaces (`node`), their hot paths in C (`migration.c`).
"""

from uffdtrace.migration.link import Link, measure_bandwidth, remove_leftovers
from uffdtrace.migration.scenario import MigrationConfig, run

__all__ = ["Link", "MigrationConfig", "measure_bandwidth", "remove_leftovers", "run"]
