"""What one rank of a run holds: its place in the world and the stage(s) it built."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cachefit.deploy.config import RunConfig
from cachefit.deploy.stages import DeployLayout, StagePlacement


@dataclass(frozen=True, slots=True, kw_only=True)
class RankContext:
    """One process of a run: the layout it is part of, how the run goes, and where it is."""
    layout: DeployLayout
    config: RunConfig
    run_dir: Path
    device: torch.device
    rank: int
    world: int

    @property
    def shows_progress(self) -> bool:
        return self.rank == 0


@dataclass(slots=True)
class BuiltStage:
    """A stage this rank runs: where it sits in the plan, which shard it is, and the module."""
    placement: StagePlacement
    shard: int
    """Index among the stage's ranks (0: the leader, which takes part in the pipeline's traffic)."""
    module: nn.Module
    report: dict[str, Any]
    """What the run report says of it (bytes held, forward times), filled as the run goes."""
    probe: Any = None
    """The :class:`~cachefit.deploy.memory.PeakProbe` measuring its first call(s)."""

    def measure_memory(self) -> None:
        """Measure the peak of the stage's first real call (its largest, the prompt's or a micro-batch's)."""
        from cachefit.deploy.memory import PeakProbe

        self.probe = PeakProbe(self.module)
        self.probe.install(*(("compute", "decode") if hasattr(self.module, "compute") else ("forward",)))

    def record_memory(self, *, resident_extra_bytes: int = 0) -> None:
        """Put planned against measured bytes in the report: the stage's weights as allocated plus the
        peak of its live non-weight bytes during the measured call, plus ``resident_extra_bytes`` that
        call could not see (other groups' KV caches in decode); over its card's capacity or not (a
        split stage's cards each against their own: a proportional split's differ)."""
        from cachefit.deploy.memory import weight_bytes

        placement = self.placement
        capacity = placement.capacity_bytes_of(self.shard)
        self.report.update({"planned_total_bytes": placement.planned_total_bytes_of(self.shard),
                            "capacity_bytes": capacity})
        if self.probe is None or self.probe.peak_bytes is None:
            return
        weights = weight_bytes(self.module)
        peak = weights + self.probe.peak_bytes + resident_extra_bytes
        self.report.update({
            "measured_peak_bytes": peak,
            "measured_weight_bytes_allocated": weights,
            "measured_activation_peak_bytes": self.probe.peak_bytes + resident_extra_bytes,
            "memory_method": self.probe.method,
            "over_capacity": capacity is not None and peak > capacity,
        })

    @property
    def is_follower(self) -> bool:
        return self.placement.shards > 1 and self.shard > 0

    def record_times(self) -> None:
        """Put the stage's forward times and the process's peak resident memory in its report."""
        times = list(getattr(self.module, "forward_times_s", ()))
        self.report.update({
            "forward_s_per_microbatch": times,
            "forward_s_mean": sum(times) / len(times) if times else None,
            "busy_s": sum(times),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })
