"""The accelerate device map covers every parameter of the real transformers model exactly once."""

import json

import pytest
from conftest import CONFIGS, plan_of, profile_of

from cachefit.export import export_plan, to_accelerate, unit_modules
from cachefit.export.modules import key_covers
from cachefit.hardware.devices import device_from_capacity, make_cluster
from cachefit.plan.search import plan_partition

CASES = [(name, g, k) for name in CONFIGS for g in ("layer", "block") for k in (1, 2, 3)]


def _covering(device_map, fqn):
    return [k for k in device_map if key_covers(k, fqn)]


@pytest.mark.parametrize("name, granularity, num_cards", CASES)
def test_map_covers_every_parameter_exactly_once(meta_models, name, granularity, num_cards):
    model = meta_models[name]
    profile = profile_of(name, granularity)
    plan = plan_of(profile, num_cards)
    export = to_accelerate(plan, profile)
    device_map = dict(export.document)

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for key in device_map:
        assert key in modules or key in params, f"{key!r} is not a module of the {name} model"
    for fqn in params:
        assert len(_covering(device_map, fqn)) == 1, (fqn, _covering(device_map, fqn))
    # state_dict() also lists tied copies and persistent buffers: accelerate checks those
    for fqn in model.state_dict():
        assert len(_covering(device_map, fqn)) == 1, (fqn, _covering(device_map, fqn))
    from accelerate.utils import check_device_map

    check_device_map(model, device_map)  # raises if any tensor is left without a device

    # every parameter sits on the card the plan gave its unit (tied copies aside: see below)
    card_of_unit = {u: s.card for s in plan.stages for u in range(*s.units)}
    unit_of = {t.name: i for i, u in enumerate(profile.units) for t in u.tensors if t.tied_to is None}
    for fqn in params:
        assert device_map[_covering(device_map, fqn)[0]] == card_of_unit[unit_of[fqn]], fqn
    assert sorted(set(device_map.values())) == list(range(plan.cards))
    assert json.loads(export.text) == device_map


def test_block_granularity_names_the_submodules_of_a_cut_layer():
    # llama, 4 layers at block granularity on 3 cards: units 0..3 (embed, layers.0.attn, layers.0.mlp,
    # layers.1.attn) on card 0, so layer 1 is cut between its attention (card 0) and its MLP (card 1)
    profile = profile_of("llama", "block")
    plan = plan_of(profile, 3)
    assert plan.stages[0].unit_names[-1] == "layers.1.attn"
    device_map = to_accelerate(plan, profile).document
    assert device_map["model.layers.1.input_layernorm"] == 0
    assert device_map["model.layers.1.self_attn"] == 0
    assert device_map["model.layers.1.post_attention_layernorm"] == 1
    assert device_map["model.layers.1.mlp"] == 1
    assert device_map["model.layers.0"] == 0  # an uncut layer stays one key
    assert "model.layers.1" not in device_map


def test_unit_modules_are_the_longest_common_module_of_each_unit():
    mods = unit_modules(profile_of("gpt2", "layer"))
    assert mods[0] == ("transformer.wte", "transformer.wpe")  # `transformer` also holds the layers
    assert mods[1] == ("transformer.h.0",)
    assert mods[-1] == ("transformer.ln_f", "lm_head")
    bert = unit_modules(profile_of("bert", "block"))
    assert bert[0] == ("embeddings",)
    assert bert[1] == ("encoder.layer.0.attention",)
    assert bert[2] == ("encoder.layer.0.intermediate", "encoder.layer.0.output")
    assert bert[-1] == ("pooler",)  # raised from pooler.dense: nothing else lives under pooler


def test_tied_head_follows_the_embedding_with_a_warning():
    # gpt2 ties lm_head.weight to transformer.wte.weight; on 3 cards the head unit is on card 2
    profile = profile_of("gpt2", "layer")
    plan = plan_of(profile, 3)
    assert plan.stages[-1].unit_names[-1] == "head" and plan.stages[-1].card == 2
    export = to_accelerate(plan, profile)
    assert export.document["lm_head"] == 0  # with transformer.wte, as accelerate needs
    assert export.document["transformer.ln_f"] == 2  # the rest of the head stays where planned
    assert any("lm_head.weight is tied to transformer.wte.weight" in w for w in export.warnings)
    # untied llama: nothing moves, nothing to warn about
    untied = profile_of("llama", "layer")
    export = to_accelerate(plan_of(untied, 3), untied)
    assert export.document["lm_head"] == 2 and not export.warnings


def test_tensor_parallel_stage_goes_on_its_first_card_with_a_warning():
    profile = profile_of("llama", "layer")
    # 60 KB cards: a layer (99,520 B) does not fit one card, so the planner splits stages 4 ways
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("60KB")))
    assert any(s.shard for s in plan.stages)
    export = to_accelerate(plan, profile)
    firsts = {s.card for s in plan.stages if s.shard is None or s.shard[0] == 0}
    assert set(export.document.values()) == firsts
    assert any("tensor-parallel" in w for w in export.warnings)


def test_compression_is_warned_about():
    profile = profile_of("llama", "layer")
    # int8 is needed: 4 layers of 99,520 B in fp16 on 70 KB cards only fit halved
    plan, _ = plan_partition(profile, make_cluster(device_from_capacity("70KB")), allow=["int8"])
    assert any(s.unit_compression or s.compression for s in plan.stages)
    export = export_plan(plan, "accelerate", profile=profile)
    assert any("compresses" in w and "int8" in w for w in export.warnings)


@pytest.mark.parametrize("name, config_class", [("gpt2", "GPT2Config"), ("llama-tied", "LlamaConfig")])
def test_transformers_dispatches_a_checkpoint_with_the_map(tmp_path, name, config_class):
    """from_pretrained takes the keys and runs the model as dispatched. No accelerator here, so card 0 becomes
    "cpu" and the other cards "disk": two placements, so accelerate attaches its hooks to every key's module
    (the same path as several cards), and a layer cut at block granularity runs across them."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = dict(CONFIGS[name])
    kwargs.pop("model_type")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs)).eval()
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    profile = profile_of(name, "block")
    device_map = to_accelerate(plan_of(profile, 3), profile).document
    assert any(k.endswith((".mlp", ".attn", ".self_attn")) for k in device_map)  # a layer is cut
    placed = {k: "cpu" if card == 0 else "disk" for k, card in device_map.items()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=placed, offload_folder=str(tmp_path / "offload"))
    assert loaded.hf_device_map == placed
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
