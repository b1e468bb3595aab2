"""Least-loss plans: on the cards a plan needs, the compression per unit with the smallest summed
measured quality loss (``cachefit plan --quality FILE``).

:func:`cachefit.plan.search.plan_partition` chooses one technique set for the whole model (then
undoes it where it is not needed) and ranks sets by a judgement score. Given measured losses per
unit and technique (a :class:`~cachefit.compress.quality_profile.QualityProfile`, from
``cachefit quality``), :func:`least_loss_plan` chooses a technique set **per unit** instead: among
every choice whose contiguous partition fits the same cards, the one whose per-unit losses sum to
the least. :func:`least_loss_partition` is the exact search behind it.

The exact search: units in order, each with its options (technique set, resident bytes, transient
bytes, loss); a card holds a contiguous run of units and costs ``sum(resident) + max(transient)``
(``stacking="reuse"``; ``sum`` puts everything in ``resident``), as the partitioner counts. After
each unit, for each number of cards opened so far, it keeps the Pareto set of (bytes resident on
the open card, largest transient on it, loss so far): a label beaten on all three by another can
never lead to a better plan, so dropping it is exact. The test checks it against brute force.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cachefit.compress.quality_profile import QualityProfile
from cachefit.compress.techniques import CompressionConfig, compress_unit
from cachefit.errors import ConfigError
from cachefit.hardware.devices import Card, Cluster
from cachefit.plan.build import plan_from_stages, stage_for
from cachefit.plan.model import Plan
from cachefit.units import ModelProfile, Unit

__all__ = ["UnitOption", "least_loss_partition", "least_loss_plan", "plan_loss"]


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitOption:
    """One way to run one unit: its techniques, its bytes on a card, its measured loss."""

    techniques: tuple[str, ...]
    resident_bytes: int
    transient_bytes: int
    loss: float
    unit: Unit | None = None
    """The compressed unit (None in tests of the search alone)."""


@dataclass(frozen=True, slots=True)
class _Label:
    resident: int
    transient: int
    loss: float
    choice: tuple[int, ...]
    cuts: tuple[int, ...]
    """Units at which a new card starts (the first is 0)."""


def _pareto(labels: list[_Label]) -> list[_Label]:
    labels.sort(key=lambda l: (l.loss, l.resident, l.transient))
    kept: list[_Label] = []
    for label in labels:
        if not any(k.resident <= label.resident and k.transient <= label.transient for k in kept):
            kept.append(label)  # kept ones have loss <= label.loss: it survives only on bytes
    return kept


def least_loss_partition(
    options: Sequence[Sequence[UnitOption]], capacities: Sequence[int], *, exact: bool = False
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...], float] | None:
    """The least summed loss over choices of one option per unit whose contiguous partition fits.

    Args:
        options: per unit in order, its options.
        capacities: bytes of each card in order; a partition may use a prefix of them.
        exact: use every card (``--cards K``), not a prefix.

    Returns:
        (option index per unit, parts as (start, end) unit ranges, total loss), or None when no
        choice fits. Ties: fewer cards, then the first found.
    """
    if not options or not capacities:
        return None
    caps = list(capacities)
    # by cards opened (1-based): Pareto labels of the open card
    frontier: dict[int, list[_Label]] = {}
    for j, o in enumerate(options[0]):
        if o.resident_bytes + o.transient_bytes <= caps[0]:
            frontier.setdefault(1, []).append(_Label(o.resident_bytes, o.transient_bytes, o.loss, (j,), (0,)))
    frontier = {k: _pareto(v) for k, v in frontier.items()}
    for i in range(1, len(options)):
        nxt: dict[int, list[_Label]] = {}
        for k, labels in frontier.items():
            for label in labels:
                for j, o in enumerate(options[i]):
                    res, tr = label.resident + o.resident_bytes, max(label.transient, o.transient_bytes)
                    if res + tr <= caps[k - 1]:  # on the open card
                        nxt.setdefault(k, []).append(_Label(res, tr, label.loss + o.loss, (*label.choice, j), label.cuts))
                    if k < len(caps) and o.resident_bytes + o.transient_bytes <= caps[k]:  # on a new card
                        nxt.setdefault(k + 1, []).append(_Label(o.resident_bytes, o.transient_bytes, label.loss + o.loss,
                                                                (*label.choice, j), (*label.cuts, i)))
        frontier = {k: _pareto(v) for k, v in nxt.items()}
        if not frontier:
            return None
    best: tuple[float, int, _Label] | None = None
    for k in sorted(frontier):
        if exact and k != len(caps):
            continue
        for label in frontier[k]:
            if best is None or label.loss < best[0] - 1e-15:
                best = (label.loss, k, label)
    if best is None:
        return None
    label = best[2]
    ends = (*label.cuts[1:], len(options))
    return label.choice, tuple(zip(label.cuts, ends)), label.loss


def _cost(unit: Unit, stacking: str) -> tuple[int, int]:
    fp = unit.footprint
    if stacking == "sum":
        return unit.total_bytes, 0
    return fp.weight_bytes + fp.persistent_activation_bytes, fp.transient_activation_bytes + fp.buffer_bytes


def _check_units(profile: ModelProfile, quality: QualityProfile) -> None:
    measured_units = {name for t in quality.techniques for name, _ in t.units}
    missing = [u.name for u in profile.units if u.name not in measured_units]
    if missing:
        raise ConfigError(
            f"quality file of {quality.model}: no measurement for unit(s) {', '.join(missing[:3])} of {profile.model}; "
            f"measure this model (and granularity) with `cachefit quality`"
        )


def plan_loss(plan: Plan, quality: QualityProfile) -> float:
    """The plan's predicted loss: the sum over its units of the measured loss of their techniques."""
    total, seen = 0.0, set()
    for stage in plan.stages:
        for name, techniques in zip(stage.unit_names, stage.unit_compression):
            if name not in seen:  # a unit split over cards counts once
                seen.add(name)
                total += quality.unit_loss(name, techniques)
    return total


