"""Cache-oblivious layouts on the same cards, beside cachefit's plan, through the same cost model.

What a user would otherwise pick, each built as a :class:`~cachefit.plan.Plan` (so the one cost model
prices every layout the same way, and a layout whose stages exceed on-chip memory is priced with the
weights it streams from DRAM):

* ``uniform-layers`` (Megatron-LM style pipeline): the same number of units on every card, whatever
  their bytes (Megatron asks for layers divisible by the pipeline size; here the first ``n mod K``
  cards take one unit more);
* ``greedy-dram`` (accelerate ``infer_auto_device_map`` style): fill card 0's off-chip memory with
  weights in order (accelerate counts weights only), then card 1, ...; with tens of GB per card
  that puts a model on a few cards, whose on-chip memory then holds a sliver of their stage, so most
  weights stream from DRAM on every micro-batch; cards left empty stay idle;
* ``tensor-parallel`` (Megatron-LM intra-layer, Shoeybi et al. 2019): every unit split over all K
  cards with :func:`cachefit.partition.split.shard_unit` (a unit that cannot be split K ways is split
  as far as it goes), one pipeline stage, two all-reduces per layer;
* ``cachefit``: :func:`cachefit.plan.search.plan_partition` on exactly K cards: the fitting plan, or,
  where none fits, its best partial fit, chosen by the cost model among the planner's layouts and
  these baselines (:mod:`cachefit.cost.pricing`): never more off-chip bytes per token than a baseline
  on K cards, and as fast as every baseline wherever one of the layouts found is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cachefit.compress.techniques import CompressionConfig, compress_unit
from cachefit.cost.pipeline import PlanCost
from cachefit.cost.pricing import LayoutPricing
from cachefit.cost.roofline import LINK_LATENCY_S
from cachefit.errors import ConfigError, InfeasiblePlanError
from cachefit.hardware.devices import Card, Cluster
from cachefit.partition.contiguous import balanced, footprint_cost_arrays
from cachefit.partition.split import max_shards, shard_unit
from cachefit.plan.build import plan_from_stages, stage_for
from cachefit.plan.model import Plan
from cachefit.plan.search import STACKING, plan_partition, technique_sets
from cachefit.sizes import format_bytes
from cachefit.units import ModelProfile, Unit

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("cachefit", "uniform-layers", "greedy-dram", "tensor-parallel")


def _card(cluster: Cluster, index: int) -> Card:
    return cluster.cards[0] if len(cluster) == 1 else cluster.cards[index]


def _check_cards(cluster: Cluster, num_cards: int) -> None:
    if isinstance(num_cards, bool) or not isinstance(num_cards, int) or num_cards < 1:
        raise ConfigError(f"cards: must be a positive integer, got {num_cards!r}")
    if len(cluster) > 1 and len(cluster) != num_cards:
        raise ConfigError(
            f"cards: the cluster lists {len(cluster)} cards but {num_cards} were asked for; "
            f"give --cards {len(cluster)} or a single device"
        )


def _contiguous_plan(profile: ModelProfile, cluster: Cluster, parts: Sequence[tuple[int, int]],
                     units: Sequence[Unit], objective: str, stacking: str, notes: Sequence[str]) -> Plan:
    stages = [stage_for(i, _card(cluster, i), a, units[a:b], stacking=stacking) for i, (a, b) in enumerate(parts)]
    return plan_from_stages(profile, stages, objective=objective, stacking=stacking, notes=notes)


def uniform_layers_plan(profile: ModelProfile, cluster: Cluster, num_cards: int, *, stacking: str = "reuse") -> Plan:
    """The same number of units per card (Megatron-style pipeline), bytes ignored."""
    _check_cards(cluster, num_cards)
    n = len(profile.units)
    k = min(num_cards, n)
    notes = [f"uniform layers: {n} units over {k} card(s), {n // k}{'-' + str(n // k + 1) if n % k else ''} per card"]
    if k < num_cards:
        notes.append(f"only {n} units: {num_cards - n} of the {num_cards} cards stay idle")
    parts, start = [], 0
    for i in range(k):
        size = n // k + (1 if i < n % k else 0)
        parts.append((start, start + size))
        start += size
    return _contiguous_plan(profile, cluster, parts, profile.units, "uniform_layers", stacking, notes)


def greedy_dram_plan(profile: ModelProfile, cluster: Cluster, num_cards: int, *, stacking: str = "reuse") -> Plan:
    """Fill each card's off-chip memory with weights in order (accelerate style), then the next.

    Raises:
        ConfigError: a card has no off-chip memory (nothing to fill), or the weights exceed the
            off-chip memory of all ``num_cards`` cards (accelerate would send the rest to disk).
    """
    _check_cards(cluster, num_cards)
    parts: list[tuple[int, int]] = []
    start, used, card_idx = 0, 0, 0
    for i, unit in enumerate(profile.units):
        card = _card(cluster, card_idx)
        budget = card.device.offchip_capacity_bytes
        if budget is None:
            raise ConfigError(
                f"greedy-dram: {card.device.name} has no off-chip memory to fill (or none is published); "
                "this baseline needs DRAM / HBM"
            )
        w = unit.footprint.weight_bytes
        if used + w > budget and i > start:
            parts.append((start, i))
            start, used, card_idx = i, 0, card_idx + 1
            if card_idx >= num_cards:
                raise ConfigError(
                    f"greedy-dram: the weights ({format_bytes(sum(u.footprint.weight_bytes for u in profile.units))}) "
                    f"exceed the off-chip memory of {num_cards} card(s); accelerate would offload the rest to disk"
                )
            budget = _card(cluster, card_idx).device.offchip_capacity_bytes or 0
        if w > budget:
            raise ConfigError(
                f"greedy-dram: unit {unit.name} has {format_bytes(w)} of weights, more than a card's "
                f"{format_bytes(budget)} of off-chip memory"
            )
        used += w
    parts.append((start, len(profile.units)))
    off = _card(cluster, 0).device.offchip_capacity_bytes
    notes = [
        f"greedy by off-chip capacity ({format_bytes(off or 0)} per card, weights only, as accelerate counts): "
        f"uses {len(parts)} of {num_cards} card(s)"
    ]
    return _contiguous_plan(profile, cluster, parts, profile.units, "greedy_dram", stacking, notes)


def tensor_parallel_plan(profile: ModelProfile, cluster: Cluster, num_cards: int, *, stacking: str = "reuse") -> Plan:
    """Every unit split over all ``num_cards`` cards (one pipeline stage).

    Raises:
        ConfigError: a unit has no transformer shape to split (live-module profile), or a shard
            cannot be built.
    """
    _check_cards(cluster, num_cards)
    if len(cluster) > 1 and not cluster.is_homogeneous:
        raise ConfigError("tensor-parallel: the cards differ; this baseline splits units evenly over equal cards")
    shards: list[Unit] = []
    traffic = 0
    capped: list[str] = []
    for unit in profile.units:
        degree = min(num_cards, max_shards(unit))
        if degree < num_cards:
            capped.append(f"{unit.name} ({degree})")
        got = shard_unit(unit, degree, profile.workload)
        shards.append(got.unit)
        traffic += got.collective_bytes_per_token
    notes = [f"every unit split {num_cards} ways (Megatron tensor parallel); bytes are the largest shard's"]
    if capped:
        notes.append(f"split as far as their dimensions allow: {', '.join(capped[:4])}{' ...' if len(capped) > 4 else ''}")
    stages = [
        stage_for(r, _card(cluster, r), 0, shards, stacking=stacking, shard=(r, num_cards) if num_cards > 1 else None,
                  collective_bytes_per_token=traffic if num_cards > 1 else 0)
        for r in range(num_cards)
    ]
    return plan_from_stages(profile, stages, objective="tensor_parallel", stacking=stacking, notes=notes)


def _lightest(profile: ModelProfile, allow: Sequence[str], config: CompressionConfig) -> tuple[tuple[str, ...], tuple[Unit, ...]]:
    best: tuple[tuple[str, ...], tuple[Unit, ...]] = ((), profile.units)
    best_bytes = sum(u.total_bytes for u in profile.units)
    for combo in technique_sets(allow):
        if not combo or "batch" in combo:
            continue
        units = tuple(compress_unit(u, combo, profile.workload, config) for u in profile.units)
        total = sum(u.total_bytes for u in units)
        if total < best_bytes:
            best, best_bytes = (combo, units), total
    return best


def baseline_plans(profile: ModelProfile, cluster: Cluster, num_cards: int, *,
                   stacking: str = "reuse") -> tuple[tuple[str, Plan], ...]:
    """The cache-oblivious layouts that can be built on ``num_cards`` cards, each under its name
    (``uniform-layers``, ``greedy-dram``, ``tensor-parallel``); one that cannot is left out."""
    builders = {
        "uniform-layers": uniform_layers_plan,
        "greedy-dram": greedy_dram_plan,
        "tensor-parallel": tensor_parallel_plan,
    }
    out = []
    for name, build in builders.items():
        try:
            out.append((name, build(profile, cluster, num_cards, stacking=stacking)))
        except ConfigError as exc:
            log.info("layout %s skipped: %s", name, exc)
    return tuple(out)


def layout_pricing(profile: ModelProfile, cluster: Cluster, num_cards: int, *, stacking: str = "reuse",
                   config: CompressionConfig | None = None, micro_batches: int | None = None,
                   schedule: str = "1f1b", steps_per_load: int | None = None,
                   link_latency_s: float | None = LINK_LATENCY_S) -> LayoutPricing:
    """How ``cachefit plan --cards K`` and ``cachefit compare`` price a partial fit on ``num_cards`` cards:
    the cost model with these options, and the baselines of the same cards beside cachefit's layouts."""
    return LayoutPricing(profile, cluster, config=config, micro_batches=micro_batches, schedule=schedule,
                         steps_per_load=steps_per_load, link_latency_s=link_latency_s,
                         alternatives=baseline_plans(profile, cluster, num_cards, stacking=stacking))


