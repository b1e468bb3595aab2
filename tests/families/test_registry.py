"""The family registry: one module per family, adapters that return specs, and the tables every
other module reads (MLP patterns, transposed weights, role names) coming from it alone.

The per-family tensor tables themselves are checked against the transformers models in
``tests/profile/test_hf_config.py``; here, that the registry holds together and that nothing outside
``cachefit/families/`` keeps its own table keyed by family names.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

import cachefit
import cachefit.families as families
from cachefit.errors import ConfigError, ProfileError
from cachefit.families import (
    FAMILIES,
    ConfigReader,
    FamilySpec,
    MlpPattern,
    family_names,
    get_family,
    mlp_down_names,
    mlp_patterns,
    mlp_up_names,
    role_module_names,
    transposed_weight_patterns,
)
from cachefit.profile.spec import TransformerSpec

# One tiny config per family (2 layers, vocabulary 101): a new family adds its own here.
_DIMS = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2, vocab_size=101)
SAMPLES: dict[str, dict] = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **_DIMS),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, **_DIMS),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **_DIMS),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=8, **_DIMS),
    "gemma": dict(model_type="gemma", num_key_value_heads=2, head_dim=8, **_DIMS),
    "gemma2": dict(model_type="gemma2", num_key_value_heads=2, head_dim=8, **_DIMS),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, pad_token_id=0, **_DIMS),
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, num_local_experts=4, **_DIMS),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=2, n_positions=64, vocab_size=101),
    "gpt_neox": dict(model_type="gpt_neox", **_DIMS),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=101, max_position_embeddings=64, word_embed_proj_dim=16),
    "bert": dict(model_type="bert", architectures=["BertForMaskedLM"], max_position_embeddings=64, **_DIMS),
    "falcon": dict(model_type="falcon", hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=101),
    "cachefit-dense": dict(model_type="cachefit-dense", **_DIMS),
}


def _spec(name: str) -> TransformerSpec:
    family = get_family(name)
    reader = ConfigReader(SAMPLES[name], where=f"sample {name}", model_type=name, config_class=family.config_class)
    return family.adapter(reader)


def _tensors(spec: TransformerSpec):
    return (*spec.embedding_tensors, *(t for layer in spec.layer_tensors for t in layer), *spec.head_tensors)


def test_every_family_has_a_sample():
    assert set(SAMPLES) == set(FAMILIES)


# ---- one module per family ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_has_its_own_module(name):
    family = FAMILIES[name]
    module = sys.modules[family.adapter.__module__]
    assert module.__name__.startswith("cachefit.families.") and not module.__name__.rsplit(".", 1)[1].startswith("_")
    assert module.FAMILY is family and family.name == name


def test_every_family_module_is_registered():
    shared = {"family_spec", "reader"}
    modules = [m.name for m in pkgutil.iter_modules(families.__path__) if not m.name.startswith("_")]
    for name in sorted(set(modules) - shared):
        module = importlib.import_module(f"cachefit.families.{name}")
        assert isinstance(module.FAMILY, FamilySpec), name
        assert FAMILIES[module.FAMILY.name] is module.FAMILY, f"families/{name}.py is not in the registry"
    assert len(set(modules) - shared) == len(FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapter_returns_a_spec(name):
    spec = _spec(name)
    assert isinstance(spec, TransformerSpec)
    assert spec.num_layers == 2 and len(spec.layer_tensors) == 2
    assert spec.causal is FAMILIES[name].causal or name == "bert"  # BERT: is_decoder may make it causal
    assert spec.name == name and spec.source == ""


def test_registry_order_and_lookup():
    assert family_names() == tuple(FAMILIES)
    assert family_names()[:3] == ("llama", "mistral", "qwen2") and "cachefit-dense" in family_names()
    assert get_family("gemma2") is FAMILIES["gemma2"]
    with pytest.raises(ProfileError) as info:
        get_family("t5")
    assert "'t5'" in str(info.value) and all(n in str(info.value) for n in FAMILIES)
    with pytest.raises(ProfileError):
        get_family(["llama"])  # type: ignore[arg-type]


def test_family_spec_checks_itself():
    llama = FAMILIES["llama"]
    base = {f.name: getattr(llama, f.name) for f in dataclasses.fields(llama)}
    assert FamilySpec(**base) == llama
    with pytest.raises(ConfigError, match="default_architecture"):
        FamilySpec(**(base | {"default_architecture": "GPT2LMHeadModel"}))
    with pytest.raises(ConfigError, match="tensor_parallel"):
        FamilySpec(**(base | {"stage_adapter": None}))
    with pytest.raises(ConfigError, match="loss"):
        FamilySpec(**(base | {"loss": "mse"}))
    with pytest.raises(ConfigError, match="stage_adapter must be one of rotary_decoder, gpt2_decoder, bert_encoder"):
        FamilySpec(**(base | {"stage_adapter": "llama"}))
    with pytest.raises(ConfigError, match="decode needs a stage_adapter"):
        FamilySpec(**(base | {"stage_adapter": None, "tensor_parallel": None}))
    with pytest.raises(ConfigError, match="tensor_parallel must be a TensorParallelSpec or None, got True"):
        FamilySpec(**(base | {"tensor_parallel": True}))
    with pytest.raises(ConfigError, match="fused"):
        MlpPattern(up="gate_up_proj", down="down_proj", gate="gate_proj", fused_gate_up=True)


def test_deploy_facts():
    for family in FAMILIES.values():
        assert family.stage_adapter in (None, "rotary_decoder", "gpt2_decoder", "bert_encoder")
        assert family.loss == ("causal_lm" if family.causal else "encoder_mean")
        assert family.base_model_prefix
    # What deploy runs today (deploy/models.py, stages.py, runtime.py and preflight.py read these), recorded here.
    # every deployed family runs split units (its TensorParallelSpec names the modules)
    assert {n for n, f in FAMILIES.items() if f.tensor_parallel} == {n for n, f in FAMILIES.items() if f.stage_adapter}
    assert {n for n, f in FAMILIES.items() if f.decode} == {"llama", "mistral", "qwen2", "qwen3"}
    assert {n for n, f in FAMILIES.items() if f.stage_adapter} == {"llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"}
    assert FAMILIES["gpt2"].stage_adapter == "gpt2_decoder" and FAMILIES["gpt2"].base_model_prefix == "transformer"
    assert FAMILIES["bert"].stage_adapter == "bert_encoder" and FAMILIES["bert"].architectures == ("BertModel",)
    from cachefit.deploy.models import SUPPORTED_MODEL_TYPES

    assert all(FAMILIES[t].stage_adapter is not None for t in SUPPORTED_MODEL_TYPES)


# ---- the tables other modules read come from the registry ---------------------------------------


def test_planning_core_tables_are_the_registry_s():
    from cachefit.compress import GPT2_CONV1D_PATTERNS, techniques
    from cachefit.partition import split

    assert GPT2_CONV1D_PATTERNS == techniques.CompressionConfig().transposed_tensors == transposed_weight_patterns()
    assert split._TRANSPOSED == transposed_weight_patterns()
    assert techniques._UP_NAMES == mlp_up_names() and techniques._DOWN_NAMES == mlp_down_names()
    # apply.py's structured sparsity knew no fc_in, techniques.py did: one list now
    assert "fc_in" in mlp_up_names() and "fc_out" in mlp_down_names()


def test_torch_edge_tables_are_the_registry_s():
    pytest.importorskip("torch")
    from cachefit.compress import pruning
    from cachefit.profile import module

    assert pruning._MLP_PATTERNS == mlp_patterns()
    roles = role_module_names()
    assert (module._QKV_NAMES, module._ATTN_OUT_NAMES, module._HEAD_NAMES) == (
        frozenset(roles.qkv), frozenset(roles.attn_out), frozenset(roles.head)
    )


def test_gated_patterns_come_first():
    gates = [p.gate is not None for p in mlp_patterns()]
    assert gates == sorted(gates, reverse=True)
    assert len(set(mlp_patterns())) == len(mlp_patterns())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_patterns_name_the_adapter_s_tensors(name):
    family, spec = FAMILIES[name], _spec(name)
    mlp_names = {n for p in family.mlp_patterns for n in (*p.up_names, p.down)}
    for t in _tensors(spec):
        owner = t.name.removesuffix(".weight").removesuffix(".bias")
        if t.role in ("mlp", "experts"):
            assert any(owner.endswith("." + n) for n in mlp_names), f"{t.name}: no MLP pattern of {name} names it"
        if t.role == "qkv":
            assert owner.rsplit(".", 1)[1] in family.role_names.qkv, t.name
        if t.role == "attn_out":
            assert owner.rsplit(".", 1)[1] in family.role_names.attn_out, t.name
    # The transposed-weight patterns are applied to every model: they must match exactly the
    # weights a family stores (in, out), and none of another family's (out, in) weights.
    transposed = [t.name for t in _tensors(spec) if any(fnmatchcase(t.name, p) for p in transposed_weight_patterns())]
    own = [t.name for t in _tensors(spec) if any(fnmatchcase(t.name, p) for p in family.transposed_weights)]
    assert transposed == own
    assert bool(own) == bool(family.transposed_weights)


# Roles the live-module guess cannot tell from names, known and left as they are: transformers 5's
# fused MoE experts and router are not nn.Linear; OPT's projections around a narrow embedding are
# plain Linears outside any attention.
_GUESS_GAPS = {
    ("mixtral", "router"), ("mixtral", "experts"),
    ("opt", "model.decoder.project_in.weight"), ("opt", "model.decoder.project_out.weight"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILIES[n].architectures])
def test_live_module_roles_agree_with_the_adapter(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from cachefit.profile.module import guess_role

    config = dict(SAMPLES[name])
    model_type = config.pop("model_type")
    arch = (config.get("architectures") or [None])[0]
    with torch.device("meta"):
        cfg = transformers.AutoConfig.for_model(model_type, **config)
        model = getattr(transformers, arch)(cfg) if arch else transformers.AutoModelForCausalLM.from_config(cfg)
    wrong = [
        (t.name, t.role, guess_role(model, t.name))
        for t in _tensors(_spec(name))
        if t.tied_to is None and guess_role(model, t.name) != t.role
        and (name, t.role) not in _GUESS_GAPS and (name, t.name) not in _GUESS_GAPS
    ]
    assert not wrong


# ---- no family tables outside families/ --------------------------------------------------------

_SRC = Path(cachefit.__file__).resolve().parent


def _family_comparisons(text: str, names: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, snippet) of each string test against a family name: ``== "x"``, ``!= "x"``,
    ``"x" ==``, ``in ("a", "x")``, and ``"x":`` dict keys."""
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    lit = rf"""(["'])(?:{alt})\1"""
    patterns = (
        rf"[=!]=\s*{lit}",
        rf"{lit}\s*[=!]=",
        rf"""\bin\s*[(\[{{][^)\]}}]*?(["'])(?:{alt})\1""",
        rf"{lit}\s*:(?![:\]])",
    )
    hits = set()
    for pattern in patterns:
        for match in re.finditer(pattern, text):
            line = text.count("\n", 0, match.start()) + 1
            hits.add((line, " ".join(match.group(0).split())))
    return sorted(hits)


