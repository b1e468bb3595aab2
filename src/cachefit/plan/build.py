"""Building stages and plans from units placed on cards: the one constructor the planner's search
and the cost model's baselines share, so a baseline layout is a plan made the way plans are made."""

from __future__ import annotations

from collections.abc import Sequence

from cachefit.compress.techniques import CANONICAL_ORDER
from cachefit.hardware.devices import Card, Cluster, cluster_to_dict
from cachefit.partition.split import ShardParts
from cachefit.plan.model import Plan, Stage, cluster_digest
from cachefit.units import ModelProfile, Unit, stack_footprints


def stage_for(card_index: int, card: Card, start: int, units: Sequence[Unit], *, stacking: str,
              shard: tuple[int, int] | None = None, collective_bytes_per_token: int = 0,
              shard_parts: Sequence[ShardParts] = ()) -> Stage:
    """The stage of ``units`` (the profile's units ``start .. start + len(units)``, compressed as they
    say) on card ``card_index``; ``shard`` = (index, count) for one shard of a split stage, and
    ``shard_parts`` each unit's slices where the split is proportional (cards of different sizes).

    Its bytes stack the units' footprints (``stacking``: ``reuse`` shares scratch, ``sum`` adds all).
    """
    # canonical order; units may differ (a least-loss plan gives one int8 and its neighbour int4)
    present = {name for u in units for name in u.compression}
    applied = tuple(name for name in CANONICAL_ORDER if name in present)
    return Stage(
        card=card_index,
        device=card.device.name,
        level=card.level_name,
        units=(start, start + len(units)),
        unit_names=tuple(u.name for u in units),
        unit_compression=tuple(u.compression for u in units),
        footprint=stack_footprints((u.footprint for u in units), reuse=stacking == "reuse"),
        capacity_bytes=card.capacity_bytes,
        compression=applied,
        shard=shard,
        collective_bytes_per_token=collective_bytes_per_token,
        shard_parts=tuple(shard_parts),
    )


def plan_from_stages(profile: ModelProfile, stages: Sequence[Stage], *, objective: str, stacking: str,
                     notes: Sequence[str] = (), cluster: Cluster | None = None) -> Plan:
    """A plan of ``profile`` over ``stages``; with ``cluster`` it records its provenance (cachefit's
    version and the digests of the profile and the cards), which ``cachefit run`` checks."""
    provenance = None
    if cluster is not None:
        from cachefit.version import __version__

        provenance = {"version": __version__, "profile": profile.digest(),
                      "cluster": cluster_digest(cluster_to_dict(cluster))}
    return Plan(
        model=profile.model,
        workload=profile.workload.to_dict(),
        devices=tuple(s.device for s in stages),
        objective=objective,
        stages=tuple(stages),
        num_units=len(profile.units),
        stacking=stacking,
        notes=tuple(notes),
        provenance=provenance,
    )


def with_stage_times(plan: Plan, times_s: Sequence[float | None]) -> Plan:
    """``plan`` with each stage's ``predicted_time_s`` (one time per card, in plan order, as the cost
    model gives them: :meth:`cachefit.cost.LayoutPricing.stage_times_s`)."""
    from dataclasses import replace

    if len(times_s) != len(plan.stages):
        raise ValueError(f"with_stage_times: {len(times_s)} times for {len(plan.stages)} stages")
    stages = tuple(replace(s, predicted_time_s=t) for s, t in zip(plan.stages, times_s))
    return replace(plan, stages=stages)


__all__ = ["plan_from_stages", "stage_for", "with_stage_times"]