def cachefit_plan(
    profile: ModelProfile,
    cluster: Cluster,
    num_cards: int,
    *,
    allow: Sequence[str] = (),
    stacking: str = "reuse",
    config: CompressionConfig | None = None,
    pricing: LayoutPricing | None = None,
    objective: str = "cards",
) -> Plan:
    """cachefit's plan on exactly ``num_cards`` cards: the fitting plan, or else the best partial fit
    (``plan.feasible`` False), chosen with ``pricing`` (default: :func:`layout_pricing`, the baselines of
    the same cards beside it). ``objective``: ``cards`` (the smallest largest stage in bytes) or
    ``time`` (the smallest predicted bottleneck stage time), see :func:`cachefit.plan.plan_partition`.

    Only where a partial fit cannot run (cards without off-chip memory) is the layout the balanced
    contiguous partition with capacity ignored, with the lightest allowed compression, marked so.
    """
    _check_cards(cluster, num_cards)
    if stacking not in STACKING:
        raise ConfigError(f"stacking must be one of {STACKING}, got {stacking!r}")
    config = config or CompressionConfig()
    if pricing is None:
        pricing = layout_pricing(profile, cluster, num_cards, stacking=stacking, config=config)
    try:
        plan, _ = plan_partition(profile, cluster, num_cards=num_cards, allow=allow, stacking=stacking, config=config,
                                 pricing=pricing, objective=objective)
        return plan
    except InfeasiblePlanError:
        pass
    n = len(profile.units)
    combo, units = _lightest(profile, allow, config)
    resident, transient = footprint_cost_arrays([u.footprint for u in units], reuse=stacking == "reuse")
    k = min(num_cards, n)
    part = balanced(resident, k, transient=transient, exact=True)
    notes = [
        f"DOES NOT FIT on-chip on {num_cards} card(s), and the cards have no off-chip memory to stream from: this is "
        "the balanced contiguous partition with capacity ignored (smallest largest stage); it cannot run"
    ]
    if combo:
        notes.append(f"every unit compressed with {','.join(combo)} (the lightest allowed set)")
    if k < num_cards:
        notes.append(f"only {n} units: {num_cards - n} card(s) stay idle")
    return _contiguous_plan(profile, cluster, part.parts, units, "balanced_ignoring_capacity", stacking, notes)


