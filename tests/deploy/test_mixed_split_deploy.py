"""Proportional splits deployed: a unit split over consecutive cards of different sizes, each card
holding the ranges its plan stage's ``shard_parts`` record, against the unsplit model.

The planner (``cachefit.partition.apportion``) gives each card the heads / MLP columns / vocabulary
rows in proportion to what it holds; deploy cuts each card's tensors along those ranges, unpadded, so
every card holds exactly its own planned weight bytes and is measured against its own capacity.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import WORKLOAD, check_shard_gradients, padded_inputs, save_models

from cachefit.deploy.models import inspect_model_dir
from cachefit.deploy.run_report import _stages
from cachefit.deploy.runtime import NodeConfig, RunConfig, launch
from cachefit.deploy.stages import layout_from_plan
from cachefit.deploy.tensor_parallel import (
    part_ranges,
    split_heads_from_parts,
)
from cachefit.deploy.verify import check_run
from cachefit.errors import ConfigError
from cachefit.hardware import device_from_capacity, make_cluster
from cachefit.partition.split import ShardParts
from cachefit.plan.search import plan_partition
from cachefit.profile import profile_model


def _configs():
    return {
        # 8 heads in 4 KV groups of 2, hidden 64, MLP 96, vocabulary 96
        "llama": transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=64),
        # 8 heads in 2 KV groups of 4: a group's heads can lie on two cards, each with a copy of its KV head
        "llama_g2": transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=64),
        # a fused q/k/v Conv1D (stored (in, out)) and a tied LM head
        "gpt2": transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=8, n_positions=64,
                                        bos_token_id=0, eos_token_id=0),
    }


_CLASSES = {"llama": "LlamaForCausalLM", "llama_g2": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.fixture(scope="module")
def mixed_dirs(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("mixed"), _configs(), _CLASSES, seed=200)


def _mixed_plan(model_dir, fractions):
    """The fewest-card plan on cards of ``fractions`` of the model's one layer's bytes (named by size)."""
    profile = profile_model(model_dir, WORKLOAD)
    layer = next(u for u in profile.units if u.kind == "layer").total_bytes
    caps = [int(layer * f) for f in fractions]
    plan, _ = plan_partition(profile, make_cluster([device_from_capacity(c, name=f"c{c}") for c in caps]))
    return plan


def _split_groups(plan):
    """{units: [stage, ...]} of the plan's proportionally split units."""
    groups: dict[tuple[int, int], list] = {}
    for st in plan.stages:
        if st.shard_parts:
            groups.setdefault(st.units, []).append(st)
    return groups


def _kv_shared(parts):
    """Some KV head is held by several cards (a group's query heads on more than one card)."""
    held = [k for p in parts if p.kv_heads for k in range(*p.kv_heads)]
    return len(held) > len(set(held))


def _unequal(parts, name):
    return len({p.count(name) for p in parts}) > 1


# (model, card sizes as fractions of its layer's bytes, what the plan's proportional splits must show).
# The ranges are the planner's (today, e.g. for the first case, heads 4 + 2 + 2 and MLP columns
# 44 + 10 + 42); the test asks for the property, not the numbers, so a change in the planner's byte
# counts keeps it meaningful: if a property fails, pick fractions that bring it back.
_CASES = [
    # the layer over three cards of different sizes, heads in whole KV groups
    ("llama", (0.6, 0.6, 0.3, 0.5, 0.5), {"layers.0": ("heads", "mlp_columns")}),
    # the embedding, the layer and the LM head each split over two cards of different sizes
    ("llama", (0.2, 0.15, 0.7, 0.5, 0.2, 0.7), {"embed": ("vocab",), "layers.0": ("mlp_columns",),
                                                "head": ("vocab",)}),
    # 8 heads in 2 KV groups: one group's heads on two cards, each with a copy of its KV head
    ("llama_g2", (0.6, 0.6, 0.3, 0.5, 0.5), {"layers.0": ("heads", "mlp_columns", "shared_kv")}),
    # GPT-2's fused q/k/v Conv1D by unequal head ranges
    ("gpt2", (0.25, 0.6, 0.5, 0.5, 0.6, 0.3), {"layers.0": ("heads", "mlp_columns")}),
]
_IDS = ["llama-layer", "llama-vocab-and-layer", "llama-shared-kv", "gpt2-layer"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name,fractions,wanted", _CASES, ids=_IDS)
def test_proportional_split_matches_unsplit(mixed_dirs, name, fractions, wanted):
    model_dir = mixed_dirs[name]
    config = _configs()[name]
    plan = _mixed_plan(model_dir, fractions)
    groups = {stages[0].unit_names[0]: stages for stages in _split_groups(plan).values()}
    shown = [(st.card, st.unit_names, st.capacity_bytes, [p.to_dict() for p in st.shard_parts]) for st in plan.stages]
    assert set(groups) == set(wanted), shown
    for unit, stages in groups.items():
        parts = [st.shard_parts[0] for st in stages]
        assert len({st.capacity_bytes for st in stages}) > 1, shown
        assert len({st.footprint.weight_bytes for st in stages}) > 1, shown
        for prop in wanted[unit]:
            assert _kv_shared(parts) if prop == "shared_kv" else _unequal(parts, prop), (unit, prop, shown)
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    ids, mask = padded_inputs(batch=4, vocab=config.vocab_size)
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=layout.world_size),
                    config=RunConfig(micro_batches=2), input_ids=ids, attention_mask=mask, launcher="fork")
    by_card = {st.card: st for st in plan.stages}
    for stage in result.report["stages"]:
        for shard in stage["shards"]:
            planned = by_card[shard["rank"]]
            # each card holds its own planned weight bytes, and is measured against its own capacity
            assert shard["measured_weight_bytes"] == shard["planned_weight_bytes"] == planned.footprint.weight_bytes
            assert shard["capacity_bytes"] == planned.capacity_bytes
            assert shard["planned_total_bytes"] == planned.footprint.total_bytes
    assert result.outputs.shape == (4, 8, config.vocab_size)
    verdict = check_run(result, model_dir, layout=layout)
    assert verdict.passed and verdict.comparisons[0].max_rel_error <= 1e-5, verdict.describe()


