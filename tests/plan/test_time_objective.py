"""The time objective (``plan_partition(..., objective="time")``) against exact references.

Two references, both enumerating every contiguous partition of the units into exactly K stages:

* toy units with given bytes and a made-up stage time that is not a sum over units (a max of two
  terms plus a per-unit cost, scaled by the card), on uniform and mixed cards;
* a real model (GPT-2) timed by the real cost model: every candidate is built as a plan and priced
  with :func:`cachefit.cost.estimate_cost`, independently of the planner's incremental stage sums.

The optimum is the smallest bottleneck stage time, then the smallest largest stage in bytes.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit.cost import LayoutPricing, compare_layouts, estimate_cost
from cachefit.errors import ConfigError, InfeasiblePlanError
from cachefit.hardware import device_from_capacity, get_device, make_cluster
from cachefit.plan import plan_from_stages, plan_partition, stage_for
from cachefit.profile import profile_model
from cachefit.units import Footprint, ModelProfile, Unit, Workload, stack_footprints

WL = Workload(batch=1, seq_len=1024, mode="decode")


def _profile(items):
    units = tuple(
        Unit(name=f"u{i}", kind="layer", params=s, footprint=Footprint(weight_bytes=s, activation_bytes=t),
             flops_per_token=f)
        for i, (s, t, f) in enumerate(items)
    )
    return ModelProfile(model="toy", workload=WL, units=units)


def _toy_time(units, card) -> float:
    """Not a sum over units: the larger of a FLOP and a byte term, plus a fixed cost per unit, on a
    card whose speed grows with its capacity (so a mixed cluster times a stage by where it lands)."""
    flops = sum(u.flops_per_token for u in units)
    nbytes = sum(u.footprint.weight_bytes for u in units)
    speed = card.capacity_bytes / 100
    return (max(flops, 2 * nbytes) + 3 * len(units)) / speed


class ToyPricing:
    """A stand-in for the cost model's :class:`LayoutPricing` with :func:`_toy_time` as stage time."""

    def __init__(self, profile, cluster):
        self.profile, self.cluster = profile, cluster

    def card_time_s(self, start, units, footprint, shards, collective_bytes_per_token, card):
        return _toy_time(units, card)

    def stage_time_s(self, start, units, footprint, shards, collective_bytes_per_token, card):
        return _toy_time(units, card)

    def stage_times_s(self, plan):
        cards = self.cluster.cards
        return tuple(_toy_time(self.profile.units[s.units[0]:s.units[1]], cards[0] if len(cards) == 1 else cards[i])
                     for i, s in enumerate(plan.stages))

    def choose(self, plans):
        return plans[0]


def _compositions(n, k):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield list(itertools.pairwise(bounds))


def _brute_force(units, cards, k, time_of):
    """(bottleneck time, largest stage bytes) over every partition into exactly k stages that fits;
    None if none fits. ``time_of(parts)`` times each stage of a partition."""
    best = None
    for parts in _compositions(len(units), k):
        sizes = [stack_footprints(u.footprint for u in units[a:b]).total_bytes for a, b in parts]
        if any(size > cards[c].capacity_bytes for c, size in enumerate(sizes)):
            continue
        key = (max(time_of(parts)), max(sizes))
        best = key if best is None or key < best else best
    return best


def _fewest(units, cards_for, n):
    for k in range(1, n + 1):
        cards = cards_for(k)
        if cards is None:
            return None
        for parts in _compositions(n, k):
            if all(stack_footprints(u.footprint for u in units[a:b]).total_bytes <= cards[c].capacity_bytes
                   for c, (a, b) in enumerate(parts)):
                return k
    return None


ITEMS = st.lists(st.tuples(st.integers(1, 40), st.integers(0, 20), st.integers(0, 120)), min_size=1, max_size=8)


@settings(max_examples=80, deadline=None)
@given(ITEMS, st.integers(30, 100), st.integers(1, 8))
def test_time_objective_on_k_equal_cards_matches_brute_force(items, cap, k):
    prof = _profile(items)
    k = min(k, len(items))
    cluster = make_cluster(device_from_capacity(cap))
    units = prof.units
    want = _brute_force(units, [cluster.cards[0]] * k, k,
                        lambda parts: [_toy_time(units[a:b], cluster.cards[0]) for a, b in parts])
    pricing = ToyPricing(prof, cluster)
    if want is None:  # nothing fits exactly k cards: a partial fit, or refused for lack of off-chip memory
        try:
            plan, _ = plan_partition(prof, cluster, num_cards=k, objective="time", pricing=pricing)
        except InfeasiblePlanError:
            return
        assert not plan.feasible
        return
    plan, _ = plan_partition(prof, cluster, num_cards=k, objective="time", pricing=pricing)
    assert plan.feasible and plan.cards == k and plan.objective == "min_time"
    got = (max(s.predicted_time_s for s in plan.stages), plan.bottleneck_bytes)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    assert got[1] == want[1]
    for stage in plan.stages:  # every stage within its card, its bytes recomputed from its units
        a, b = stage.units
        assert stage.footprint == stack_footprints(u.footprint for u in units[a:b])
        assert stage.fits