def least_loss_plan(
    profile: ModelProfile,
    cluster: Cluster,
    plan: Plan,
    sets: Sequence[tuple[str, ...]],
    quality: QualityProfile,
    *,
    config: CompressionConfig | None = None,
    stacking: str = "reuse",
    source: str = "",
) -> Plan:
    """``plan`` (from :func:`~cachefit.plan.search.plan_partition`) remade with the least summed
    measured loss on at most its cards, or ``plan`` with a note where that cannot be done.

    Args:
        profile: the model's units.
        cluster: the cards ``plan`` was made for.
        plan: the search's plan; its card count is the budget.
        sets: the technique sets a unit may take (``technique_sets(allow)``); sets with ``batch``
            are left out (a workload change, not a per-unit choice).
        quality: measured losses per unit and technique.
        config: the compression options the plan uses.
        stacking: as for the plan.
        source: how to name the quality file in the plan's notes.

    Raises:
        ConfigError: the quality file has no measurement for a unit, or none for an allowed weight
            technique.
    """
    config = config or CompressionConfig()
    _check_units(profile, quality)
    label = f" ({source})" if source else ""
    before = plan_loss(plan, quality)

    def predicted(loss: float) -> dict[str, Any] | None:
        # a loss that is not finite (a unit measured as inf) stays in the notes only: plans hold finite numbers
        return {"loss": loss, "metric": quality.metric, "source": source or None} if math.isfinite(loss) else None
    if not plan.feasible or any(s.shard is not None for s in plan.stages):
        why = "it does not fit" if not plan.feasible else "it splits units over cards"
        note = (f"predicted quality loss {before:.4g} ({quality.metric}, summed measured losses{label}); the "
                f"least-loss search covers whole units on fitting plans, and {why}: plan kept")
        return replace(plan, notes=(*plan.notes, note), predicted_quality=predicted(before))
    sets = [s for s in sets if "batch" not in s]
    if () not in sets:
        sets = [(), *sets]
    options: list[list[UnitOption]] = []
    for unit in profile.units:
        seen: dict[tuple[int, int, float], UnitOption] = {}
        for combo in sets:
            compressed = compress_unit(unit, combo, profile.workload, config) if combo else unit
            resident, transient = _cost(compressed, stacking)
            loss = quality.unit_loss(unit.name, compressed.compression)
            key = (resident, transient, loss)
            if key not in seen:  # a set that changes nothing more than another is the same option
                seen[key] = UnitOption(techniques=compressed.compression, resident_bytes=resident,
                                       transient_bytes=transient, loss=loss, unit=compressed)
        options.append(list(seen.values()))
    capacities = [_card(cluster, i).capacity_bytes for i in range(plan.cards)]
    found = least_loss_partition(options, capacities, exact=plan.objective == "balanced")
    if found is None or found[2] > before + 1e-12:
        note = f"predicted quality loss {before:.4g} ({quality.metric}, summed measured losses{label})"
        return replace(plan, notes=(*plan.notes, note), predicted_quality=predicted(before))
    choice, parts, loss = found
    units = [options[i][j].unit for i, j in enumerate(choice)]
    stages = []
    for index, (a, b) in enumerate(parts):
        stages.append(stage_for(index, _card(cluster, index), a, units[a:b], stacking=stacking))  # type: ignore[arg-type]
    compressed = sum(1 for u in units if u is not None and u.compression)
    notes = [n for n in plan.notes if "units compressed" not in n]
    notes.append(
        f"compression chosen per unit for the least summed measured quality loss{label}: {compressed} of "
        f"{len(units)} units compressed on {len(parts)} card(s); predicted loss {loss:.4g} ({quality.metric}) "
        f"against {before:.4g} for the search's plan"
    )
    made = plan_from_stages(profile, stages, objective="least_loss", stacking=stacking, notes=notes, cluster=cluster)
    return replace(made, cards_to_fit=plan.cards_to_fit, compress_roles=plan.compress_roles,
                   memory_source=plan.memory_source, predicted_quality=predicted(loss))


def _card(cluster: Cluster, index: int) -> Card:
    """Card ``index``: a one-card cluster stands for as many copies as needed (as the search reads it)."""
    return cluster.cards[0] if len(cluster) == 1 else cluster.cards[index]