# ---- refused before launch: one-line ConfigErrors -----------------------------------------------


def _with_parts(plan, units, parts):
    """``plan`` with the shard_parts of the stages splitting ``units`` replaced, card by card."""
    cards = iter(parts)
    stages = tuple(dataclasses.replace(st, shard_parts=(next(cards),)) if st.units == units and st.shard_parts
                   else st for st in plan.stages)
    return dataclasses.replace(plan, stages=stages)


def _refused(plan, model_dir):
    with pytest.raises(ConfigError) as err:
        layout_from_plan(plan, inspect_model_dir(model_dir))
    message = str(err.value)
    assert "\n" not in message
    return message


def _layer_split(model_dir, fractions):
    plan = _mixed_plan(model_dir, fractions)
    units, stages = next((u, st) for u, st in _split_groups(plan).items() if st[0].unit_names == ("layers.0",))
    return plan, units, [st.shard_parts[0] for st in stages], stages


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["llama-shared-kv", "gpt2-layer"])
def test_proportional_split_trains_like_unsplit(mixed_dirs, case):
    # a training step through shards of different sizes: losses and every gradient as the unsplit
    # model's (a KV head two cards hold counted once, GPT-2's fused q/k/v by unequal head ranges)
    name, fractions, _ = _CASES[_IDS.index(case)]
    model_dir = mixed_dirs[name]
    plan = _mixed_plan(model_dir, fractions)
    assert any(st.shard_parts for st in plan.stages)
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    ids, mask = padded_inputs(batch=4, vocab=_configs()[name].vocab_size)
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=layout.world_size), launcher="fork",
                    config=RunConfig(micro_batches=2, mode="train", save_grads=True), input_ids=ids,
                    attention_mask=mask)
    verdict = check_run(result, model_dir, layout=layout, mode="train", micro_batches=2)
    assert verdict.passed, verdict.describe()
    assert {c.what for c in verdict.comparisons} >= {"losses", "gradients"}


def test_ranges_that_do_not_cover_a_dimension_are_refused(mixed_dirs):
    plan, units, parts, _ = _layer_split(mixed_dirs["llama"], _CASES[0][1])
    start, end = parts[1].mlp_columns
    gap = [parts[0], dataclasses.replace(parts[1], mlp_columns=(start + 1, end)), *parts[2:]]
    message = _refused(_with_parts(plan, units, gap), mixed_dirs["llama"])
    assert "mlp_columns" in message and f"card 1 should start at {start}" in message and "layers.0" in message


def test_a_card_whose_parts_are_not_its_planned_bytes_is_refused(mixed_dirs):
    # the first two cards' MLP column counts exchanged: the ranges still cover every column, but
    # neither card then holds the bytes the plan gives it
    plan, units, parts, stages = _layer_split(mixed_dirs["llama"], _CASES[0][1])
    first, second = parts[0].count("mlp_columns"), parts[1].count("mlp_columns")
    assert first != second
    swapped = [dataclasses.replace(parts[0], mlp_columns=(0, second)),
               dataclasses.replace(parts[1], mlp_columns=(second, first + second)), *parts[2:]]
    message = _refused(_with_parts(plan, units, swapped), mixed_dirs["llama"])
    assert f"card {stages[0].card}" in message and "re-plan" in message