@settings(max_examples=80, deadline=None)
@given(ITEMS, st.lists(st.integers(20, 120), min_size=1, max_size=8))
def test_time_objective_on_the_fewest_mixed_cards_in_order_matches_brute_force(items, caps):
    """A fixed mixed cluster: the fewest of its cards in order that fit, then the fastest layout on them
    (a cluster of one card stands for as many copies of it as needed)."""
    prof = _profile(items)
    units = prof.units
    devices = [device_from_capacity(c, name=f"card{c}") for c in caps]
    cluster = make_cluster(devices)

    def cards_for(k):
        if len(cluster) == 1:
            return [cluster.cards[0]] * k
        return list(cluster.cards[:k]) if k <= len(cluster) else None

    k = _fewest(units, cards_for, len(units))
    pricing = ToyPricing(prof, cluster)
    if k is None:
        with pytest.raises(InfeasiblePlanError):
            plan_partition(prof, cluster, objective="time", pricing=pricing)
        return
    cards = cards_for(k)
    want = _brute_force(units, cards, k, lambda parts: [_toy_time(units[a:b], cards[c]) for c, (a, b) in enumerate(parts)])
    plan, _ = plan_partition(prof, cluster, objective="time", pricing=pricing)
    cards_plan, _ = plan_partition(prof, cluster, pricing=pricing)
    assert plan.cards == cards_plan.cards == k
    assert max(s.predicted_time_s for s in plan.stages) == pytest.approx(want[0], rel=1e-12)
    assert plan.bottleneck_bytes == want[1]
    # never slower than the layout the cards objective picks on the same cards
    assert max(s.predicted_time_s for s in plan.stages) <= max(s.predicted_time_s for s in cards_plan.stages) * (1 + 1e-12)
    assert all(s.fits for s in plan.stages)


def test_the_time_objective_moves_a_cut_the_byte_objective_keeps():
    # bytes 10, 10, 10, 10 (balanced by bytes: [0, 2) [2, 4)); unit 3 is FLOP-heavy (the LM head):
    # toy stage times max(flops, 2 x bytes) + 3 x units (the card's speed is 1): [0, 2) 40 + 6 = 46,
    # [2, 4) 400 + 6 = 406; the fastest layout puts it alone: [0, 3) 60 + 9 = 69, [3, 4) 400 + 3 = 403
    prof = _profile([(10, 0, 0), (10, 0, 0), (10, 0, 0), (10, 0, 400)])
    cluster = make_cluster(device_from_capacity(100))
    pricing = ToyPricing(prof, cluster)
    by_bytes, _ = plan_partition(prof, cluster, num_cards=2, pricing=pricing)
    by_time, _ = plan_partition(prof, cluster, num_cards=2, pricing=pricing, objective="time")
    assert [s.units for s in by_bytes.stages] == [(0, 2), (2, 4)]
    assert [s.units for s in by_time.stages] == [(0, 3), (3, 4)]
    assert [s.predicted_time_s for s in by_bytes.stages] == [46.0, 406.0]
    assert [s.predicted_time_s for s in by_time.stages] == [69.0, 403.0]
    assert by_bytes.objective == "balanced" and by_time.objective == "min_time"


def test_time_objective_needs_the_cost_model_and_a_known_objective():
    prof = _profile([(10, 0, 0), (10, 0, 0)])
    cluster = make_cluster(device_from_capacity(100))
    with pytest.raises(ConfigError, match="pricing=cachefit.cost.LayoutPricing"):
        plan_partition(prof, cluster, objective="time")
    with pytest.raises(ConfigError, match="objective must be one of cards, time"):
        plan_partition(prof, cluster, objective="speed", pricing=ToyPricing(prof, cluster))


