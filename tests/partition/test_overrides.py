import itertools

import pytest
from hypothesis import given, settings, strategies as st

from cachefit.errors import ConfigError, InfeasiblePlanError
from cachefit.hardware import device_from_capacity, make_cluster
from cachefit.partition.overrides import (
    Overrides,
    ResolvedOverrides,
    constrained_partition,
    parse_forbid,
    parse_pin,
    resolve_overrides,
)
from cachefit.plan.search import plan_partition
from cachefit.profile import profile_model
from cachefit.units import Workload

WL = Workload(batch=1, seq_len=128, mode="decode")


def _brute(sizes, cap, num_cards, pins, cuts):
    """Every cut set: the feasible partitions honouring pins and cuts; best by (cards, largest part)."""
    n = len(sizes)
    best = None
    for k in range(1, n + 1):
        if num_cards is not None and k != num_cards:
            continue
        for inner in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *inner, n)
            if not cuts <= set(inner):
                continue
            parts = list(zip(bounds, bounds[1:]))
            if any(sum(sizes[a:b]) > cap for a, b in parts):
                continue
            if any(c >= len(parts) or not parts[c][0] <= u < parts[c][1] for u, c in pins.items()):
                continue
            key = (k, max(sum(sizes[a:b]) for a, b in parts))
            if best is None or key < best:
                best = key
        if best is not None and num_cards is None:
            break
    return best


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(1, 20), min_size=2, max_size=8),
    st.integers(20, 60),
    st.data(),
)
def test_constrained_partition_matches_brute_force(sizes, cap, data):
    n = len(sizes)
    num_cards = data.draw(st.one_of(st.none(), st.integers(1, n)))
    cuts = set(data.draw(st.lists(st.integers(1, n - 1), max_size=2)))
    pin_units = data.draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True))
    pins = {u: data.draw(st.integers(0, 3)) for u in pin_units}
    got = constrained_partition(sizes, None, [cap] * (num_cards or n), num_cards=num_cards,
                                overrides=ResolvedOverrides(pins=pins, cuts=frozenset(cuts)))
    want = _brute(sizes, cap, num_cards, pins, cuts)
    if want is None:
        assert got is None
        return
    assert got is not None
    assert (len(got), max(sum(sizes[a:b]) for a, b in got)) == want
    bounds = {b for _, b in got}
    assert cuts <= bounds
    for u, c in pins.items():
        a, b = got[c]
        assert a <= u < b


def test_pins_and_cuts_are_honoured_and_their_cost_reported():
    prof = profile_model("gpt2", WL)
    cluster = make_cluster(device_from_capacity("100MB"))
    plan, _ = plan_partition(prof, cluster, overrides=Overrides(pins=(("layers.0-3", 1),), cut_after=("layers.7",)))
    names = {s.card: s.unit_names for s in plan.stages}
    assert {"layers.0", "layers.1", "layers.2", "layers.3"} <= set(names[1])
    assert any(s.unit_names[-1] == "layers.7" for s in plan.stages)
    assert any("overrides honoured" in n and "cost" in n for n in plan.notes)


def test_forbidden_technique_is_never_applied():
    prof = profile_model("gpt2", WL)
    cluster = make_cluster(device_from_capacity("60MB"))
    allow = ["int8"]
    plan, _ = plan_partition(prof, cluster, allow=allow, overrides=Overrides(forbid=(("layers.0-5", ("int8",)),)))
    for stage in plan.stages:
        for name, techs in zip(stage.unit_names, stage.unit_compression):
            if name in {f"layers.{i}" for i in range(6)}:
                assert "int8" not in techs


def test_keep_whole_forbids_splitting():
    prof = profile_model("gpt2", WL)
    cluster = make_cluster(device_from_capacity("60MB"))
    plan, _ = plan_partition(prof, cluster)  # the 78.8 MB embedding must be split
    assert any(s.shard for s in plan.stages)
    with pytest.raises(InfeasiblePlanError):
        plan_partition(prof, cluster, overrides=Overrides(keep_whole=("embed", "head")))


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (Overrides(pins=(("layers.0", 1), ("layers.1", 0))), "collide"),
        (Overrides(pins=(("layers.0-1", 1),), cut_after=("layers.0",)), "--cut-after layers.0 and --pin"),
        (Overrides(pins=(("layers.0", 0), ("layers.1", 3))), "would hold no unit"),
        (Overrides(pins=(("nope", 0),)), "no unit matches"),
        (Overrides(forbid=(("head", ("int9",)),)), "int9"),
    ],
)
def test_colliding_overrides_name_both(overrides, needle):
    prof = profile_model("gpt2", WL)
    with pytest.raises(Exception, match=needle) as info:
        resolve_overrides(prof, overrides)
    assert info.value.exit_code == 2


def test_pin_beyond_the_cards_given():
    prof = profile_model("gpt2", WL)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_overrides(prof, Overrides(pins=(("head", 5),)), num_cards=3)


def test_parsers():
    assert parse_pin("layers.0-3=0") == ("layers.0-3", 0)
    assert parse_forbid("head:int8,int4") == ("head", ("int8", "int4"))
    for bad in ("layers.0", "=1", "layers.0=x", "layers.0=-1"):
        with pytest.raises(ConfigError):
            parse_pin(bad)
    with pytest.raises(ConfigError):
        parse_forbid("head")