def test_heads_that_cut_a_group_beside_another_are_refused(mixed_dirs):
    # 8 heads in 2 groups of 4: heads [3, 6) would read both KV heads while holding only part of each
    plan, units, parts, _ = _layer_split(mixed_dirs["llama_g2"], _CASES[2][1])
    assert len(parts) == 3
    heads = [((0, 3), (0, 1)), ((3, 6), (0, 2)), ((6, 8), (1, 2))]
    bad = [dataclasses.replace(p, heads=h, kv_heads=kv) for p, (h, kv) in zip(parts, heads)]
    message = _refused(_with_parts(plan, units, bad), mixed_dirs["llama_g2"])
    assert "cut a group" in message and "card 1" in message


def test_shard_parts_on_some_cards_of_a_split_only_are_refused(mixed_dirs):
    plan, units, parts, _ = _layer_split(mixed_dirs["llama"], _CASES[0][1])
    first = next(k for k, st in enumerate(plan.stages) if st.units == units)
    stages = list(plan.stages)
    stages[first] = dataclasses.replace(stages[first], shard_parts=())
    message = _refused(dataclasses.replace(plan, stages=tuple(stages)), mixed_dirs["llama"])
    assert f"shard_parts are given for {len(parts) - 1} of its {len(parts)} card(s)" in message


# ---- how ranges become each card's heads (no processes) -------------------------------------------


def test_head_ranges_give_each_card_the_kv_heads_its_query_heads_read():
    parts = [ShardParts(heads=(0, 3)), ShardParts(heads=(3, 4)), ShardParts(heads=(4, 8))]
    split = split_heads_from_parts(8, 2, parts)
    assert split.query == ((0, 1, 2), (3,), (4, 5, 6, 7)) and split.kv == ((0,), (0,), (1,))
    assert [split.slots(r) for r in range(3)] == [(3, 1), (1, 1), (4, 1)]  # unpadded
    assert split.shared_kv  # KV head 0 on cards 0 and 1
    whole = split_heads_from_parts(8, 4, [ShardParts(heads=(0, 4)), ShardParts(heads=(4, 8))])
    assert whole.kv == ((0, 1), (2, 3)) and not whole.shared_kv
    with pytest.raises(ConfigError, match="do not cover"):
        split_heads_from_parts(8, 4, [ShardParts(heads=(0, 4)), ShardParts(heads=(5, 8))])
    with pytest.raises(ConfigError, match="end at 6, not at 8"):
        split_heads_from_parts(8, 4, [ShardParts(heads=(0, 4)), ShardParts(heads=(4, 6))])
    with pytest.raises(ConfigError, match="but the plan gives it"):
        split_heads_from_parts(8, 4, [ShardParts(heads=(0, 4), kv_heads=(0, 1)), ShardParts(heads=(4, 8))])
    assert part_ranges([ShardParts(vocab=(0, 22)), ShardParts(vocab=(22, 96))], "vocab", 96) == \
        (range(22), range(22, 96))


def test_a_split_stage_is_over_capacity_where_any_card_is_over_its_own():
    # the smaller card is over its own capacity at a lower peak than the larger card's: the stage is over
    def entry(rank, shard, peak, capacity):
        return {"rank": rank, "stage": 0, "shard": shard, "description": "stage 0 (cards 0,1: layers.0)",
                "unit_names": ["layers.0"], "planned_weight_bytes": 10, "measured_peak_bytes": peak,
                "capacity_bytes": capacity, "over_capacity": peak > capacity}

    (stage,) = _stages([{"stages": [entry(0, 0, 900, 1000)]}, {"stages": [entry(1, 1, 600, 500)]}])
    assert stage["over_capacity"] is True
    assert [s["over_capacity"] for s in stage["shards"]] == [False, True]
    (fits,) = _stages([{"stages": [entry(0, 0, 900, 1000)]}, {"stages": [entry(1, 1, 400, 500)]}])
    assert fits["over_capacity"] is False


# ---- backward through proportional shards: each card's gradients are the unsplit model's parts -----


@pytest.mark.multiprocess
def test_backward_through_proportional_shards_gives_the_unsplit_gradients(mixed_dirs, tmp_path):
    # 3 cards: vocabulary 50 + 10 + 36 rows, heads 3 + 1 + 4 (KV head 0 copied on cards 0 and 1,
    # whose gradients sum), MLP columns 51 + 13 + 32
    import torch.multiprocessing as mp

    vocab = [ShardParts(vocab=(0, 50)), ShardParts(vocab=(50, 60)), ShardParts(vocab=(60, 96))]
    layer = [ShardParts(heads=(0, 3), kv_heads=(0, 1), mlp_columns=(0, 51)),
             ShardParts(heads=(3, 4), kv_heads=(0, 1), mlp_columns=(51, 64)),
             ShardParts(heads=(4, 8), kv_heads=(1, 2), mlp_columns=(64, 96))]
    mp.start_processes(check_shard_gradients, args=(_CLASSES["llama_g2"], str(mixed_dirs["llama_g2"]),
                                                    str(tmp_path / "store"), 3, [vocab, layer, vocab]),
                       nprocs=3, start_method="fork")