def test_the_scanner_finds_family_tables():
    names = ("llama", "bert", "gpt2")
    assert _family_comparisons('if family == "llama":\n', names)
    assert _family_comparisons("if x != 'bert':\n", names)
    assert _family_comparisons('if family in ("mistral",\n    "llama"):\n', names)
    assert _family_comparisons('T = {"llama": _Llama, "gpt2": _GPT2}\n', names)
    assert _family_comparisons('T = {\n    "gpt2":\n        1}\n', names)
    assert not _family_comparisons('name = "llama"\nx = f(model_type="gpt2")\nkind = "llamas"\n', names)
    assert not _family_comparisons("""msg = f'must be a string such as "llama", got {x!r}'\n""", names)
    assert not _family_comparisons('x = d["llama":]\n', names)


def test_no_family_name_tables_outside_families():
    offenders = []
    for path in sorted(_SRC.rglob("*.py")):
        rel = path.relative_to(_SRC)
        if rel.parts[0] == "families":
            continue
        for line, snippet in _family_comparisons(path.read_text(encoding="utf-8"), family_names()):
            offenders.append(f"{rel}:{line}: {snippet}")
    assert not offenders, "ask cachefit.families instead of testing family names:\n" + "\n".join(offenders)


def test_registry_imports_no_torch():
    code = (
        "import sys, cachefit.families\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
