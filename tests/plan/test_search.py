import itertools

import pytest
from hypothesis import given, settings, strategies as st

from cachefit.compress import compress_unit
from cachefit.errors import InfeasiblePlanError
from cachefit.hardware import device_from_capacity, get_device, make_cluster
from cachefit.plan.search import plan_partition, technique_sets
from cachefit.partition.split import shard_unit
from cachefit.profile import profile_model
from cachefit.units import Footprint, ModelProfile, Unit, Workload, stack_footprints

WL = Workload(batch=1, seq_len=1024, mode="decode")


def _profile(sizes, transient=None):
    transient = transient or [0] * len(sizes)
    units = tuple(
        Unit(name=f"u{i}", kind="layer", params=s,
             footprint=Footprint(weight_bytes=s, activation_bytes=t), flops_per_token=0)
        for i, (s, t) in enumerate(zip(sizes, transient))
    )
    return ModelProfile(model="toy", workload=WL, units=units)


def _cluster(capacity, count=None):
    return make_cluster(device_from_capacity(capacity), count=count)


def _brute_fewest(sizes, transient, cap):
    n = len(sizes)
    for k in range(1, n + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            if all(sum(sizes[a:b]) + max(transient[a:b]) <= cap for a, b in zip(bounds, bounds[1:])):
                return k
    return None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 30)), min_size=1, max_size=8), st.integers(40, 120))
def test_fewest_cards_matches_brute_force_with_scratch_reuse(items, cap):
    sizes = [s for s, _ in items]
    transient = [t for _, t in items]
    want = _brute_fewest(sizes, transient, cap)
    prof = _profile(sizes, transient)
    if want is None:
        with pytest.raises(InfeasiblePlanError):
            plan_partition(prof, _cluster(cap))
        return
    plan, _ = plan_partition(prof, _cluster(cap))
    assert plan.cards == want
    assert plan.feasible
    # every stage's bytes recomputed from its units
    for stage in plan.stages:
        a, b = stage.units
        assert stage.footprint == stack_footprints(u.footprint for u in prof.units[a:b])
        assert stage.total_bytes <= stage.capacity_bytes


def test_fixed_card_count_uses_exactly_k_cards_balanced():
    prof = _profile([10, 10, 10, 10, 10, 10])
    plan, _ = plan_partition(prof, _cluster(100), num_cards=3)
    assert plan.cards == 3 and [s.units for s in plan.stages] == [(0, 2), (2, 4), (4, 6)]
    assert plan.objective == "balanced"


def test_too_few_cards_names_the_count_needed():
    prof = _profile([30, 30, 30, 30])
    with pytest.raises(InfeasiblePlanError, match="needs 2 cards"):
        plan_partition(prof, _cluster(60), num_cards=1)


def test_unit_larger_than_any_card_is_named_with_its_bytes():
    prof = _profile([10, 500, 10])
    with pytest.raises(InfeasiblePlanError, match='unit 1 "u1" needs 500 B') as info:
        plan_partition(prof, _cluster(100))
    assert info.value.report["unit"] == "u1"


def test_paper_model_on_h100_fits_with_splits_and_every_card_recomputes():
    prof = profile_model("paper-16l", WL)
    cluster = make_cluster(get_device("h100"))
    plan, candidates = plan_partition(prof, cluster)
    assert plan.feasible and candidates[0].techniques == ()
    cap = cluster.cards[0].capacity_bytes
    for stage in plan.stages:
        a, b = stage.units
        units = prof.units[a:b]
        if stage.shard:
            units = [shard_unit(u, stage.shard[1], WL).unit for u in units]
        assert stage.footprint == stack_footprints(u.footprint for u in units)
        assert stage.total_bytes <= cap
    # the whole layer (419.6 MB in decode) cannot sit on one 52.4 MB L2: every layer is split
    assert all(s.shard for s in plan.stages)
    covered = sorted({s.units for s in plan.stages})
    assert covered[0][0] == 0 and covered[-1][1] == len(prof.units)


def test_compression_is_applied_only_where_needed():
    prof = profile_model("gpt2", Workload(batch=1, seq_len=128, mode="decode"))
    # a card just large enough for the largest unit (the 50257 x 768 embedding): no split needed,
    # and int8 on some layers saves cards
    cap = max(u.total_bytes for u in prof.units)
    cluster = make_cluster(device_from_capacity(cap))
    plan, _ = plan_partition(prof, cluster, allow=["int8"])
    assert plan.feasible
    compressed = {
        name for stage in plan.stages for name, techs in zip(stage.unit_names, stage.unit_compression) if techs
    }
    assert compressed and len(compressed) < len(prof.units)
    assert not any(s.shard for s in plan.stages)
    uncompressed, _ = plan_partition(prof, cluster)
    assert plan.cards < uncompressed.cards
    # each compressed unit is needed: undoing it alone costs a card (or no longer fits)
    units = [compress_unit(u, ["int8"], prof.workload) if u.name in compressed else u for u in prof.units]
    for i, unit in enumerate(prof.units):
        if unit.name not in compressed:
            continue
        trial = list(units)
        trial[i] = unit
        try:
            again, _ = plan_partition(
                ModelProfile(model="t", workload=prof.workload, units=tuple(trial)), cluster
            )
        except InfeasiblePlanError:
            continue
        assert again.cards > plan.cards


def test_batch_reduction_is_a_last_resort():
    sets = technique_sets(["batch", "int8", "fuse"])
    assert sets[0] == ()
    first_batch = next(i for i, c in enumerate(sets) if "batch" in c)
    assert all("batch" in c for c in sets[first_batch:])
    assert ("int4", "int8") not in sets


def test_more_capacity_never_needs_more_cards():
    prof = profile_model("gpt2", WL)
    counts = []
    for cap in ("30MB", "60MB", "120MB", "240MB"):
        plan, _ = plan_partition(prof, _cluster(cap))
        counts.append(plan.cards)
    assert counts == sorted(counts, reverse=True)


def test_mixed_cluster_card_order_is_chosen_when_cards_are_interchangeable():
    from cachefit.hardware import get_device

    prof = profile_model("gpt2", WL)
    devices = [get_device(n) for n in ("h100", "mi300x", "mi300x", "a100")]
    cluster = make_cluster(devices)
    with pytest.raises(InfeasiblePlanError, match="in this order"):
        plan_partition(prof, cluster)  # the 78.8 MB embedding fits no H100 L2 (52.4 MB) on card 0
    plan, _ = plan_partition(prof, cluster, reorder_cards=True)
    assert plan.feasible and plan.cards == 2
    assert set(plan.devices) == {"mi300x"}
    assert any("card order chosen" in n for n in plan.notes)


def test_even_splits_divide_heads_columns_and_vocabulary():
    prof = profile_model("paper-16l", WL)
    cluster = make_cluster(get_device("h100"))
    free, _ = plan_partition(prof, cluster)
    even, _ = plan_partition(prof, cluster, even_splits=True)
    assert even.feasible and even.cards >= free.cards
    assert any(s.shard and 32 % s.shard[1] for s in free.stages)  # the free plan splits 9 ways somewhere
    for stage in even.stages:
        if stage.shard:
            n = stage.shard[1]
            assert 32 % n == 0 and 16384 % n == 0 and 32000 % n == 0
