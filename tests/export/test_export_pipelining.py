"""The pipeline split names real modules of the transformers model and covers all its parameters."""

import json

import pytest
from conftest import CONFIGS, plan_of, profile_of

from cachefit.export import to_pipelining
from cachefit.export.modules import key_covers, pipeline_parts
from cachefit.hardware.devices import device_from_capacity, make_cluster
from cachefit.plan.search import plan_partition

CASES = [(name, g, k) for name in CONFIGS for g in ("layer", "block") for k in (1, 2, 3)]


@pytest.mark.parametrize("name, granularity, num_cards", CASES)
def test_fqns_are_real_modules_covering_all_parameters(meta_models, name, granularity, num_cards):
    model = meta_models[name]
    profile = profile_of(name, granularity)
    plan = plan_of(profile, num_cards)
    doc = to_pipelining(plan, profile).document
    parts = doc["module_fqns_per_model_part"]
    assert doc["num_stages"] == len(parts) == plan.cards

    stage_of_key = {}
    for stage, fqns in enumerate(parts):
        assert fqns, f"stage {stage} is empty"
        for fqn in fqns:
            model.get_submodule(fqn)  # raises AttributeError if it is not a module of the model
            assert fqn not in stage_of_key, f"{fqn} listed twice"
            stage_of_key[fqn] = stage
    # every parameter under exactly one listed module, on the stage of the unit that owns it
    stage_of_unit = {u: p.index for p in pipeline_parts(plan) for u in range(*p.units)}
    unit_of = {t.name: i for i, u in enumerate(profile.units) for t in u.tensors}
    for pname, _ in model.named_parameters():
        keys = [k for k in stage_of_key if key_covers(k, pname)]
        assert len(keys) == 1, (pname, keys)
        assert stage_of_key[keys[0]] == stage_of_unit[unit_of[pname]], pname
    # the split points are the first module of every stage after the first
    assert doc["split_spec"] == {fqns[0]: "BEGINNING" for fqns in parts[1:]}
    for fqn in doc["split_spec"]:
        model.get_submodule(fqn)


def test_layer_granularity_reads_like_torchtitan():
    # llama, 4 layers on 3 cards: [embed, layers.0], [layers.1, layers.2], [layers.3, head]
    profile = profile_of("llama", "layer")
    export = to_pipelining(plan_of(profile, 3), profile)
    assert export.document["module_fqns_per_model_part"] == [
        ["model.embed_tokens", "model.layers.0"],
        ["model.layers.1", "model.layers.2"],
        ["model.layers.3", "model.norm", "lm_head"],
    ]
    assert export.document["split_spec"] == {"model.layers.1": "BEGINNING", "model.layers.3": "BEGINNING"}
    assert export.document["tensor_parallel"] == [1, 1, 1]
    assert json.loads(export.text) == export.document
    assert not export.warnings


def test_a_stage_starting_inside_a_layer_is_warned_about():
    profile = profile_of("llama", "block")
    plan = plan_of(profile, 3)  # card 1 starts at layers.1.mlp
    export = to_pipelining(plan, profile)
    assert export.document["module_fqns_per_model_part"][1][:2] == [
        "model.layers.1.post_attention_layernorm", "model.layers.1.mlp"]
    assert any("inside a decoder layer" in w for w in export.warnings)


def test_tensor_parallel_groups_are_one_stage_each():
    profile = profile_of("llama", "layer")
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("60KB")))
    export = to_pipelining(plan, profile)
    groups = export.document["cards_per_stage"]
    assert sorted(c for g in groups for c in g) == list(range(plan.cards))
    assert export.document["tensor_parallel"] == [len(g) for g in groups]
    assert max(export.document["tensor_parallel"]) > 1
    assert any("tensor-parallel" in w for w in export.warnings)


def test_tied_head_on_another_stage_is_warned_about():
    profile = profile_of("gpt2", "layer")
    export = to_pipelining(plan_of(profile, 2), profile)
    assert export.document["module_fqns_per_model_part"][1][-1] == "lm_head"
    assert any("tied to transformer.wte.weight" in w for w in export.warnings)
