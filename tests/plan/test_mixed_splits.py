"""Units split over consecutive cards of different sizes (proportional shards), against brute force."""

import dataclasses
import functools
import json

import pytest
from hypothesis import assume, given, settings, strategies
from typer.testing import CliRunner

from cachefit.cli import app
from cachefit.errors import ConfigError, InfeasiblePlanError
from cachefit.hardware import device_from_capacity, make_cluster
from cachefit.partition.apportion import Apportioner
from cachefit.partition.split import shard_unit, shard_unit_parts
from cachefit.plan import Plan
from cachefit.plan.layout import MIXED_MAX_SHARDS
from cachefit.plan.search import plan_partition
from cachefit.profile import profile_model
from cachefit.units import Workload, stack_footprints

WL = Workload(batch=1, seq_len=4, mode="decode")
TINY = ('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 8, '
        '"vocab_size": 6, "tie_word_embeddings": false, "torch_dtype": "float16"}')
# Qwen2.5-1.5B's public config.json (the values cachefit reads)
QWEN = ('{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, '
        '"num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, '
        '"vocab_size": 151936, "tie_word_embeddings": true, "max_position_embeddings": 32768, '
        '"rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "hidden_act": "silu"}')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(TINY)
    return profile_model(str(path), WL)  # embed, layers.0, layers.1, head


def _cluster(caps):
    return make_cluster([device_from_capacity(c, name=f"c{c}") for c in caps])


def _brute_min_cards(profile, caps, *, splits=True):
    """The fewest leading cards (in the given order) holding every unit, over every layout of
    contiguous stages: whole units on one card; units split evenly over identical cards; one unit split
    over 2..MIXED_MAX_SHARDS consecutive cards not all alike, with any apportionment of its heads /
    columns / rows (exhaustive: Apportioner is itself checked against every apportionment in
    tests/partition/test_apportion.py). None: nothing fits."""
    units, n, k = profile.units, len(profile.units), len(caps)

    def stacked(us):
        return stack_footprints((u.footprint for u in us), reuse=True).total_bytes

    @functools.lru_cache(maxsize=None)
    def best(j, c):
        if j == n:
            return c
        if c == k:
            return None
        found = []
        for s in range(1, (k - c if splits else 1) + 1):
            same = all(x == caps[c] for x in caps[c:c + s])
            if same:
                for j2 in range(j + 1, n + 1):
                    try:
                        held = [u if s == 1 else shard_unit(u, s, WL).unit for u in units[j:j2]]
                    except ConfigError:
                        break
                    if stacked(held) > caps[c]:
                        break
                    got = best(j2, c + s)
                    if got is not None:
                        found.append(got)
            elif s <= MIXED_MAX_SHARDS:
                unit = units[j]
                apportioner = Apportioner(unit, lambda p, u=unit: shard_unit_parts(u, p, 2, WL).unit.total_bytes)
                if apportioner.apportion(tuple(caps[c:c + s])) is not None:
                    got = best(j + 1, c + s)
                    if got is not None:
                        found.append(got)
        return min(found, default=None)

    return best(0, 0)


def _check_plan(plan, profile, caps):
    """Stages cover every unit once, in order; every card within its capacity, its bytes recomputed."""
    assert plan.feasible
    for stage in plan.stages:
        assert stage.capacity_bytes == caps[stage.card]
        if stage.shard_parts:
            (unit,) = profile.units[stage.units[0]:stage.units[1]]
            (parts,) = stage.shard_parts
            held = shard_unit_parts(unit, parts, stage.shard[1], profile.workload).unit
            assert held.total_bytes == stage.total_bytes <= caps[stage.card]


