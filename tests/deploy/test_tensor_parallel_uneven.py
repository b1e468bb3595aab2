"""Uneven tensor-parallel splits: any card count the planner gives, every deployed family, against
the unsplit model.

The planner (``cachefit.partition.split``) counts the largest of balanced shards: 7 heads over 3 cards
are 3 + 2 + 2, an MLP of 100 columns 34 + 33 + 33, a vocabulary of 100 rows 34 + 33 + 33. Deploy
splits the same way and pads the smaller shards with zeros, so every card holds the plan's bytes.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import (  # noqa: F401 (model_dirs: a fixture)
    WORKLOAD,
    check_shard_gradients,
    make_plan,
    model_dirs,
    padded_inputs,
    save_models,
)

from cachefit.deploy.models import build_skeleton, inspect_model_dir
from cachefit.deploy.runtime import NodeConfig, RunConfig, launch
from cachefit.deploy.stages import (
    StagePlacement,
    layout_from_plan,
    tensor_parallel_plan,
)
from cachefit.deploy.tensor_parallel import balanced_ranges, split_heads
from cachefit.deploy.verify import check_run
from cachefit.errors import ConfigError
from cachefit.families import FAMILIES, TensorParallelSpec, get_family
from cachefit.profile import profile_model

# ---- how dimensions split (no processes) --------------------------------------------------------


def test_balanced_ranges_give_the_larger_shards_first():
    assert balanced_ranges(7, 3) == (range(3), range(3, 5), range(5, 7))
    assert [len(r) for r in balanced_ranges(100, 3)] == [34, 33, 33]
    assert [len(r) for r in balanced_ranges(2, 3)] == [1, 1, 0]
    with pytest.raises(ConfigError):
        balanced_ranges(4, 0)


def test_heads_follow_their_kv_groups():
    # 7 heads over 3 cards (MHA): 3, 2, 2 whole heads, each with its own KV head
    mha = split_heads(7, 7, 3)
    assert mha.query == ((0, 1, 2), (3, 4), (5, 6)) and mha.kv == mha.query
    assert (mha.query_slots, mha.kv_slots) == (3, 3)
    # 4 heads reading 2 KV heads over 3 cards: the cards dealt to the groups 2 + 1, so group 0's heads
    # are shared by cards 0 and 1 (each with a copy of KV head 0) and group 1 is whole on card 2
    gqa = split_heads(4, 2, 3)
    assert gqa.query == ((0,), (1,), (2, 3)) and gqa.kv == ((0,), (0,), (1,))
    # 8 heads in 4 groups over 3 cards: whole groups 2, 1, 1
    assert split_heads(8, 4, 3).kv == ((0, 1), (2,), (3,))
    # one KV head (MQA): every card keeps a copy
    assert split_heads(7, 1, 3).kv == ((0,), (0,), (0,))
    with pytest.raises(ConfigError, match="must divide the attention heads"):
        split_heads(7, 2, 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.integers(1, 24))
def test_head_split_properties(kv, per_group, shards):
    heads = kv * per_group
    split = split_heads(heads, kv, shards)
    assert len(split.query) == len(split.kv) == shards
    # every query head runs on exactly one card, and reads a KV head that card holds
    assert sorted(h for q in split.query for h in q) == list(range(heads))
    for q, k in zip(split.query, split.kv):
        assert all(h // per_group in k for h in q)
    # the planner's count (split.py, _heads_per_shard): whole groups while they last, then one KV head
    # and ceil(heads / shards) query heads; deploy never needs fewer, and exactly that where the cards
    # are at most the groups or a multiple of them
    planned = (-(-kv // shards) * per_group, -(-kv // shards)) if shards <= kv else (-(-heads // shards), 1)
    got = (split.query_slots, split.kv_slots)
    assert got >= planned
    if shards <= kv or shards % kv == 0:
        assert got == planned
    if shards > kv:  # a group's cards differ by at most one head
        assert split.kv_slots == 1


def test_tensor_parallel_spec_checks_itself():
    spec = get_family("llama").tensor_parallel
    base = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    with pytest.raises(ConfigError, match="either query"):
        TensorParallelSpec(**(base | {"fused_qkv": "self_attn.qkv_proj"}))
    with pytest.raises(ConfigError, match="key_value must name"):
        TensorParallelSpec(**(base | {"key_value": ("self_attn.k_proj",)}))
    with pytest.raises(ConfigError, match="layer index"):
        TensorParallelSpec(**(base | {"layer": "model.layers"}))


def test_every_tensor_parallel_spec_names_modules_its_class_has(model_dirs):  # noqa: F811
    families = {n for n, f in FAMILIES.items() if f.tensor_parallel}
    assert families <= set(model_dirs)  # each has a tiny checkpoint in tiny_models.py
    for name in sorted(families):
        src = inspect_model_dir(model_dirs[name])
        root = build_skeleton(src)
        names = tuple(u.name for u in profile_model(model_dirs[name], WORKLOAD).units)
        placement = StagePlacement(stage_idx=0, ranks=(0, 1), units=(0, len(names)), unit_names=names)
        plan = tensor_parallel_plan(placement, src.family)
        assert plan, name
        for fqn in plan:
            assert root.get_submodule(fqn) is not None, (name, fqn)
        spec = src.family.tensor_parallel
        attention = root.get_submodule(f"{spec.layer.format(i=0)}.{spec.attention}")
        for attr in (*spec.head_count_attrs, *spec.head_width_attrs, *filter(None, [spec.group_attr])):
            assert isinstance(getattr(attention, attr), int), (name, attr)


# ---- real runs: 3 processes (4 for BERT, whose pooler runs on a card of its own) -------------------


def _configs():
    return {
        # 7 heads of 8 dims over 3 cards: 3 + 2 + 2 heads, MLP 34 + 33 + 33, vocabulary 34 + 33 + 33
        "llama": transformers.LlamaConfig(
            vocab_size=100, hidden_size=56, intermediate_size=100, num_hidden_layers=1, num_attention_heads=7,
            num_key_value_heads=7, max_position_embeddings=64),
        # one KV head (MQA), copied on every card
        "llama_mqa": transformers.LlamaConfig(
            vocab_size=100, hidden_size=56, intermediate_size=100, num_hidden_layers=1, num_attention_heads=7,
            num_key_value_heads=1, max_position_embeddings=64),
        # 4 KV groups of 2 heads over 3 cards: whole groups 2 + 1 + 1
        "llama_gqa": transformers.LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=64),
        "gpt2": transformers.GPT2Config(vocab_size=100, n_embd=56, n_layer=1, n_head=7, n_positions=64,
                                        bos_token_id=0, eos_token_id=0),
        "bert": transformers.BertConfig(vocab_size=100, hidden_size=56, num_hidden_layers=1, num_attention_heads=7,
                                        intermediate_size=100, max_position_embeddings=16),
        "mistral": transformers.MistralConfig(
            vocab_size=100, hidden_size=56, intermediate_size=100, num_hidden_layers=1, num_attention_heads=7,
            num_key_value_heads=7, max_position_embeddings=64, sliding_window=4),
        # 4 heads reading 2 KV heads over 3 cards (one group's heads on two cards), q/k/v biases
        "qwen2": transformers.Qwen2Config(
            vocab_size=100, hidden_size=64, intermediate_size=100, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64),
        # per-head q/k norms inside self_attn, whole on every card
        "qwen3": transformers.Qwen3Config(
            vocab_size=100, hidden_size=56, intermediate_size=100, num_hidden_layers=1, num_attention_heads=7,
            num_key_value_heads=7, head_dim=8, max_position_embeddings=64),
    }


_CLASSES = {"llama": "LlamaForCausalLM", "llama_mqa": "LlamaForCausalLM", "llama_gqa": "LlamaForCausalLM",
            "gpt2": "GPT2LMHeadModel", "bert": "BertModel", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture(scope="module")
def uneven_dirs(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("uneven"), _configs(), _CLASSES, seed=100)


# (model, card capacity giving a 3-way split at the test workload, granularity, query heads per card)
_CASES = [
    ("llama", "92KB", "layer", (3, 2, 2)),
    ("llama_mqa", "85KB", "layer", (3, 2, 2)),
    ("llama_gqa", "100KB", "layer", (4, 2, 2)),
    ("gpt2", "135KB", "layer", (3, 2, 2)),
    ("bert", "78KB", "layer", (3, 2, 2)),
    ("mistral", "92KB", "block", (3, 2, 2)),  # embed, attention block, MLP block and head on one split stage
    ("qwen2", "104KB", "layer", (1, 1, 2)),
    ("qwen3", "92KB", "layer", (3, 2, 2)),
]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name,capacity,granularity,heads", _CASES, ids=[c[0] for c in _CASES])
def test_uneven_split_matches_unsplit(uneven_dirs, name, capacity, granularity, heads):
    model_dir = uneven_dirs[name]
    config = _configs()[name]
    plan = make_plan(model_dir, capacity, granularity=granularity)
    assert {st.shard[1] for st in plan.stages if st.shard} == {3}, [(st.units, st.shard) for st in plan.stages]
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert tuple(len(q) for q in split_heads(config.num_attention_heads, kv, 3).query) == heads
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    encoder = name == "bert"
    ids, mask = padded_inputs(batch=4, vocab=config.vocab_size, left=not encoder)
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=layout.world_size),
                    config=RunConfig(micro_batches=2), input_ids=ids, attention_mask=mask, launcher="fork")
    split = [s for s in result.report["stages"] if len(s["ranks"]) == 3]
    assert split
    for stage in result.report["stages"]:
        # every card holds the plan's bytes: the largest shard, smaller ones padded with zeros
        assert [s["measured_weight_bytes"] for s in stage["shards"]] == \
            [stage["planned_weight_bytes"]] * len(stage["ranks"])
    width = config.hidden_size if encoder else config.vocab_size
    assert result.outputs.shape == (4, 8, width)
    verdict = check_run(result, model_dir, layout=layout)
    assert verdict.passed and verdict.comparisons[0].max_rel_error <= 1e-5, verdict.describe()


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["gpt2", "qwen2", "qwen3", "bert"])
def test_uneven_split_trains_like_unsplit(uneven_dirs, name):
    # a training step through 3-way splits: GPT-2's fused, transposed q/k/v; qwen2's KV head copies
    # (their gradients summed over the cards holding one); qwen3's per-head norms (a weight every card
    # holds whole, fed by its own heads: summed too); BERT's encoder loss. Losses and every gradient
    # as the unsplit model's
    model_dir = uneven_dirs[name]
    _, capacity, granularity, _ = next(c for c in _CASES if c[0] == name)
    config = _configs()[name]
    plan = make_plan(model_dir, capacity, granularity=granularity)
    layout = layout_from_plan(plan, inspect_model_dir(model_dir))
    ids, mask = padded_inputs(batch=4, vocab=config.vocab_size, left=name != "bert")
    result = launch(model_dir, plan, nodes=NodeConfig(nproc_per_node=layout.world_size), launcher="fork",
                    config=RunConfig(micro_batches=2, mode="train", save_grads=True), input_ids=ids,
                    attention_mask=mask)
    assert any(len(s["ranks"]) == 3 for s in result.report["stages"])
    verdict = check_run(result, model_dir, layout=layout, mode="train", micro_batches=2)
    assert verdict.passed, verdict.describe()
    what = {c.what: c for c in verdict.comparisons}
    assert what["gradients"].max_rel_error <= 1e-5 and what["gradients"].tensors > 0, verdict.describe()


# ---- backward through the shards: each card's gradients are the unsplit model's parts --------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_backward_through_uneven_shards_gives_the_unsplit_gradients(uneven_dirs, tmp_path, name):
    # qwen2: 4 heads / 2 KV heads over 3 cards; cards 0 and 1 pad a query head that reads their real KV
    # head, so its zero input column of o_proj would get a gradient without the padding mask
    import torch.multiprocessing as mp

    mp.start_processes(check_shard_gradients, args=(_CLASSES[name], str(uneven_dirs[name]), str(tmp_path / "store"),
                                                    3), nprocs=3, start_method="fork")