def min_cards_to_fit(
    profile: ModelProfile,
    cluster: Cluster,
    *,
    allow: Sequence[str] = (),
    stacking: str = "reuse",
    config: CompressionConfig | None = None,
) -> int | None:
    """The fewest cards (copies of the cluster's first card) on which a cachefit plan fits; None if none."""
    single = Cluster(cards=(cluster.cards[0],))
    try:
        plan, _ = plan_partition(profile, single, num_cards=None, allow=allow, stacking=stacking, config=config)
    except InfeasiblePlanError:
        return None
    return plan.cards


@dataclass(frozen=True, slots=True, kw_only=True)
class LayoutCost:
    """One layout of the comparison and its predicted cost."""

    name: str
    """``cachefit``, ``uniform-layers``, ``greedy-dram`` or ``tensor-parallel``."""
    description: str
    plan: Plan | None
    """None when the layout cannot be built on these cards (see ``skipped``)."""
    cost: PlanCost | None
    skipped: str = ""
    """Why the layout is missing, if it is."""

    @property
    def cards(self) -> int:
        return self.plan.cards if self.plan is not None else 0

    @property
    def fits_on_chip(self) -> bool:
        return self.plan is not None and self.plan.feasible

    def to_dict(self) -> dict[str, Any]:
        cost = self.cost
        return {
            "name": self.name,
            "description": self.description,
            "cards": self.cards,
            "pipeline_stages": cost.pipeline_stages if cost else None,
            "fits_on_chip": self.fits_on_chip,
            "possible": cost.possible if cost else False,
            "complete": cost.complete if cost else False,
            "offchip_bytes_per_token": cost.offchip_bytes_per_token if cost else None,
            "throughput_tokens_per_s": cost.throughput_tokens_per_s if cost else None,
            "latency_s": cost.latency_s if cost else None,
            "bottleneck_s": cost.bottleneck_s if cost else None,
            "stage_times_s": list(cost.stage_times_s) if cost else None,
            "card_times_s": [c.time_s for c in cost.stages] if cost else None,
            "mean_utilization": round(self.plan.mean_utilization, 6) if self.plan else None,
            "compute_utilization": cost.compute_utilization if cost else None,
            "bubble_fraction": cost.bubble_fraction if cost else None,
            "load_bytes": cost.load_bytes if cost else None,
            "skipped": self.skipped or None,
            "missing": list(cost.missing) if cost else [],
            "notes": list(self.plan.notes if self.plan else ()) + list(cost.notes if cost else ()),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """cachefit's plan beside the cache-oblivious baselines on the same cards."""

    model: str
    workload: dict[str, Any]
    num_cards: int
    cards: str
    """The cards, described (``cards 0-3: h100:l2 52.4 MB ...``)."""
    layouts: tuple[LayoutCost, ...]
    min_cards_to_fit: int | None
    """Cards a fitting cachefit plan needs (copies of the first card); None: none fits."""
    schedule: str
    micro_batches: int
    steps_per_load: int | None

    def layout(self, name: str) -> LayoutCost:
        for item in self.layouts:
            if item.name == name:
                return item
        raise ConfigError(f"comparison: no layout named {name!r}; have {', '.join(x.name for x in self.layouts)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "cachefit.compare/1",
            "model": self.model,
            "workload": dict(self.workload),
            "num_cards": self.num_cards,
            "cards": self.cards,
            "schedule": self.schedule,
            "micro_batches": self.micro_batches,
            "steps_per_load": self.steps_per_load,
            "min_cards_to_fit": self.min_cards_to_fit,
            "layouts": [item.to_dict() for item in self.layouts],
        }


_DESCRIPTIONS = {
    "cachefit": "cachefit: every card's stage fits its on-chip memory where possible",
    "uniform-layers": "equal units per card (Megatron-style pipeline)",
    "greedy-dram": "fill each card's DRAM in order (accelerate-style device map)",
    "tensor-parallel": "every unit split over all cards (Megatron tensor parallel)",
}


def compare_layouts(
    profile: ModelProfile,
    cluster: Cluster,
    num_cards: int,
    allow: Sequence[str] = (),
    *,
    micro_batches: int | None = None,
    schedule: str = "1f1b",
    steps_per_load: int | None = None,
    stacking: str = "reuse",
    config: CompressionConfig | None = None,
    link_latency_s: float | None = LINK_LATENCY_S,
    objective: str = "cards",
) -> Comparison:
    """cachefit's plan and the cache-oblivious baselines on ``num_cards`` cards, all priced by
    :func:`cachefit.cost.estimate_cost`.

    Args:
        profile: the model's units for one workload.
        cluster: one card (used ``num_cards`` times) or exactly ``num_cards`` cards.
        num_cards: K, the cards every layout may use.
        allow: compression cachefit may apply (the baselines never compress, as their tools do not).
        micro_batches, schedule, steps_per_load, link_latency_s: see :func:`cachefit.cost.estimate_cost`.
        objective: what cachefit's plan minimizes among fitting layouts: ``cards`` (bytes of the
            largest stage) or ``time`` (the predicted bottleneck stage time).
    """
    _check_cards(cluster, num_cards)
    config = config or CompressionConfig()
    pricing = layout_pricing(profile, cluster, num_cards, stacking=stacking, config=config,
                             micro_batches=micro_batches, schedule=schedule, steps_per_load=steps_per_load,
                             link_latency_s=link_latency_s)
    plans = dict(pricing.alternatives)
    plans["cachefit"] = cachefit_plan(profile, cluster, num_cards, allow=allow, stacking=stacking, config=config,
                                      pricing=pricing, objective=objective)
    layouts: list[LayoutCost] = []
    for name in LAYOUTS:
        plan = plans.get(name)
        if plan is None:
            try:  # say why the baseline could not be built
                {"uniform-layers": uniform_layers_plan, "greedy-dram": greedy_dram_plan,
                 "tensor-parallel": tensor_parallel_plan}[name](profile, cluster, num_cards, stacking=stacking)
                reason = "not built"
            except ConfigError as exc:
                reason = str(exc)
            layouts.append(LayoutCost(name=name, description=_DESCRIPTIONS[name], plan=None, cost=None, skipped=reason))
            continue
        layouts.append(LayoutCost(name=name, description=_DESCRIPTIONS[name], plan=plan, cost=pricing.price(plan)))
    return Comparison(
        model=profile.model,
        workload=profile.workload.to_dict(),
        num_cards=num_cards,
        cards=cluster.describe() if len(cluster) > 1 else f"{num_cards} x {cluster.cards[0].describe()}",
        layouts=tuple(layouts),
        min_cards_to_fit=min_cards_to_fit(profile, cluster, allow=allow, stacking=stacking, config=config),
        schedule=schedule,
        micro_batches=micro_batches if micro_batches is not None else profile.workload.micro_batches,
        steps_per_load=steps_per_load,
    )


__all__ = [
    "LAYOUTS",
    "Comparison",
    "LayoutCost",
    "baseline_plans",
    "cachefit_plan",
    "compare_layouts",
    "greedy_dram_plan",
    "layout_pricing",
    "min_cards_to_fit",
    "tensor_parallel_plan",
    "uniform_layers_plan",
]