@settings(max_examples=40, deadline=None)
@given(fractions=strategies.lists(strategies.sampled_from([20, 35, 50, 60, 80, 100, 130]), min_size=2, max_size=5))
def test_mixed_cluster_fits_exactly_when_brute_force_does(tiny, fractions):
    assume(len(set(fractions)) > 1)  # a mixed cluster (identical cards take the even path)
    layer = tiny.units[1].total_bytes
    caps = [layer * f // 100 for f in fractions]
    brute = _brute_min_cards(tiny, caps)
    whole = _brute_min_cards(tiny, caps, splits=False)
    if brute is None:
        with pytest.raises(InfeasiblePlanError):
            plan_partition(tiny, _cluster(caps))
        return
    plan, _ = plan_partition(tiny, _cluster(caps))
    _check_plan(plan, tiny, caps)
    if whole is None:  # a plan of whole units is kept where one fits; otherwise the fewest cards
        assert plan.cards == brute


def test_sixteen_layers_on_cards_that_repeat_two_thirds_one_third_one_two_thirds():
    # sixteen equal layers L on 64 cards repeating 2L/3, L/3, L, 2L/3 (the 11.2, 5.6, 16.8,
    # 11.2 MB for 16.8 MB layers): in this order no card before the third holds a layer whole, so whole
    # units fit nothing; a layer split over the first three cards (or a small and a large one) fits
    prof = profile_model("paper-16l", Workload(batch=1, seq_len=1024, mode="decode"))
    prof = dataclasses.replace(prof, units=tuple(u for u in prof.units if u.kind == "layer"))
    L = prof.units[0].total_bytes
    caps = [2 * L // 3, L // 3, L, 2 * L // 3] * 16
    plan, _ = plan_partition(prof, _cluster(caps))
    _check_plan(plan, prof, caps)
    assert plan.cards < 64
    mixed = [stage for stage in plan.stages if stage.shard_parts]
    assert mixed and len({stage.capacity_bytes for stage in mixed if stage.units == mixed[0].units}) > 1
    # heads and columns add up over each split unit's cards
    for start in {stage.units[0] for stage in mixed}:
        parts = [stage.shard_parts[0] for stage in plan.stages if stage.units[0] == start]
        assert sum(p.count("heads") for p in parts) == 32
        assert sum(p.count("mlp_columns") for p in parts) == prof.units[0].shape.intermediate_size
    # JSON round trip keeps every shard's parts and bytes
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.to_dict() == plan.to_dict()
    assert [stage.shard_parts for stage in again.stages] == [stage.shard_parts for stage in plan.stages]


def test_nothing_fits_says_what_was_tried(tiny):
    layer = tiny.units[1].total_bytes
    with pytest.raises(InfeasiblePlanError) as err:
        plan_partition(tiny, _cluster([layer // 2, layer // 10, layer // 10, layer // 10]))
    message = str(err.value)
    assert "\n" not in message
    assert "tried whole units per card" in message and "proportionally" in message
    assert 'unit 1 "layers.0"' in message and "--any-order" in message


def test_even_splits_leave_proportional_splits_out(tiny):
    layer = tiny.units[1].total_bytes
    caps = [layer * 6 // 10, layer // 2, layer * 6 // 10, layer // 2, layer * 6 // 10, layer * 6 // 10]
    plan, _ = plan_partition(tiny, _cluster(caps))
    assert any(stage.shard_parts for stage in plan.stages)
    with pytest.raises(InfeasiblePlanError, match="--even-splits"):
        plan_partition(tiny, _cluster(caps), even_splits=True)


def test_qwen2_5_1_5b_on_mi300x_b200_groq_any_order(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(QWEN)
    devices = ["mi300x"] * 12 + ["b200"] * 8 + ["groq-lpu"] * 2
    args = ["plan", str(config), *[a for d in devices for a in ("--device", d)], "--any-order", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["feasible"]
    mixed = [stage for stage in data["stages"] if stage.get("shard_parts")]
    assert mixed
    by_unit = {}
    for stage in mixed:
        by_unit.setdefault(tuple(stage["units"]), set()).add(stage["device"])
    assert any(len(kinds) > 1 for kinds in by_unit.values())  # one unit's shards on cards of different kinds
    for stage in data["stages"]:
        assert stage["total_bytes"] <= stage["capacity_bytes"]
    # without --any-order the given order is kept, and a plan is still found (even splits over runs of MI300X)
    plain = CliRunner().invoke(app, args[:-2] + ["--json"])
    assert plain.exit_code == 0, plain.output


def test_the_cost_model_prices_each_proportional_shard_as_the_slice_it_holds(tiny):
    # each card of a proportional split runs its own heads and MLP columns: more of them, more FLOPs,
    # and the FLOPs of a unit's shards add up to those of the unit (an even split's largest shard,
    # priced on every card, would count more)
    from cachefit.cost import estimate_cost

    layer = tiny.units[1].total_bytes
    caps = [layer * 6 // 10, layer // 2, layer * 6 // 10, layer // 2, layer * 6 // 10, layer * 6 // 10]
    cluster = _cluster(caps)
    plan, _ = plan_partition(tiny, cluster)
    cost = estimate_cost(plan, tiny, cluster)
    by_unit = {}
    for stage, stage_cost in zip(plan.stages, cost.stages):
        if stage.shard_parts:
            assert stage.units[1] - stage.units[0] == 1
            by_unit.setdefault(stage.units[0], []).append((stage.shard_parts[0], stage_cost.flops_per_micro_batch))
    assert by_unit
    for i, shards in by_unit.items():
        sizes = [p.count("heads") + p.count("mlp_columns") for p, _ in shards]
        flops = [f for _, f in shards]
        assert len(set(sizes)) > 1, shards  # an uneven split, as the capacities ask
        for (a, fa), (b, fb) in zip(zip(sizes, flops), zip(sizes[1:], flops[1:])):
            assert (a > b) == (fa > fb) and (a == b) == (fa == fb), shards
        held = [shard_unit_parts(tiny.units[i], p, len(shards), WL).unit.flops_per_token for p, _ in shards]
        per_token = flops[0] / held[0]  # FLOPs of a micro-batch per FLOP of one token
        assert flops == [pytest.approx(h * per_token) for h in held]
        assert sum(flops) == pytest.approx(tiny.units[i].flops_per_token * per_token, rel=0.05)


@settings(max_examples=40, deadline=None)
@given(fractions=strategies.lists(strategies.sampled_from([20, 35, 50, 60, 80, 100, 130]), min_size=2, max_size=6),
       raw=strategies.sets(strategies.integers(0, 3)), exact=strategies.booleans())
def test_counting_the_cards_of_a_mixed_layout_without_building_it_counts_the_same(tiny, fractions, raw, exact):
    # the compression search asks only how many cards a layout takes (count_only) and builds the
    # layout of its final choice once: the count must be the built layout's, for any units left raw
    from cachefit.compress.techniques import CompressionConfig, compress_unit
    from cachefit.plan.layout import ShardTable, degrees_for, mixed_layout

    assume(len(set(fractions)) > 1)
    layer = tiny.units[1].total_bytes
    cards = _cluster([layer * f // 100 for f in fractions]).cards
    compressed = [compress_unit(u, ("int8",), WL, CompressionConfig()) for u in tiny.units]
    assert any(c.total_bytes < u.total_bytes for c, u in zip(compressed, tiny.units))
    table = ShardTable(tiny, ("int8",), CompressionConfig(), compressed, {})
    table.raw = set(raw)
    num_cards = len(cards) if exact else None
    degrees = degrees_for(tiny.units, num_cards)
    built = mixed_layout(table, cards, "reuse", degrees, num_cards)
    counted = mixed_layout(table, cards, "reuse", degrees, num_cards, count_only=True)
    assert counted.layout is None and counted.units_placed == built.units_placed
    assert counted.cards == (built.layout.cards if built.layout is not None else None) == built.cards
