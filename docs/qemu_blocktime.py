"""README, "Tracing a real QEMU post-copy migration": QEMU's blocktime per vCPU against
uffdtrace's, from a run of `python -m tests.qemu_postcopy --out DIR`.

Run from the repository with: python -m docs.qemu_blocktime DIR [docs/qemu_blocktime.png]
Prints the README's table (Markdown) and draws the figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tests.qemu_postcopy import compare, load

BARS = {  # label -> key in compare()'s per-vCPU numbers
    "QEMU query-migrate": "qemu_reported_ms",
    "QEMU's own trace, every request": "qemu_trace_request_to_placed_ms",
    "uffdtrace, QEMU's definition": "plugin_qemu_ms",
    "uffdtrace, true stall": "plugin_stall_ms",
}


def main(run_dir: Path, png: Path) -> None:
    numbers, failures = compare(load(run_dir))
    per_vcpu = numbers["per_vcpu"]
    print("| vCPU | faults | " + " | ".join(f"{label} (ms)" for label in BARS) + " |")
    print("|---|---|" + "---|" * len(BARS))
    for comm, v in per_vcpu.items():
        print(f"| {comm} | {v['faults']} | " + " | ".join(f"{v[k]:.0f}" for k in BARS.values()) + " |")
    print(f"\nQEMU postcopy-blocktime (all vCPUs blocked): {numbers['qemu_postcopy_blocktime_ms']} ms; "
          f"requests {numbers['qemu_requests']}, rows {numbers['rows']}, failures {failures or 'none'}")
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(BARS)
    for i, (label, key) in enumerate(BARS.items()):
        xs = [n + i * width for n in range(len(per_vcpu))]
        ax.bar(xs, [v[key] for v in per_vcpu.values()], width, label=label)
    ax.set_xticks([n + width * (len(BARS) - 1) / 2 for n in range(len(per_vcpu))], list(per_vcpu))
    ax.set_ylabel("blocked time (ms)")
    ax.set_title(f"Post-copy blocktime per vCPU: QEMU 7.2 ({numbers['memory']} RAM) and uffdtrace")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/qemu_blocktime.png"))
