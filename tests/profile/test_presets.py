"""Built-in presets: each equals the transformers model built from its config, and the famous totals hold."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from cachefit.errors import ConfigError
from cachefit.profile.hf_config import load_transformer_spec
from cachefit.profile.presets import PresetInfo, list_presets, load_preset

REQUIRED = {"paper-16l", "llama-2-7b", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b", "gpt2",
            "bert-base-uncased"}

# Published totals (model cards / model.parameters() of the checkpoints).
FAMOUS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "gpt2": 124_439_808,
    "bert-base-uncased": 109_482_240,  # BertModel, pooler included
    "mixtral-8x7b": 46_702_792_704,
    "gemma-2b": 2_506_172_416,
    "phi-3-mini": 3_821_079_552,
    "falcon-7b": 6_921_720_704,
    "opt-125m": 125_239_296,
    "gpt-neox-20b": 20_554_567_680,
}


def _doc(name: str) -> dict:
    return json.loads((resources.files("cachefit.profile.presets") / f"{name}.json").read_text(encoding="utf-8"))


def _params(spec) -> int:
    tensors = (*spec.embedding_tensors, *(t for layer in spec.layer_tensors for t in layer), *spec.head_tensors)
    return sum(t.numel for t in tensors if t.tied_to is None)


def test_list_presets_has_required_and_valid_metadata():
    infos = list_presets()
    names = [p.name for p in infos]
    assert REQUIRED <= set(names) and names == sorted(names)
    for info in infos:
        assert isinstance(info, PresetInfo)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", info.as_of)
        assert info.params == _params(load_preset(info.name)) > 0
        doc = _doc(info.name)
        assert set(doc) == {"name", "source", "as_of", "notes", "config"} and doc["name"] == info.name
        if info.name != "paper-16l":
            assert info.source.startswith("https://huggingface.co/") and info.source.endswith("/config.json")
        assert load_preset(info.name).source == info.source


@pytest.mark.parametrize("name, params", sorted(FAMOUS.items()))
def test_famous_totals(name, params):
    info = {p.name: p for p in list_presets()}[name]
    assert info.params == params


@pytest.mark.parametrize("name", sorted(FAMOUS))
def test_preset_equals_transformers_model_on_meta(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = dict(_doc(name)["config"])
    model_type = config.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        if model_type == "bert":
            model = getattr(transformers, config["architectures"][0])(cfg)
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    spec = load_preset(name)
    tensors = (*spec.embedding_tensors, *(t for layer in spec.layer_tensors for t in layer), *spec.head_tensors)
    assert {(t.name, t.shape) for t in tensors if t.tied_to is None} == {
        (n, tuple(p.shape)) for n, p in model.named_parameters()
    }
    assert _params(spec) == sum(p.numel() for p in model.parameters()) == FAMOUS[name]


def test_paper_16l():
    spec = load_preset("paper-16l")
    assert spec.family == "dense" and spec.num_layers == 16 and spec.hidden_size == 4096
    assert (spec.intermediate_size, spec.num_heads, spec.vocab_size, spec.gated_mlp) == (16384, 32, 32000, False)
    assert any("32000" in n and "assumed" in n for n in spec.notes)
    fp16 = 2
    for layer in spec.layer_tensors:
        roles: dict[str, int] = {}
        for t in layer:
            roles[t.role] = roles.get(t.role, 0) + t.numel * fp16
        assert roles["qkv"] == 3 * 4096 * 4096 * 2 == 100_663_296
        assert roles["mlp"] == 2 * 4096 * 16384 * 2 == 268_435_456
        assert roles["attn_out"] == 33_554_432
        assert roles["norm"] == 2 * 4096 * 2
    # 16 layers of (4*4096^2 + 2*4096*16384 + 2*4096) + embedding and untied head 2*32000*4096 + final norm 4096.
    assert _params(spec) == 16 * (4 * 4096**2 + 2 * 4096 * 16384 + 2 * 4096) + 2 * 32000 * 4096 + 4096


def test_preset_spec_matches_its_config():
    spec = load_preset("mistral-7b")
    direct = load_transformer_spec(_doc("mistral-7b")["config"], name="mistral-7b")
    assert spec.layer_tensors == direct.layer_tensors and spec.sliding_window == 4096
    assert spec.notes[: len(_doc("mistral-7b")["notes"])] == tuple(_doc("mistral-7b")["notes"])
    assert load_preset(" LLAMA-2-7B ").name == "llama-2-7b"


def test_unknown_preset_lists_known_and_suggests():
    with pytest.raises(ConfigError) as info:
        load_preset("llama-3-8b")
    msg = str(info.value)
    assert "'llama-3.1-8b'" in msg and "Did you mean" in msg
    assert all(p.name in msg for p in list_presets())
    with pytest.raises(ConfigError) as info:
        load_preset("zzzzzz")
    assert "Did you mean" not in str(info.value) and "gpt2" in str(info.value)
