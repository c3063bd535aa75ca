"""Which threads of a QEMU are which vCPUs, asked over QMP (`query-cpus-fast`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from uffdtrace.errors import UserError

TIMEOUT_S = 5.0


def vcpu_threads(socket: Path) -> dict[int, int]:
    """thread id -> vCPU index (cpu-index) of the QEMU listening on the QMP `socket`."""
    from qemu.qmp import QMPClient, QMPError  # only for --qmp

    async def query() -> list[dict]:
        client = QMPClient("uffdtrace")
        await asyncio.wait_for(client.connect(str(socket)), TIMEOUT_S)
        try:
            return await asyncio.wait_for(client.execute("query-cpus-fast"), TIMEOUT_S)
        finally:
            await client.disconnect()

    try:
        cpus = asyncio.run(query())
    except (OSError, TimeoutError, QMPError) as e:
        raise UserError(f"--qmp {socket}: cannot ask QEMU for its vCPUs ({e or type(e).__name__})") from e
    return {int(c["thread-id"]): int(c["cpu-index"]) for c in cpus}
