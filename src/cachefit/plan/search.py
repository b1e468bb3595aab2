"""Plan search: choose compression per unit and a contiguous partition so every card fits.

The search tries the allowed technique sets (each a valid combination of the allowed names) from the
least to the most lossy, partitions the compressed units optimally for each (``contiguous``), keeps
the Pareto front of (cards, quality risk, mean utilization), and then picks the plan the objective
asks for. Chosen a technique set, units that do not need it are reverted to their uncompressed form
one at a time (smallest saving first) as long as the plan keeps its card count: compression is
applied only where it is needed. Batch reduction is a last resort: sets with ``batch`` are tried
only when nothing without it fits, and the plan says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from cachefit.compress.techniques import (
    DEFAULT_MATRIX_ROLES,
    CompressionConfig,
    compress_unit,
    compression_risk,
    resolve_techniques,
)
from cachefit.errors import (
    ConfigError,
    InfeasiblePlanError,
    UnsupportedCompressionError,
)
from cachefit.hardware.devices import Card, Cluster, DeviceSpec
from cachefit.limits import check_limit
from cachefit.partition.contiguous import Partition, balanced, fewest_cards
from cachefit.partition.overrides import (
    Overrides,
    ResolvedOverrides,
    constrained_partition,
    resolve_overrides,
)
from cachefit.partition.split import Shard, max_shards
from cachefit.plan.build import plan_from_stages, stage_for, with_stage_times
from cachefit.plan.layout import (
    DEGREES,
    PARTIAL_SEARCH_BUDGET,
    Group,
    Layout,
    ShardTable,
    degrees_for,
    exact_cards_layout,
    fastest_layout,
    MIXED_MAX_SHARDS,
    MixedSearch,
    card_kinds,
    fewest_cards_layout,
    mixed_layout,
    narrow_partial_search,
    partial_layouts,
)
from cachefit.plan.model import Plan
from cachefit.profile.measure import memory_source
from cachefit.sizes import format_bytes
from cachefit.units import Footprint, ModelProfile, Unit

_log = logging.getLogger(__name__)

STACKING = ("reuse", "sum")
OBJECTIVES = ("cards", "time")
"""What :func:`plan_partition` minimizes among fitting plans: ``cards`` (the fewest cards, or on K
cards the smallest largest stage in bytes) or ``time`` (on the same cards, the smallest predicted
bottleneck stage time, then the smallest largest stage)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One technique set tried on every unit, and the best partition it gives."""

    techniques: tuple[str, ...]
    risk: float
    cards: int | None
    """Cards the partition uses (None: no partition fits)."""
    bottleneck_bytes: int | None
    mean_utilization: float | None
    compressed_units: int | None = None
    """Units the set's plan compresses (after compression is undone where not needed); None: no fit."""

    @property
    def feasible(self) -> bool:
        return self.cards is not None

    def to_dict(self) -> dict[str, object]:
        return {
            "techniques": list(self.techniques),
            "risk": round(self.risk, 6),
            "cards": self.cards,
            "bottleneck_bytes": self.bottleneck_bytes,
            "mean_utilization": None if self.mean_utilization is None else round(self.mean_utilization, 6),
            "compressed_units": self.compressed_units,
        }


def _cost_arrays(units: Sequence[Unit], stacking: str) -> tuple[list[int], list[int] | None]:
    """Per-unit resident and transient bytes for the partitioner (see ``stack_footprints``)."""
    if stacking == "sum":
        return [u.total_bytes for u in units], None
    resident = [u.footprint.weight_bytes + u.footprint.persistent_activation_bytes for u in units]
    transient = [u.footprint.transient_activation_bytes + u.footprint.buffer_bytes for u in units]
    return resident, transient


def pareto_front(candidates: Sequence[Candidate]) -> tuple[Candidate, ...]:
    """The candidates no other beats on both cards and quality risk (fewer cards first)."""
    feasible = sorted((c for c in candidates if c.feasible), key=lambda c: (c.cards, c.risk, -(c.mean_utilization or 0)))
    front: list[Candidate] = []
    for cand in feasible:
        if not front or cand.risk < min(f.risk for f in front):
            front.append(cand)
    return tuple(front)


