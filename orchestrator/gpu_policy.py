"""When a GPU's NVML figures mean it must not take more work.

A GPU is unhealthy when NVML reports it lost, when its volatile uncorrectable ECC count
rises above the count seen when bcorch started watching it (or when an operator last
resumed it), or when it reports a new critical XID whose code means the GPU needs a reset.
Other XIDs are counted and shown only: many are the application's own errors.
"""
from __future__ import annotations

from dataclasses import dataclass

from .gpus import GpuHealth

# XIDs after which NVIDIA's documentation asks for a GPU reset or a node reboot:
# double-bit ECC (48), internal micro-controller halt (61, 62), row-remapping events (63, 64),
# NVLink error (74), fallen off the bus (79), high single-bit ECC rate (92), contained and
# uncontained ECC (94, 95), GSP errors (119, 120), unrecovered ECC (140).
FATAL_XIDS = frozenset({48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140})


@dataclass
class HealthWatch:
    """The last figures of one GPU and the baselines they are compared with."""

    health: GpuHealth | None = None
    ecc_baseline: int | None = None
    xid_baseline: int = 0

    def update(self, health: GpuHealth) -> str:
        """Record a sample; the problem it shows ("" when none)."""
        if self.health is None:
            self.health = health
            self.rebase()
        self.health = health
        if health.lost:
            return "NVML reports the GPU lost"
        if (health.ecc_uncorrected is not None and self.ecc_baseline is not None
                and health.ecc_uncorrected > self.ecc_baseline):
            return (f"uncorrectable ECC errors rose from {self.ecc_baseline} "
                    f"to {health.ecc_uncorrected}")
        if health.xid_events > self.xid_baseline and health.last_xid in FATAL_XIDS:
            return f"critical XID {health.last_xid} (the GPU needs a reset)"
        return ""

    def rebase(self) -> None:
        """Take the current figures as the new baseline (an operator's resume)."""
        if self.health is not None:
            self.ecc_baseline = self.health.ecc_uncorrected
            self.xid_baseline = self.health.xid_events
