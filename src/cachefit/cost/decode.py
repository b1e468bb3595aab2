"""What the cost model predicts for pipelined decoding with ``M`` groups of sequences in flight.

In decode every group gets one token per *cycle*: its token must pass through every stage (and every
link) before the group's next step can start, so a cycle lasts at least the one-group latency ``L``
(the sum of the stage and transfer times); and each stage serves the ``M`` groups one after another,
so a cycle lasts at least ``M x`` the slowest stage's (or link's) time ``b``. :func:`estimate_cost`
prices that as ``cycle = max(L, M b)`` and ``throughput = M x tokens / cycle``; here the same
figures are read back as what a run reports: tokens/s, the interval between a sequence's tokens
(the cycle) and each stage's busy fraction ``M t_s / cycle``. With ``M = 1`` a stage of ``S`` equal
ones is busy ``1 / S`` of the time; ``M >= S`` groups can keep every stage busy, and throughput then
grows by up to ``S``-fold, as far as the slowest stage and the links allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cachefit.cost.pipeline import PlanCost


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodePrediction:
    micro_batches: int
    """Groups of sequences in flight."""
    tokens_per_s: float
    """Generated tokens per second, all groups."""
    token_interval_s: float
    """Time between two tokens of one sequence (one cycle)."""
    latency_s: float
    """One group's pass through every stage and link."""
    stage_times_s: tuple[float, ...]
    """One group's time on each pipeline stage."""
    busy_fractions: tuple[float, ...]
    """Each pipeline stage's compute time over the cycle."""

    def to_dict(self) -> dict[str, Any]:
        return {"micro_batches": self.micro_batches, "tokens_per_s": self.tokens_per_s,
                "ms_per_token": self.token_interval_s * 1e3, "latency_s": self.latency_s,
                "stage_times_s": list(self.stage_times_s), "busy_fractions": list(self.busy_fractions)}


def predict_decode(cost: PlanCost) -> DecodePrediction | None:
    """The decode figures of ``cost`` (a decode plan priced with its micro-batches), or None where the
    cost model could not time it (a missing device figure, a plan that cannot run)."""
    if cost.mode != "decode":
        raise ValueError(f"predict_decode: the plan was priced for {cost.mode}, not decode")
    if cost.throughput_tokens_per_s is None or cost.latency_s is None \
            or any(t is None for t in cost.stage_times_s):
        return None
    m = cost.micro_batches
    cycle = m * cost.tokens_per_micro_batch / cost.throughput_tokens_per_s
    times = tuple(float(t) for t in cost.stage_times_s)  # type: ignore[arg-type]
    return DecodePrediction(micro_batches=m, tokens_per_s=cost.throughput_tokens_per_s, token_interval_s=cycle,
                            latency_s=cost.latency_s, stage_times_s=times,
                            busy_fractions=tuple(min(1.0, m * t / cycle) for t in times))


__all__ = ["DecodePrediction", "predict_decode"]