def test_unknown_device_figures_are_a_clear_error_not_a_guess():
    # a bare capacity device has no peak FLOP/s nor bandwidths: the cost model cannot time a stage
    prof = profile_model("gpt2", Workload(batch=1, seq_len=128, mode="decode"))
    cluster = make_cluster(device_from_capacity("1GB"))
    with pytest.raises(ConfigError, match="cannot time embed on device custom: a figure it needs"):
        plan_partition(prof, cluster, num_cards=2, objective="time", pricing=LayoutPricing(prof, cluster))


# ---------------------------------------------------------------------------------------------
# With the real cost model


def _gpt2(batch=8, seq=256, mode="prefill"):
    return profile_model("gpt2", Workload(batch=batch, seq_len=seq, mode=mode))


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("capacity", ["2GB", "700MB"])
def test_time_objective_with_the_cost_model_matches_brute_force_over_priced_plans(k, capacity):
    prof = _gpt2()
    device = device_from_capacity(capacity, level="l2", base=get_device("h100"))
    cluster = make_cluster(device)
    pricing = LayoutPricing(prof, cluster)
    card = cluster.cards[0]
    units = prof.units

    def priced(parts):
        stages = [stage_for(c, card, a, units[a:b], stacking="reuse") for c, (a, b) in enumerate(parts)]
        plan = plan_from_stages(prof, stages, objective="balanced", stacking="reuse")
        return [s.time_s for s in estimate_cost(plan, prof, cluster).stages]

    want = _brute_force(units, [card] * k, k, priced)
    assert want is not None
    plan, _ = plan_partition(prof, cluster, num_cards=k, pricing=pricing, objective="time")
    times = [s.predicted_time_s for s in plan.stages]
    assert max(times) == pytest.approx(want[0], rel=1e-12)
    assert plan.bottleneck_bytes == want[1]
    # predicted_time_s is what the cost model gives the plan's cards
    assert times == [s.time_s for s in estimate_cost(plan, prof, cluster).stages]
    by_bytes, _ = plan_partition(prof, cluster, num_cards=k, pricing=pricing)
    assert max(times) <= max(s.predicted_time_s for s in by_bytes.stages)


def test_predicted_times_equal_what_compare_reports():
    prof = _gpt2()
    cluster = make_cluster(device_from_capacity("1GB", level="l2", base=get_device("h100")))
    for objective in ("cards", "time"):
        comparison = compare_layouts(prof, cluster, 3, objective=objective)
        own = comparison.layout("cachefit")
        assert [s.predicted_time_s for s in own.plan.stages] == own.to_dict()["card_times_s"]
        assert own.plan.objective == ("min_time" if objective == "time" else "balanced")


def test_split_stages_are_timed_too_and_never_slower():
    # Llama-3.1-8B in decode on H100 L2: units must be split; the time objective keeps the cards
    prof = profile_model("llama-3.1-8b", Workload(batch=1, seq_len=2048, mode="decode"))
    cluster = make_cluster(get_device("h100"))
    pricing = LayoutPricing(prof, cluster)
    by_bytes, _ = plan_partition(prof, cluster, allow=["int8"], pricing=pricing)
    by_time, _ = plan_partition(prof, cluster, allow=["int8"], pricing=pricing, objective="time")
    assert by_time.cards == by_bytes.cards and by_time.feasible
    assert any(s.shard for s in by_time.stages)
    t_time = max(s.predicted_time_s for s in by_time.stages)
    t_bytes = max(s.predicted_time_s for s in by_bytes.stages)
    assert t_time <= t_bytes
    assert [s.predicted_time_s for s in by_time.stages] == [s.time_s for s in pricing.price(by_time).stages]


def test_predicted_time_round_trips_through_json_and_is_null_without_the_cost_model():
    from cachefit.plan import Plan

    prof = _gpt2()
    cluster = make_cluster(device_from_capacity("1GB", level="l2", base=get_device("h100")))
    plan, _ = plan_partition(prof, cluster, num_cards=2, pricing=LayoutPricing(prof, cluster), objective="time")
    back = Plan.from_dict(plan.to_dict())
    assert [s.predicted_time_s for s in back.stages] == [s.predicted_time_s for s in plan.stages]
    assert all(isinstance(s.to_dict()["predicted_time_s"], float) for s in plan.stages)
    bare, _ = plan_partition(prof, cluster, num_cards=2)
    assert all(s.to_dict()["predicted_time_s"] is None for s in bare.stages)
    doc = plan.to_dict()
    doc["stages"][0]["predicted_time_s"] = -1.0
    with pytest.raises(ConfigError, match="predicted_time_s"):
        Plan.from_dict(doc)
    assert math.isfinite(back.stages[0].predicted_time_s)