def technique_sets(allow: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Every valid combination of the allowed techniques, least lossy first, ``batch`` ones last."""
    names: list[str] = []
    for name in allow:  # validate each name; exclusive pairs (int8/int4) are simply never combined
        (canonical,) = resolve_techniques((name,))
        if canonical not in names:
            names.append(canonical)
    combos: list[tuple[str, ...]] = [()]
    for r in range(1, len(names) + 1):
        for combo in itertools.combinations(names, r):
            try:
                combos.append(resolve_techniques(combo))
            except UnsupportedCompressionError:
                continue  # e.g. int8 with int4: they exclude each other
    return tuple(sorted(set(combos), key=lambda c: ("batch" in c, compression_risk(c), len(c), c)))


def _is_homogeneous(cluster: Cluster) -> bool:
    """``cluster.is_homogeneous``, asked of each distinct card object once (a cluster of thousands of
    cards repeats a few objects, and a card's capacity is recomputed each time it is read)."""
    distinct = tuple({id(c): c for c in cluster.cards}.values())
    first = distinct[0]
    return all((c.device, c.level_name, c.capacity_bytes) == (first.device, first.level_name, first.capacity_bytes)
               for c in distinct)


def _capacities(cluster: Cluster) -> tuple[int, ...]:
    """``cluster.capacities()``, each distinct card object's read once."""
    known: dict[int, int] = {}
    out = []
    for card in cluster.cards:
        got = known.get(id(card))
        if got is None:
            got = known[id(card)] = card.capacity_bytes
        out.append(got)
    return tuple(out)


class _Cards:
    """The cards a plan may use: a fixed cluster, or unlimited copies of one card."""

    def __init__(self, cluster: Cluster, num_cards: int | None,
                 overrides: ResolvedOverrides | None = None) -> None:
        self.cluster = cluster
        self.overrides = overrides or ResolvedOverrides()
        self.last_error: InfeasiblePlanError | None = None
        self.even_splits = False
        self.order_note: str | None = None
        """What --any-order chose or kept (for messages)."""
        self.mixed: MixedSearch | None = None
        """The furthest-reaching search over the mixed cluster's cards with splits (for messages)."""
        self.unlimited = len(cluster) == 1 and num_cards is None
        # computed once: each reads every card's capacity, and the search asks for them per layout tried
        self.capacities: tuple[int, ...] = _capacities(cluster)
        self.homogeneous = _is_homogeneous(cluster)
        if num_cards is not None and len(cluster) > 1 and num_cards > len(cluster):
            raise ConfigError(
                f"--cards {num_cards}: the cluster has only {len(cluster)} cards; give at most {len(cluster)} "
                "or add cards to the cluster file"
            )
        self.num_cards = num_cards

    def card(self, index: int) -> Card:
        return self.cluster.cards[0] if len(self.cluster) == 1 else self.cluster.cards[index]

    def capacity_arg(self) -> int | tuple[int, ...]:
        if len(self.cluster) == 1:
            return self.capacities[0]
        return self.capacities

    def partition(self, sizes: list[int], transient: list[int] | None) -> Partition:
        cap = self.capacity_arg()
        if self.overrides.shapes_partition:
            if isinstance(cap, int):
                caps: list[int] = [cap] * (self.num_cards or len(sizes))
            else:
                caps = list(cap[: self.num_cards] if self.num_cards else cap)
            parts = constrained_partition(sizes, transient, caps, num_cards=self.num_cards, overrides=self.overrides)
            if parts is None:
                raise InfeasiblePlanError("no partition honours the overrides")
            trans = transient or [0] * len(sizes)
            return Partition(
                parts=tuple(parts),
                part_sizes=tuple(sum(sizes[a:b]) + max(trans[a:b]) for a, b in parts),
                capacities=tuple(caps[: len(parts)]),
            )
        if self.num_cards is None:
            return fewest_cards(sizes, cap, transient=transient)
        if isinstance(cap, tuple):
            cap = cap[: self.num_cards]
        return balanced(sizes, self.num_cards, capacity=cap, transient=transient, exact=True)


def _try(cards: _Cards, units: Sequence[Unit], stacking: str) -> Partition | None:
    resident, transient = _cost_arrays(units, stacking)
    try:
        return cards.partition(resident, transient)
    except InfeasiblePlanError as exc:
        cards.last_error = exc
        return None


def _layout_from_partition(part: Partition, units: Sequence[Unit], stacking: str) -> Layout:
    return Layout(tuple(Group(a, b, 1, tuple(units[a:b])) for a, b in part.parts), stacking)


def plan_partition(
    profile: ModelProfile,
    cluster: Cluster,
    *,
    num_cards: int | None = None,
    allow: Sequence[str] | str = (),
    stacking: str = "reuse",
    config: CompressionConfig | None = None,
    max_risk: float = 1.0,
    overrides: Overrides | None = None,
    reorder_cards: bool = False,
    even_splits: bool = False,
    pricing: Pricing | None = None,
    objective: str = "cards",
) -> tuple[Plan, tuple[Candidate, ...]]:
    """Plan ``profile`` on the cards of ``cluster``.

    Args:
        profile: the model's units for one workload.
        cluster: one card (then as many copies as needed, or ``num_cards``) or a fixed cluster.
        num_cards: use exactly this many cards (any number >= 1: units are split tensor-parallel where
            they are fewer than the cards): the fitting layout with the smallest largest part, or,
            where none fits, the best partial fit (``plan.feasible`` False, ``overflow_bytes`` per
            stage streamed from off-chip memory, ``cards_to_fit`` the cards a fit needs); None: the
            fewest cards that fit.
        allow: compression techniques the search may apply (``int8``, ``int4``, ``sparse50``, ...);
            a plain string is read as a comma-separated list (``"int8,int4"``).
        stacking: ``reuse`` (transient scratch shared by a card's units) or ``sum`` (the seed's sum).
        config: options of the techniques.
        max_risk: skip technique sets whose combined quality risk exceeds this (0: lossless only).
        overrides: pins, forced cuts, units kept whole, techniques forbidden per unit; the plan's
            notes say what they cost against the plan without them.
        reorder_cards: the cards of a mixed cluster are interchangeable: choose their order (every
            distinct order for small clusters, else a heuristic) instead of keeping the given one.
        even_splits: split a unit only over a number of cards that divides its heads (KV heads:
            divides or is a multiple), MLP columns and vocabulary, as ``cachefit run`` deploys them.
        pricing: the cost model's stage times (:class:`cachefit.cost.LayoutPricing`): every stage of
            the plan carries its ``predicted_time_s`` from it; a partial fit (``num_cards`` too few
            for a fit) weighs predicted time too and lets it choose (without it: the fewest off-chip
            bytes); ``objective="time"`` minimizes it. Without it ``predicted_time_s`` is None.
        objective: ``cards`` (default): the fewest cards that fit, or with ``num_cards`` the smallest
            largest stage in bytes. ``time``: on the same cards (``num_cards``, or the fewest that
            fit) and with the same compression per unit, the layout with the smallest predicted
            bottleneck stage time (``pricing``'s, which the cost model's ``estimate_cost`` and
            ``cachefit compare`` report per card), ties broken by the smallest largest stage; it
            needs ``pricing``, and it applies to plans that fit (a partial fit is chosen as before).

    Returns:
        The plan and every candidate technique set tried, with the cards it needs.

    Raises:
        ConfigError: an argument of the wrong type or out of range (checked before any work),
            ``num_cards`` more than the units can be split over, or ``objective="time"`` without
            ``pricing``, with pins or cuts, or on devices missing a figure the stage time needs.
        InfeasiblePlanError: without ``num_cards``, nothing allowed fits any number of cards (the
            message names the unit or constraint and the minimal change that would make it fit); with
            it, pins or cuts that no plan honours, or a partial fit on cards with no off-chip memory.
    """
    allow = _check_arguments(profile, cluster, num_cards=num_cards, allow=allow, stacking=stacking, config=config,
                             max_risk=max_risk, overrides=overrides)
    _check_objective(objective, pricing, overrides)
    if (num_cards is not None and num_cards > len(profile.units) and not _is_homogeneous(cluster)
            and not any(max_shards(u) > 1 for u in profile.units)):
        raise ConfigError(
            f"--cards {num_cards}: the model has {len(profile.units)} units at this granularity and none can be "
            f"split over cards; use at most {len(profile.units)} cards of this cluster"
        )
    order_note = None
    if reorder_cards and not _is_homogeneous(cluster):
        cluster, order_note = _reorder(profile, cluster, num_cards, stacking, even_splits)
    resolved = resolve_overrides(profile, overrides, num_cards=num_cards) if overrides and not overrides.empty else None
    cards = _Cards(cluster, num_cards, resolved)
    cards.even_splits = even_splits
    cards.order_note = order_note
    forbid = cards.overrides.forbid
    config = config or CompressionConfig()
    wl = profile.workload
    sets = tuple(c for c in technique_sets(allow) if not c or compression_risk(c) <= max_risk)

    candidates: list[Candidate] = []
    variants: dict[tuple[str, ...], tuple[Unit, ...]] = {}
    best: tuple[tuple[str, ...], Plan] | None = None
    seen: dict[tuple[Footprint, ...], Plan | None] = {}
    shard_cache: dict[tuple[int, int], Shard] = {}
    for combo in sets:
        if best is not None and "batch" in combo:
            break  # batch reduction only as a last resort
        units = tuple(
            compress_unit(u, _allowed(combo, forbid.get(i, frozenset())), wl, config) for i, u in enumerate(profile.units)
        ) if combo else profile.units
        variants[combo] = units
        # a technique that changed no unit (ckpt in decode, say) gives the plan of the set without it
        key = tuple(u.footprint for u in units)
        if key not in seen:
            layout = _layout(cards, profile, combo, config, units, stacking, shard_cache)
            if layout is not None and combo:
                layout = _revert_unneeded(profile, combo, config, list(units), cards, stacking, layout, shard_cache)
            # the candidate's numbers are those of the plan it gives: the same stages the plan shows
            seen[key] = None if layout is None else _build_plan(profile, cards, layout, combo, config)
        got = seen[key]
        candidates.append(_candidate(combo, got))
        if got is None:
            continue
        # sets come least lossy first: with a fixed card count the first that fits wins; for the
        # fewest cards a lossier set is kept only if it saves a card
        if best is None or (num_cards is None and got.cards < best[1].cards):
            best = (combo, got)
    if best is None:
        if num_cards is None or cards.overrides.shapes_partition:
            raise _infeasible(profile, cards, variants, stacking)
        plan = _partial_plan(profile, cards, sets, variants, config, stacking, shard_cache, pricing)
    elif objective == "time":
        assert pricing is not None  # _check_objective
        plan = _fastest_plan(profile, cards, best[0], best[1], variants[best[0]], config, stacking, shard_cache,
                             pricing)
    else:
        plan = best[1]
    if order_note:
        plan = replace(plan, notes=(*plan.notes, order_note))
    if num_cards is None:
        plan = replace(plan, cards_to_fit=plan.cards)
    else:
        plan = replace(plan, cards_to_fit=_cards_to_fit(profile, cluster, allow, stacking, config, max_risk, overrides,
                                                        even_splits, plan))
    if not plan.feasible:
        plan = _partial_notes(plan, cards)
        if objective == "time":
            plan = replace(plan, notes=(*plan.notes, "--objective time chooses among plans that fit; none fits these "
                                        "cards, so this partial fit is chosen as with --objective cards"))
    if resolved is not None:
        plan = _with_override_cost(plan, profile, cluster, num_cards, allow, stacking, config, max_risk, overrides)
    # the plan says where its bytes came from: a measured profile (--measure) or the analytic model
    from dataclasses import replace as _with

    plan = _with(plan, memory_source=memory_source(profile))
    if pricing is not None:
        plan = with_stage_times(plan, pricing.stage_times_s(plan))
    return plan, tuple(candidates)


def _check_objective(objective: object, pricing: object, overrides: Overrides | None) -> None:
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ConfigError(f"plan_partition: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective != "time":
        return
    if pricing is None:
        raise ConfigError(
            "plan_partition: objective='time' minimizes the cost model's stage time; pass "
            "pricing=cachefit.cost.LayoutPricing(profile, cluster) (the cost model's options as keywords)"
        )
    if overrides is not None and (overrides.pins or overrides.cut_after):
        raise ConfigError(
            "--objective time does not take pins or forced cuts (--pin, --cut-after); drop them, or plan with "
            "--objective cards"
        )


def _fastest_plan(profile: ModelProfile, cards: _Cards, combo: tuple[str, ...], chosen: Plan, units: Sequence[Unit],
                  config: CompressionConfig, stacking: str, shard_cache: dict[tuple[int, int], Shard],
                  pricing: Pricing) -> Plan:
    """The time objective: on the cards of ``chosen`` (the cards objective's plan) and with its
    compression per unit, the fitting layout with the smallest predicted bottleneck stage time (then
    the smallest largest stage), over the same space of layouts: contiguous stages, split only where
    ``chosen`` splits (then over the degrees an exact card count tries)."""
    k = chosen.cards
    if not cards.homogeneous and any(st.shard is not None for st in chosen.stages):
        why = ("the time objective re-cuts stages without splits over cards of different sizes; this plan splits "
               "units over them, so it is the cards objective's plan")
        return replace(chosen, notes=(*chosen.notes, why))
    table = _table(cards, profile, combo, config, units, shard_cache)
    for st in chosen.stages:  # units the revert pass left uncompressed stay so
        if st.shard is None or st.shard[0] == 0:
            techs = st.unit_compression or ((),) * (st.units[1] - st.units[0])
            table.raw.update(st.units[0] + k_ for k_, t in enumerate(techs) if not t)
    split = any(st.shard is not None for st in chosen.stages)
    degrees: tuple[int, ...] = (1,)
    longest = None
    if split:
        degrees, longest = narrow_partial_search(len(profile.units), k, degrees_for(profile.units, k))
    card_list = [cards.card(c) for c in range(k)]
    layout = fastest_layout(table, card_list, stacking, degrees, k, pricing.card_time_s, max_stage_units=longest)
    before = list(pricing.stage_times_s(chosen))
    if layout is None:  # only where a narrowed search lost the chosen layout itself
        why = "the time objective found no layout in its narrowed search; this is the cards objective's plan"
        return replace(chosen, notes=(*chosen.notes, why))
    plan = _build_plan(profile, cards, layout, combo, config)
    after = pricing.stage_times_s(plan)
    note = f"the time objective: on the same {k} card(s) and compression, the smallest predicted bottleneck stage time"
    if all(t is not None for t in (*before, *after)):
        note += (f", {max(after) * 1e3:.4g} ms per micro-batch against {max(before) * 1e3:.4g} ms for the layout "  # type: ignore[type-var]
                 "that balances bytes")
    if longest is not None:
        note += f" (searched over stages of at most {longest} units split over {', '.join(map(str, degrees))} cards)"
    return replace(plan, objective="min_time", notes=(*plan.notes, note))


def _candidate(combo: tuple[str, ...], plan: Plan | None) -> Candidate:
    return Candidate(
        techniques=combo,
        risk=compression_risk(combo) if combo else 0.0,
        cards=plan.cards if plan is not None else None,
        bottleneck_bytes=plan.bottleneck_bytes if plan is not None else None,
        mean_utilization=plan.mean_utilization if plan is not None else None,
        compressed_units=None if plan is None else sum(
            1 for st in plan.stages if st.shard is None or st.shard[0] == 0 for t in st.unit_compression if t),
    )


def _check_arguments(profile: object, cluster: object, *, num_cards: object, allow: object, stacking: object,
                     config: object, max_risk: object, overrides: object) -> tuple[str, ...]:
    """:func:`plan_partition`'s arguments, checked before any work; returns ``allow`` as a tuple
    (a plain string such as ``"int8,int4"`` is read as a comma-separated list).

    Raises:
        ConfigError: an argument of the wrong type or out of range, or a profile / cluster over the
            limits of :mod:`cachefit.limits`.
    """
    where = "plan_partition"
    if not isinstance(profile, ModelProfile):
        raise ConfigError(f"{where}: profile must be a ModelProfile (from cachefit.profile_model), "
                          f"got {type(profile).__name__}")
    if not isinstance(cluster, Cluster):
        hint = "; wrap a device in cachefit.make_cluster(device)" if isinstance(cluster, DeviceSpec) else ""
        raise ConfigError(f"{where}: cluster must be a Cluster (from cachefit.make_cluster), "
                          f"got {type(cluster).__name__}{hint}")
    check_limit(len(profile.units), "MAX_UNITS", where=where, what="profile units")
    check_limit(len(cluster), "MAX_CLUSTER_CARDS", where=where, what="cluster cards")
    if num_cards is not None:
        if isinstance(num_cards, bool) or not isinstance(num_cards, numbers.Integral) or num_cards < 1:
            raise ConfigError(f"{where}: num_cards must be a positive integer or None, got {num_cards!r}")
        check_limit(num_cards, "MAX_CARDS", where=where, what="num_cards")
    if allow is None:
        allow = ()
    if isinstance(allow, str):
        allow = tuple(name.strip() for name in allow.split(",") if name.strip())
    if isinstance(allow, (bytes, Mapping)) or not isinstance(allow, Iterable):
        raise ConfigError(f"{where}: allow must be technique names such as ['int8', 'int4'] or 'int8,int4', "
                          f"got {type(allow).__name__}")
    allow = tuple(allow)
    if not all(isinstance(a, str) for a in allow):
        raise ConfigError(f"{where}: allow must be technique names such as ['int8', 'int4'] or 'int8,int4', "
                          f"got {allow!r}")
    if stacking not in STACKING:
        raise ConfigError(f"{where}: stacking must be one of {', '.join(STACKING)}, got {stacking!r}")
    if isinstance(max_risk, bool) or not isinstance(max_risk, numbers.Real) or not 0 <= max_risk <= 1:
        raise ConfigError(f"{where}: max_risk must be a number in [0, 1], got {max_risk!r}")
    if config is not None and not isinstance(config, CompressionConfig):
        raise ConfigError(f"{where}: config must be a CompressionConfig or None, got {type(config).__name__}")
    if overrides is not None and not isinstance(overrides, Overrides):
        raise ConfigError(f"{where}: overrides must be an Overrides or None, got {type(overrides).__name__}")
    return allow


def _reorder(profile: ModelProfile, cluster: Cluster, num_cards: int | None, stacking: str,
             even_splits: bool = False) -> tuple[Cluster, str]:
    """The order of the mixed cluster's cards that suits the (uncompressed) units best."""
    from dataclasses import replace as _replace

    from cachefit.partition.contiguous import choose_card_order

    resident, transient = _cost_arrays(profile.units, stacking)
    try:
        got = choose_card_order(resident, cluster.capacities(), transient=transient, num_cards=num_cards,
                                exact=num_cards is not None)
    except InfeasiblePlanError:
        return _split_aware_order(profile, cluster, num_cards, stacking, even_splits)
    cards = tuple(cluster.cards[i] for i in got.order)
    how = "every distinct order tried" if got.exhaustive else f"heuristic over {got.orders_tried} orders"
    return _replace(cluster, cards=cards), f"card order chosen ({how}): {', '.join(str(i) for i in got.order)}"


# Card multisets one oversized unit's best-fit run is chosen from (bounds the enumeration)
_RUN_CANDIDATES = 4096


def _split_aware_order(profile: ModelProfile, cluster: Cluster, num_cards: int | None, stacking: str,
                       even_splits: bool) -> tuple[Cluster, str]:
    """No order of the mixed cluster's cards fits the uncompressed units whole: the order that fits
    them with splits on the fewest cards (exactly ``num_cards`` where given) among a few candidates,
    each checked exactly by :func:`cachefit.plan.layout.mixed_layout`: the given order, a best-fit
    order, largest first and smallest first (ties: the earlier). Best fit: every unit that fits no
    card whole gets the run of cards with the least capacity that holds it (split proportionally, or
    evenly over identical cards), and the units between those runs the fewest of the remaining cards,
    largest first; unused cards go last."""
    from dataclasses import replace as _replace

    table = ShardTable(profile, (), CompressionConfig(), profile.units)
    table.even_splits = even_splits
    degrees = degrees_for(profile.units, num_cards)

    def search(cards: Sequence[Card], unit_range: tuple[int, int] | None = None,
               k: int | None = num_cards) -> MixedSearch:
        return mixed_layout(table, cards, stacking, degrees, k, proportional=not even_splits,
                            unit_range=unit_range)

    given = list(cluster.cards)
    candidates: list[tuple[str, list[Card]]] = [("the given order", given)]
    fitted = _best_fit_order(profile, table, given, search, even_splits)
    if fitted is not None:
        candidates.append(("best fit for the units that fit no card whole", fitted))
    candidates.append(("largest first", sorted(given, key=lambda c: -c.capacity_bytes)))
    candidates.append(("smallest first", sorted(given, key=lambda c: c.capacity_bytes)))
    best: tuple[int, str, list[Card]] | None = None
    for name, order in candidates:
        got = search(order).layout
        if got is not None and (best is None or got.cards < best[0]):
            best = (got.cards, name, order)
    tried = ", ".join(name for name, _ in candidates)
    if best is None:
        return cluster, (f"card order kept as given: no order fits the uncompressed units whole, and with splits none "
                         f"of the orders tried ({tried}) fits them")
    _, name, order = best
    # report the chosen order as indices into the given cluster: each card the first unused index of
    # an equal card (one queue of indices per kind of card, not a scan of the cluster per card)
    kinds, kind_of = card_kinds(given)
    queues: list[deque[int]] = [deque() for _ in kinds]
    for i, kind in enumerate(kind_of):
        queues[kind].append(i)
    by_id = {id(card): kind for card, kind in zip(given, kind_of)}
    positions: list[int] = []
    for card in order:
        kind = by_id.get(id(card))
        if kind is None:
            kind = next(k for k, known in enumerate(kinds) if known == card)
        positions.append(queues[kind].popleft())
    shown = ", ".join(str(i) for i in positions[:32]) + (", ..." if len(positions) > 32 else "")
    return _replace(cluster, cards=tuple(order)), (
        f"card order chosen with splits ({name}; no order fits the units whole; tried {tried}): {shown}")


def _best_fit_order(profile: ModelProfile, table: ShardTable, cards: Sequence[Card], search, even_splits: bool
                    ) -> list[Card] | None:
    units = profile.units
    largest = max(c.capacity_bytes for c in cards)
    kinds: list[Card] = []
    for card in cards:
        if card not in kinds:
            kinds.append(card)
    pool = {i: sum(1 for c in cards if c == kind) for i, kind in enumerate(kinds)}

    def best_run(i: int) -> list[Card] | None:
        apportioner = table.apportioner(i)
        options: list[tuple[int, int, tuple[int, ...]]] = []
        counts = [0] * len(kinds)

        def walk(k: int, left: int) -> None:
            if len(options) >= _RUN_CANDIDATES:
                return
            if k == len(kinds):
                size = sum(counts)
                if size >= 2:
                    options.append((sum(n * kinds[t].capacity_bytes for t, n in enumerate(counts)), size,
                                    tuple(counts)))
                return
            for n in range(min(pool[k], left) + 1):
                counts[k] = n
                walk(k + 1, left - n)
            counts[k] = 0

        walk(0, MIXED_MAX_SHARDS)
        for _, size, vector in sorted(options):
            run = [kinds[t] for t, n in sorted(enumerate(vector), key=lambda p: -kinds[p[0]].capacity_bytes)
                   for _ in range(n)]
            if all(c == run[0] for c in run):
                got = table.get(i, size)
                if got is not None and got[0].total_bytes <= run[0].capacity_bytes:
                    return run
            elif not even_splits and apportioner.apportion(tuple(c.capacity_bytes for c in run)) is not None:
                return run
        return None

    runs: dict[int, list[Card]] = {}
    for i, unit in enumerate(units):
        if unit.total_bytes > largest:
            run = best_run(i)
            if run is None:
                return None
            runs[i] = run
            for card in run:
                pool[kinds.index(card)] -= 1
    order: list[Card] = []
    start = 0
    for stop in [*sorted(runs), len(units)]:
        if stop > start:  # units [start, stop) fit cards whole: the fewest of the rest, largest first
            rest = sorted((kinds[k] for k, n in pool.items() for _ in range(n)), key=lambda c: -c.capacity_bytes)
            got = search(rest, (start, stop), None)
            if got.layout is None:
                return None
            for card in rest[: got.layout.cards]:
                order.append(card)
                pool[kinds.index(card)] -= 1
        if stop < len(units):
            order.extend(runs[stop])
        start = stop + 1
    order.extend(sorted((kinds[k] for k, n in pool.items() for _ in range(n)), key=lambda c: -c.capacity_bytes))
    return order


def _allowed(combo: tuple[str, ...], forbidden: frozenset[str]) -> tuple[str, ...]:
    return tuple(t for t in combo if t not in forbidden) if forbidden else combo


def _with_override_cost(plan: Plan, profile: ModelProfile, cluster: Cluster, num_cards: int | None,
                        allow: Sequence[str], stacking: str, config: CompressionConfig, max_risk: float,
                        overrides: Overrides) -> Plan:
    """Say what the overrides cost against the plan without them."""
    free, _ = plan_partition(profile, cluster, num_cards=num_cards, allow=allow, stacking=stacking, config=config,
                             max_risk=max_risk)
    honoured = "; ".join(overrides.describe())
    if plan.cards != free.cards:
        cost = f"{plan.cards - free.cards:+d} card(s) ({plan.cards} vs {free.cards} without them)"
    else:
        cost = (f"largest stage {format_bytes(plan.bottleneck_bytes)} vs {format_bytes(free.bottleneck_bytes)} "
                "without them")
    from dataclasses import replace as _replace

    return _replace(plan, notes=(*plan.notes, f"overrides honoured ({honoured}); cost: {cost}"))


def _table(cards: _Cards, profile: ModelProfile, combo: tuple[str, ...], config: CompressionConfig,
           units: Sequence[Unit], shard_cache: dict[tuple[int, int], Shard]) -> ShardTable:
    table = ShardTable(profile, combo, config, units, shard_cache)
    table.keep_whole, table.forbid = cards.overrides.keep_whole, cards.overrides.forbid
    table.even_splits = cards.even_splits
    return table


def _layout(cards: _Cards, profile: ModelProfile, combo: tuple[str, ...], config: CompressionConfig,
            units: Sequence[Unit], stacking: str, shard_cache: dict[tuple[int, int], Shard]) -> Layout | None:
    """The best fitting layout for one technique set: contiguous if every unit fits a card, else with
    splits; with ``num_cards`` K, on exactly K cards (splitting units when K exceeds them)."""
    k = cards.num_cards
    if k is None or k <= len(units):
        part = _try(cards, units, stacking)
        if part is not None:
            return _layout_from_partition(part, units, stacking)
    caps = cards.capacities
    if not cards.homogeneous:
        if cards.overrides.shapes_partition:
            return None  # pins and cuts apply to plans without splits
        return _split_layouts(cards, _table(cards, profile, combo, config, units, shard_cache), stacking)
    if k is None and all(u.total_bytes <= max(caps) for u in units):
        return None  # not a unit too large for a card: splitting would not save a card
    if cards.overrides.shapes_partition:
        big = next((u for u in units if u.total_bytes > max(caps)), None)
        if big is None and k is not None and k <= len(units):
            return None
        what = (f"unit {big.name} ({format_bytes(big.total_bytes)}) fits no card whole" if big is not None
                else f"--cards {k} is more than the {len(units)} units")
        raise ConfigError(
            f"{what}, and pins / cuts apply to plans without tensor-parallel splits; drop the pins and cuts, "
            "or allow compression that makes it fit"
        )
    return _split_layouts(cards, _table(cards, profile, combo, config, units, shard_cache), stacking)


def _mixed_search(cards: _Cards, table: ShardTable, stacking: str, *, count_only: bool = False) -> MixedSearch:
    # cards of different sizes, in the given order: whole units, even splits over runs of identical
    # cards, and one unit split proportionally over consecutive cards of any kinds
    degrees = degrees_for(table.profile.units, cards.num_cards)
    return mixed_layout(table, cards.cluster.cards, stacking, degrees, cards.num_cards,
                        proportional=not cards.even_splits, count_only=count_only)


def _split_layouts(cards: _Cards, table: ShardTable, stacking: str) -> Layout | None:
    if not cards.homogeneous:
        got = _mixed_search(cards, table, stacking)
        if cards.mixed is None or got.units_placed >= cards.mixed.units_placed:
            cards.mixed = got
        return got.layout
    capacity = min(cards.capacities)
    if cards.num_cards is None:
        limit = max(max_shards(u) for u in table.profile.units)
        got = fewest_cards_layout(table, capacity, stacking, tuple(d for d in DEGREES if d <= limit))
        if got is not None and not cards.unlimited and got.cards > len(cards.cluster):
            return None
        return got
    degrees = degrees_for(table.profile.units, cards.num_cards)
    return exact_cards_layout(table, capacity, stacking, degrees, cards.num_cards)


def _revert_unneeded(
    profile: ModelProfile,
    combo: tuple[str, ...],
    config: CompressionConfig,
    compressed: list[Unit],
    cards: _Cards,
    stacking: str,
    layout: Layout,
    shard_cache: dict[tuple[int, int], Shard],
) -> Layout:
    """Undo compression on units that do not need it (smallest saving first), keeping the card count."""
    original = profile.units
    order = sorted(
        (i for i in range(len(original)) if compressed[i] is not original[i]),
        key=lambda i: original[i].total_bytes - compressed[i].total_bytes,
    )
    split = any(g.shards > 1 for g in layout.groups)
    table = _table(cards, profile, combo, config, compressed, shard_cache) if split else None
    # on mixed cards a trial needs only the card count (the walk back that builds a layout is most of
    # a search on thousands of cards): the layout of the final choice is built once, at the end
    count_only = table is not None and not cards.homogeneous
    best, changed = layout.cards, False
    for i in order:
        trial = list(compressed)
        trial[i] = original[i]
        if table is None:
            got = _try(cards, trial, stacking)
            new = _layout_from_partition(got, trial, stacking) if got is not None else None
            count = None if new is None else new.cards
        else:
            table.raw.add(i)
            if count_only:
                new, count = None, _mixed_search(cards, table, stacking, count_only=True).cards
            else:
                new = _split_layouts(cards, table, stacking)
                count = None if new is None else new.cards
        if count is not None and count <= best:
            compressed, best, changed = trial, count, True
            if new is not None:
                layout = new
        elif table is not None:
            table.raw.discard(i)
    if count_only and changed:
        final = _split_layouts(cards, table, stacking)  # type: ignore[arg-type]
        assert final is not None and final.cards == best, "the search is deterministic"
        layout = final
    return layout


class Pricing(Protocol):
    """How the cost model prices partial-fit layouts for the planner (:class:`cachefit.cost.LayoutPricing`):
    the planner searches, the cost model says what a stage takes and which finished plan is best."""

    def stage_time_s(self, start: int, units: Sequence[Unit], footprint: Footprint, shards: int,
                     collective_bytes_per_token: int, card: Card) -> float | None:
        """Predicted time of one stage (see :data:`cachefit.plan.layout.StageTime`)."""

    def choose(self, plans: Sequence[Plan]) -> Plan:
        """The best of the planner's partial plans on the same cards (it may add layouts of its own)."""

    def card_time_s(self, start: int, units: Sequence[Unit], footprint: Footprint, shards: int,
                    collective_bytes_per_token: int, card: Card) -> float | None:
        """Predicted time of one micro-batch through one card's stage alone (no transfer to the next
        stage): the time ``stage_times_s`` gives that card once the stage is in a plan."""

    def stage_times_s(self, plan: Plan) -> Sequence[float | None]:
        """Each card's predicted time per micro-batch, in plan order (:func:`cachefit.cost.estimate_cost`)."""


# Weights of time against off-chip bytes in the partial-fit variants priced by a Pricing (0: fewest
# off-chip bytes, then time; larger: more bytes for less time; see partial_layouts)
_TIME_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0, 1024.0)


def _partial_plan(profile: ModelProfile, cards: _Cards, sets: Sequence[tuple[str, ...]],
                  variants: Mapping[tuple[str, ...], tuple[Unit, ...]], config: CompressionConfig, stacking: str,
                  shard_cache: dict[tuple[int, int], Shard], pricing: Pricing | None) -> Plan:
    """No layout fits ``cards.num_cards`` cards: the layout on exactly that many with the fewest bytes
    off-chip per micro-batch, over the allowed technique sets (the least lossy among equals; never
    ``batch``); compression is undone wherever undoing it moves no more bytes off-chip. With
    ``pricing``, variants that trade bytes for time are priced too and it chooses."""
    k = cards.num_cards
    assert k is not None
    card_list = [cards.card(0)] if len(cards.cluster) == 1 else list(cards.cluster.cards[:k])
    degrees = degrees_for(profile.units, k) if cards.homogeneous else (1,)
    degrees, longest = narrow_partial_search(len(profile.units), k, degrees)
    wl = profile.workload
    best: tuple[tuple[str, ...], ShardTable, Layout] | None = None
    for combo in sets:
        if "batch" in combo or combo not in variants:
            continue
        table = _table(cards, profile, combo, config, variants[combo], shard_cache)
        got = partial_layouts(table, card_list, stacking, degrees, k, wl, max_stage_units=longest)
        if got and (best is None or got[0].offchip_bytes < best[2].offchip_bytes):
            best = (combo, table, got[0])
    if best is None and not cards.homogeneous:
        raise ConfigError(
            f"--cards {k}: the {len(profile.units)} units of {profile.model} cannot be laid out on exactly {k} of "
            "these cards of different sizes (tried whole units per card, even splits over runs of identical cards "
            f"and proportional splits of one unit over up to {MIXED_MAX_SHARDS} consecutive cards, none fitting); "
            f"use fewer cards, or --any-order"
        )
    if best is None:
        spread = sum(max_shards(u) for u in profile.units)
        raise ConfigError(
            f"--cards {k}: the {len(profile.units)} units of {profile.model} cannot be spread over exactly {k} cards "
            f"(split over every card they allow, they fill {min(spread, k)} at most"
            + (", and --even-splits allows only divisors" if cards.even_splits else "")
            + "); use fewer cards"
        )
    combo, table, layout = best
    original, compressed = profile.units, variants[combo]
    order = sorted((i for i in range(len(original)) if compressed[i] is not original[i]),
                   key=lambda i: original[i].total_bytes - compressed[i].total_bytes)
    for i in order:
        table.raw.add(i)
        new = partial_layouts(table, card_list, stacking, degrees, k, wl, max_stage_units=longest)
        if new and new[0].offchip_bytes <= layout.offchip_bytes:
            layout = new[0]
        else:
            table.raw.discard(i)
    narrowed = (f"the partial-fit search was narrowed to stages of at most {longest} units split over "
                f"{', '.join(map(str, degrees))} cards (the full space exceeds {PARTIAL_SEARCH_BUDGET:,} stage "
                "evaluations)") if longest is not None else None
    if pricing is None:
        plan = _build_plan(profile, cards, layout, combo, config, partial=True)
    else:
        layouts = partial_layouts(table, card_list, stacking, degrees, k, wl, stage_time=pricing.stage_time_s,
                                  weights=_TIME_WEIGHTS, max_stage_units=longest)
        plan = pricing.choose([_build_plan(profile, cards, lay, combo, config, partial=True) for lay in layouts])
    return dataclasses.replace(plan, notes=(*plan.notes, narrowed)) if narrowed else plan


def _cards_to_fit(profile: ModelProfile, cluster: Cluster, allow: Sequence[str], stacking: str,
                  config: CompressionConfig, max_risk: float, overrides: Overrides | None, even_splits: bool,
                  plan: Plan) -> int | None:
    """The fewest cards on which a plan fits with the same options (copies of the first card); None: none."""
    if plan.feasible and plan.cards == 1:
        return 1
    single = Cluster(cards=(cluster.cards[0],))
    try:
        fewest, _ = plan_partition(profile, single, num_cards=None, allow=allow, stacking=stacking, config=config,
                                   max_risk=max_risk, overrides=overrides, even_splits=even_splits)
    except (InfeasiblePlanError, ConfigError):
        return None
    return fewest.cards


def _partial_notes(plan: Plan, cards: _Cards) -> Plan:
    """Say that the plan does not fit, what overflows, and what a fit needs; refuse it where a card that
    overflows has no off-chip memory to stream from."""
    over = [s for s in plan.stages if s.overflow_bytes]
    total = sum(s.overflow_bytes for s in over)
    need = (f"a fit needs {plan.cards_to_fit} cards" if plan.cards_to_fit is not None
            else "no number of these cards fits")
    stranded = [s for s in over if cards.card(s.card).device.offchip_capacity_bytes is None
                and cards.card(s.card).device.offchip_bandwidth_bytes_per_s is None]
    if stranded:
        raise InfeasiblePlanError(
            f"{plan.model} does not fit {plan.cards} card(s) of {stranded[0].device} ({need}), and the cards have no "
            f"off-chip memory to stream the {format_bytes(total)} that overflow from; use --cards "
            f"{plan.cards_to_fit or 'more'} or allow more compression",
            report={"cards_needed": plan.cards_to_fit, "cards_given": plan.cards},
        )
    note = (f"DOES NOT FIT on-chip on {plan.cards} card(s) ({need}): the best partial fit, fewest bytes off-chip; "
            f"{len(over)} card(s) overflow by {format_bytes(total)} in all, streamed from off-chip memory on every "
            "micro-batch (overflow_bytes per card)")
    return replace(plan, notes=(note, *plan.notes))


def _build_plan(profile: ModelProfile, cards: _Cards, layout: Layout, combo: tuple[str, ...],
                config: CompressionConfig, *, partial: bool = False) -> Plan:
    stages = []
    for g in layout.groups:
        for r in range(g.shards):
            held = g.units if g.per_card is None else g.per_card[r]
            stages.append(stage_for(len(stages), cards.card(len(stages)), g.start, held, stacking=layout.stacking,
                                    shard=(r, g.shards) if g.shards > 1 else None,
                                    collective_bytes_per_token=g.collective_bytes_per_token,
                                    shard_parts=() if g.parts is None else g.parts[r]))
    notes = []
    if "batch" in combo:
        notes.append(
            f"batch reduced from {profile.workload.batch} to the compression config's target: the last resort, "
            "nothing else allowed fits"
        )
    compressed = sum(1 for g in layout.groups for u in g.units if u.compression)
    if compressed:
        notes.append(
            f"{compressed} of {len(profile.units)} units compressed ({', '.join(combo)}); the rest need none"
        )
    split = [g for g in layout.groups if g.shards > 1 and g.per_card is None]
    if split:
        notes.append(
            f"{len(split)} stage(s) split tensor-parallel (Megatron-style) over "
            f"{', '.join(str(d) for d in sorted({g.shards for g in split}))} cards; bytes shown are the largest shard's"
        )
    mixed = [g for g in layout.groups if g.per_card is not None]
    if mixed:
        names = ", ".join(g.units[0].name for g in mixed[:4]) + (", ..." if len(mixed) > 4 else "")
        notes.append(
            f"{len(mixed)} unit(s) ({names}) split proportionally over consecutive cards of different sizes: each "
            "card holds the heads / KV heads / MLP columns / vocabulary rows its stage's shard_parts name, and its "
            "own shard's bytes"
        )
    roles = tuple(r for r in config.quantize_roles if r not in DEFAULT_MATRIX_ROLES)
    if partial:
        objective = "fewest_offchip_bytes"
    else:
        objective = "fewest_cards" if cards.num_cards is None else "balanced"
    plan = plan_from_stages(profile, stages, objective=objective, stacking=layout.stacking, notes=notes,
                            cluster=cards.cluster)
    return replace(plan, compress_roles=roles) if roles else plan


def _mixed_infeasible(profile: ModelProfile, cards: _Cards, found: MixedSearch,
                      combo: tuple[str, ...]) -> InfeasiblePlanError:
    """No layout of a mixed cluster fits, splits included: what was tried and how far it got."""
    n, placed = len(profile.units), found.units_placed
    tried = "whole units per card, units split evenly over runs of identical cards" + (
        " (--even-splits: no proportional splits)" if cards.even_splits else
        f" and one unit split proportionally over 2 to {MIXED_MAX_SHARDS} consecutive cards of any sizes")
    unit = profile.units[min(placed, n - 1)]
    given = cards.num_cards if cards.num_cards is not None else len(cards.cluster)
    kinds = ", ".join(dict.fromkeys(f"{c.device.name} {format_bytes(c.capacity_bytes)}" for c in cards.cluster.cards))
    message = (
        f"{profile.model} on {given} cards ({kinds}) in this order"
        f"{' with ' + ','.join(combo) if combo else ''}: no layout fits; tried {tried}: they hold units "
        f'[0, {placed}) of {n} at most, unit {placed} "{unit.name}" ({format_bytes(unit.total_bytes)}) fits no run '
        "of the cards left; "
        + (f"{cards.order_note}; add or enlarge cards, or allow compression" if cards.order_note else
           "reorder the cards (--any-order), add or enlarge cards, or allow compression")
    )
    return InfeasiblePlanError(message, report={"units_placed": placed, "num_units": n, "tried": tried})


def _infeasible(
    profile: ModelProfile,
    cards: _Cards,
    variants: dict[tuple[str, ...], tuple[Unit, ...]],
    stacking: str,
) -> InfeasiblePlanError:
    """Say which unit or constraint cannot be met, and the minimal change that would fix it."""
    capacity = max(cards.capacities)
    lightest = min(variants, key=lambda c: sum(u.total_bytes for u in variants[c]))
    units = variants[lightest]
    if not cards.homogeneous and cards.mixed is not None and not cards.overrides.shapes_partition:
        return _mixed_infeasible(profile, cards, cards.mixed, lightest)
    too_big = [(i, u) for i, u in enumerate(units) if u.total_bytes > capacity]
    if too_big:
        i, unit = max(too_big, key=lambda t: t[1].total_bytes)
        fp = unit.footprint
        raw = profile.units[i]
        fixes = []
        if not lightest:
            for combo in (("int8",), ("int8", "fuse"), ("int4", "fuse"), ("int4", "sparse50", "fuse")):
                got = compress_unit(raw, combo, profile.workload)
                if got.total_bytes <= capacity:
                    fixes.append(f"allow {','.join(combo)} ({format_bytes(got.total_bytes)})")
                    break
        shards = -(-fp.weight_bytes // max(1, capacity - (fp.activation_bytes + fp.buffer_bytes)))
        if capacity > fp.activation_bytes + fp.buffer_bytes:
            fixes.append(f"split it over >= {shards} cards (tensor parallel)")
        fixes.append(f"a card with >= {format_bytes(unit.total_bytes)}")
        used = f" even with {','.join(lightest)}" if lightest else ""
        message = (
            f'unit {i} "{unit.name}" needs {format_bytes(unit.total_bytes)} (weights {format_bytes(fp.weight_bytes)} '
            f"+ activations {format_bytes(fp.activation_bytes)} + buffers {format_bytes(fp.buffer_bytes)}){used}, "
            f"but the largest card offers {format_bytes(capacity)}; " + " or ".join(fixes)
        )
        return InfeasiblePlanError(message, report={"unit": unit.name, "index": i, "bytes": unit.total_bytes,
                                                    "capacity_bytes": capacity, "fixes": fixes})
    if cards.overrides.shapes_partition:
        pins = ", ".join(sorted(set(cards.overrides.pin_source.values()) | set(cards.overrides.cut_source.values())))
        return InfeasiblePlanError(
            f"no plan of {profile.model} honours {pins} within {format_bytes(capacity)} per card"
            + (f" on {cards.num_cards} cards" if cards.num_cards else "")
            + ": a pinned card or a forced stage holds more than fits; move or drop a pin / cut, or allow compression",
            report={"overrides": pins},
        )
    if not cards.homogeneous and cards.last_error is not None:
        err = cards.last_error
        return InfeasiblePlanError(
            f"{profile.model} on the cards {', '.join(c.device.name for c in cards.cluster.cards)} in this order"
            f"{' with ' + ','.join(lightest) if lightest else ''}: {err}"
            + ("; mixed clusters are not split tensor-parallel (use identical cards to allow splits)"
               if any(u.total_bytes > min(cards.capacities) for u in units) else ""),
            report=err.report,
        )
    resident, transient = _cost_arrays(units, stacking)
    need = fewest_cards(resident, capacity, transient=transient)
    given = cards.num_cards if cards.num_cards is not None else len(cards.cluster)
    message = (
        f"{profile.model} needs {need.cards} cards of {format_bytes(capacity)} "
        f"{'with ' + ','.join(lightest) if lightest else 'uncompressed'}; {given} given: "
        f"use --cards {need.cards} or more, or allow more compression"
    )
    return InfeasiblePlanError(message, report={"cards_needed": need.cards, "cards_given": given})
